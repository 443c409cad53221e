"""MGH prompts: the versioned prompt file, pure prompt rendering and the JSON schemas of guided decoding
(reading the model's output back: parsing.py).

Everything the generator LLM is told lives in one YAML file per version (`mgh_ray/prompts/mgh_v2.yaml`,
the default; `mgh_v1` is kept so that its runs stay reproducible; `mgh_v3` has a worked example that
follows the level definitions, but on SmolLM2-135M it parsed and ordered worse than mgh_v2 over 64
seeds, see its header): the four negative levels (L1 coarse
.. L4 fine), the augment prompt, the two E5-style prompts of generate mode (brainstorm a task, then
write an example for it) and, optionally, a worked augment example (sent as an earlier chat turn) and
character bounds for each negative (in the JSON schema of guided decoding). This module turns rows into chat
messages; it imports no engine and has no state, so the same functions run in Ray actors, in the
benchmark and in tests.

    ps = prompts.load()                                   # or load("path/to/my_prompts.yaml")
    messages = prompts.augment_messages(ps, query, positive)
"""

from __future__ import annotations

import functools
import json
import logging
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mgh_ray.records import LEVELS

log = logging.getLogger(__name__)

DEFAULT_VERSION = "mgh_v2"
LEVEL_KEYS = tuple(f"L{k}" for k in LEVELS)



class PromptError(ValueError):
    """The prompt file is malformed: a missing section, level or placeholder."""


@dataclass(frozen=True)
class Kind:
    """One E5 task family (short-long, long-short, short-short, long-long, sts)."""

    name: str
    description: str
    query_length: str
    positive_length: str
    symmetric: bool


@dataclass(frozen=True)
class PromptSet:
    version: str
    system: str
    levels: dict[int, str]  # level -> definition
    level_names: dict[int, str]
    augment: string.Template
    brainstorm: string.Template
    generate: string.Template
    kinds: dict[str, Kind]
    topics: tuple[str, ...]
    example: dict[str, str] | None = None  # query, positive, L1..L4: a worked augment example
    negative_chars: tuple[int, int] | None = None  # (min, max) characters of each negative


# --------------------------------------------------------------------------- loading


def load(version: str | Path = DEFAULT_VERSION) -> PromptSet:
    """The prompt set `version` shipped with the package, or the YAML file at that path."""
    path = Path(version)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        try:
            shipped = resources.files("mgh_ray").joinpath("prompts", f"{version}.yaml")
            text = shipped.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PromptError(f"no prompt set {version!r}: expected mgh_ray/prompts/{version}.yaml "
                              "or the path of a prompt YAML file") from None
    raw = yaml.safe_load(text)
    missing = [k for k in ("version", "system", "levels", "augment", "brainstorm", "generate", "kinds",
                           "topics") if k not in raw]
    if missing:
        raise PromptError(f"prompt set {version!r} lacks section(s) {missing}")
    levels = {int(k): v for k, v in raw["levels"].items()}
    if sorted(levels) != list(LEVELS):
        raise PromptError(f"prompt set {version!r} must define levels {list(LEVELS)}, has {sorted(levels)}")
    example = raw.get("example")
    if example is not None:
        lacking = [k for k in ("query", "positive", *LEVEL_KEYS) if not str(example.get(k, "")).strip()]
        if lacking:
            raise PromptError(f"prompt set {version!r}: example lacks {lacking}")
        example = {k: " ".join(str(example[k]).split()) for k in ("query", "positive", *LEVEL_KEYS)}
    bounds = raw.get("negative_chars")
    if bounds is not None:
        if not (isinstance(bounds, list) and len(bounds) == 2 and 0 < bounds[0] < bounds[1]):
            raise PromptError(f"prompt set {version!r}: negative_chars must be [min, max] with 0 < min < max")
        bounds = (int(bounds[0]), int(bounds[1]))
    kinds = {name: Kind(name, k["description"], k["query_length"], k["positive_length"], bool(k["symmetric"]))
             for name, k in raw["kinds"].items()}
    ps = PromptSet(
        version=str(raw["version"]), system=raw["system"].strip(),
        levels={k: v["definition"].strip() for k, v in levels.items()},
        level_names={k: v["name"] for k, v in levels.items()},
        augment=string.Template(raw["augment"]), brainstorm=string.Template(raw["brainstorm"]),
        generate=string.Template(raw["generate"]), kinds=kinds, topics=tuple(raw["topics"]),
        example=example, negative_chars=bounds)
    # Render each template once so a typo in a placeholder fails here, not in a Ray actor.
    kind = next(iter(kinds.values()))
    augment_messages(ps, "q", "p")
    brainstorm_messages(ps, kind.name, ps.topics[0])
    generate_messages(ps, kind.name, "t")
    return ps


