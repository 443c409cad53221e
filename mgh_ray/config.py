"""Typed configuration: defaults <- YAML file <- command-line dotlist, merged once, then validated.

Every stage owns a small `Section` subclass next to the code that reads it (synthesis.SynthesisConfig,
training.TrainConfig, ...); `pipeline.PipelineConfig` composes them. Unknown keys and wrong types are
errors that name the key and say what was expected. The resolved config is written next to every
artifact so that an output folder describes itself.

    cfg = load(PipelineConfig, "jobs/configs/tiny.yaml", ["train.steps=20", "seed=1"])
    save(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)


# the most workers, actors or replicas a config may ask for: beyond any cluster a launcher file here
# describes (cluster.yaml's max_workers); within it, the placement check names what does not fit
MAX_COUNT = 1024

# how a forward computes (training, adaptation, the torch serving engine): under bfloat16 autocast
# (float32 weights; training keeps optimizer state and the loss in float32) or in the weights' own
# dtype; "auto": bfloat16 where the device does bf16 arithmetic natively (devices.pick_autocast)
Precision = Literal["auto", "float32", "bfloat16"]
# a model's weights (an encoder, a vLLM engine); what "auto" means depends on where the model loads
# (devices.pick_dtype for an encoder, devices.pick_engine_dtype for a vLLM engine)
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


class Section(BaseModel):
    """Base of every config block: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # fields a finished stage may change: how it runs, not what it makes. `stages.fingerprint` leaves
    # them out, so a rerun with another value (or a release that adds such a field) reuses the stage
    runtime_fields: ClassVar[frozenset[str]] = frozenset()


T = TypeVar("T", bound=BaseModel)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "synthesis.levels=[1,2]"] into a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.steps=20)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins. Neither input is modified."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see jobs/configs/ for the shipped presets)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or fix its spelling")
        else:
            got = err.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {err['msg']}{got_s}")
    return "\n".join(lines)


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then dotlist `overrides`."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    source = f"{path or 'defaults'}" + (f" + overrides {overrides}" if overrides else "")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def override(cfg: T, overrides: list[str]) -> T:
    """A copy of `cfg` with dotlist overrides applied and validated again."""
    data = deep_merge(cfg.model_dump(mode="json"), parse_overrides(overrides))
    try:
        return type(cfg).model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"overrides {overrides}")) from None


def save(cfg: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) so the artifact beside it describes itself."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
    return path