@functools.lru_cache(maxsize=8)
def symmetric_kinds(version: str = DEFAULT_VERSION) -> frozenset[str]:
    """Names of the task families the prompt set marks symmetric ("sts"): their records train with
    the instruction on both sides."""
    return frozenset(name for name, k in load(version).kinds.items() if k.symmetric)


# --------------------------------------------------------------------------- rendering


def clip(text: str, max_chars: int) -> str:
    """`text` with whitespace collapsed, cut at a word boundary to at most `max_chars` characters."""
    text = " ".join(str(text).split())
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


def _chat(ps: PromptSet, template: string.Template, **fields: str) -> list[dict[str, str]]:
    levels = {f"level_{k}": ps.levels[k] for k in LEVELS}
    try:
        user = template.substitute(**levels, **fields)
    except (KeyError, ValueError) as exc:
        raise PromptError(f"prompt set {ps.version}: template placeholder problem: {exc}") from None
    return [{"role": "system", "content": ps.system}, {"role": "user", "content": user}]


def augment_messages(ps: PromptSet, query: str, positive: str, max_chars: int = 500) -> list[dict[str, str]]:
    """Chat messages asking for four graded negatives of a (query, positive) seed; with the prompt
    set's worked example (if any) as an earlier user/assistant turn."""
    chat = _chat(ps, ps.augment, query=clip(query, max_chars), positive=clip(positive, max_chars))
    if ps.example is None:
        return chat
    ex = ps.example
    shot = _chat(ps, ps.augment, query=ex["query"], positive=ex["positive"])[1]
    answer = json.dumps({k: ex[k] for k in _WRITE_ORDER}, ensure_ascii=False, separators=(",", ":"))
    return [chat[0], shot, {"role": "assistant", "content": answer}, chat[1]]


def brainstorm_messages(ps: PromptSet, kind: str, topic: str) -> list[dict[str, str]]:
    """Chat messages asking for one task of family `kind` about `topic` (generate mode, step 1)."""
    k = ps.kinds[kind]
    return _chat(ps, ps.brainstorm, topic=topic, kind_description=k.description)


def generate_messages(ps: PromptSet, kind: str, task: str) -> list[dict[str, str]]:
    """Chat messages asking for a whole example (query, positive, L1..L4) of `task` (step 2)."""
    k = ps.kinds[kind]
    return _chat(ps, ps.generate, task=clip(task, 400), kind_description=k.description,
                 query_length=k.query_length, positive_length=k.positive_length)


# --------------------------------------------------------------------------- schemas


_WRITE_ORDER = tuple(reversed(LEVEL_KEYS))  # finest first


def _object(props: tuple[str, ...], bounded: tuple[str, ...] = (),
            chars: tuple[int, int] | None = None) -> dict[str, Any]:
    def field(p: str) -> dict[str, Any]:
        if chars and p in bounded:
            return {"type": "string", "minLength": chars[0], "maxLength": chars[1]}
        return {"type": "string", "minLength": 1}

    return {"type": "object", "properties": {p: field(p) for p in props}, "required": list(props),
            "additionalProperties": False}


def negatives_schema(ps: PromptSet | None = None) -> dict[str, Any]:
    """JSON schema of the augment answer, for the engine's structured (guided) decoding.

    Keys run L4 .. L1 (the order the model writes them; see the prompt file). With `ps`, each negative
    is bounded to `ps.negative_chars` characters (xgrammar supports min/maxLength, not together with a
    pattern); measured ~10% slower decoding for several times the parse rate on SmolLM2-135M.
    """
    return _object(_WRITE_ORDER, _WRITE_ORDER, ps.negative_chars if ps else None)


def task_schema() -> dict[str, Any]:
    return _object(("task",))


def example_schema(ps: PromptSet | None = None) -> dict[str, Any]:
    return _object(("query", "positive", *_WRITE_ORDER), _WRITE_ORDER, ps.negative_chars if ps else None)
