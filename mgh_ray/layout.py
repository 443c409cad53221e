"""The run layout: where every stage's files live under one `run_dir` (a local path or a URI).

    run = RunLayout("s3://bucket/run")          # or RunLayout("runs/tiny")
    run.synthesize        -> s3://bucket/run/synthesize      (records/, failures/, report.*, config.yaml)
    run.records(run.synthesize)                 (and run.failures(...))
    run.adapt, run.adapter -> .../adapt, .../adapt/adapter (MNTP, for a bidirectional encoder)
    run.train             -> .../train          (Ray Train storage, metrics.jsonl, config.yaml)
    run.model, run.export -> .../train/model, .../train/export
    run.base              -> .../base           (the untrained backbone, same pooling)
    run.serve, run.evaluate, run.mine, run.ablation, run.benchmarks, run.fetch

Pipeline, CLI, ablation, mining and benchmarks all ask this object; nothing else spells a stage's
folder. Every stage folder gets its resolved config as `config.yaml` (`save_config`); a stage that
resumes in its folder compares its settings with that file (`check_same_settings`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mgh_ray import storage
from mgh_ray.config import ConfigError

CONFIG_FILE = "config.yaml"
SUCCESS = "_SUCCESS"
# files inside stage folders
SEEDS_FILE = "seeds.parquet"  # fetch: the training seeds, readable from every node
SERVE_FILE = "serve.json"  # serve: the endpoint and its parity check
SCORES_FILE = "scores.csv"  # evaluate: main score per task and model
METRICS_FILE = "metrics.jsonl"  # train, adapt: one line per step
DONE_FILE = "done.json"  # train, adapt: the run finished (what it wrote)
ASSETS_FILE = "assets.json"  # fetch: where each fetched model and dataset lies on the node that fetched it
REPORT_FILE = "report"  # synthesize, mine, adapt, evaluate: report.md (and report.json where counted)
PLOT_FILE = "scores.png"  # evaluate: the scores per task and model


@dataclass(frozen=True)
class RunLayout:
    run_dir: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", storage.normalize(self.run_dir))

    def path(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    # stage folders
    @property
    def fetch(self) -> str:
        return self.path("fetch")

    @property
    def synthesize(self) -> str:
        return self.path("synthesize")

    @property
    def mine(self) -> str:
        return self.path("mine")

    @property
    def adapt(self) -> str:
        return self.path("adapt")

    @property
    def adapter(self) -> str:
        """The adaptation (MNTP) adapter that a bidirectional encoder's training starts from."""
        return self.path("adapt", "adapter")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def model(self) -> str:
        return self.path("train", "model")

    @property
    def export(self) -> str:
        return self.path("train", "export")

    @property
    def base(self) -> str:
        return self.path("base")

    @property
    def serve(self) -> str:
        return self.path("serve")

    @property
    def evaluate(self) -> str:
        return self.path("evaluate")

    @property
    def ablation(self) -> str:
        return self.path("ablation")

    @property
    def benchmarks(self) -> str:
        return self.path("benchmarks")

    @property
    def seeds(self) -> str:
        return self.path("fetch", SEEDS_FILE)

    @property
    def assets(self) -> str:
        return self.path("fetch", ASSETS_FILE)

    @property
    def serve_info(self) -> str:
        return self.path("serve", SERVE_FILE)

    @property
    def scores(self) -> str:
        return self.path("evaluate", SCORES_FILE)

    def arm(self, study: str, name: str) -> str:
        """Training folder of one ablation arm."""
        return self.path("ablation", study, name)

    # inside a records folder (synthesis, mining)
    @staticmethod
    def records(folder: str) -> str:
        return storage.join(folder, "records")

    @staticmethod
    def failures(folder: str) -> str:
        return storage.join(folder, "failures")

    @staticmethod
    def config(folder: str) -> str:
        return storage.join(folder, CONFIG_FILE)

    @staticmethod
    def report(folder: str, suffix: str = "md") -> str:
        """A stage's report: `report.md` for people, `report.json` for code."""
        return storage.join(str(folder), f"{REPORT_FILE}.{suffix}")

    @staticmethod
    def plot(folder: str) -> str:
        return storage.join(str(folder), PLOT_FILE)

    @staticmethod
    def success(folder: str) -> str:
        return storage.join(folder, SUCCESS)

    # inside a training folder (train, adapt, ablation arms)
    @staticmethod
    def metrics(folder: str) -> str:
        return storage.join(str(folder), METRICS_FILE)

    @staticmethod
    def done(folder: str) -> str:
        return storage.join(str(folder), DONE_FILE)


def save_config(cfg: BaseModel, folder: str) -> str:
    """Write a stage's resolved config into its folder, so the folder describes itself."""
    import yaml

    return storage.write_text(RunLayout.config(folder), yaml.safe_dump(cfg.model_dump(mode="json"),
                                                                        sort_keys=False))


def load_config_dict(folder: str) -> dict | None:
    """The config.yaml a stage folder holds, as a dict; None if there is none."""
    import yaml

    loc = RunLayout.config(folder)
    if not storage.is_file(loc):
        return None
    return yaml.safe_load(storage.read_text(loc)) or {}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_settings(cfg: BaseModel, folder: str, fields: Iterable[str], what: str) -> None:
    """Refuse to resume `what` in `folder` if its config.yaml differs from `cfg` in any of `fields`
    (top-level names; sections are compared leaf by leaf and named with dots, e.g. `encoder.lora.r`).
    Keys the saved config lacks (fields added since it was written) are not compared; no config.yaml:
    nothing to resume, any settings start it."""
    old = load_config_dict(folder)
    if not old:
        return
    fields = set(fields)
    was, now = _flat(old), _flat(cfg.model_dump(mode="json"))
    changed = {k: (was[k], now.get(k)) for k in sorted(was)
               if k.split(".")[0] in fields and was[k] != now.get(k)}
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"{folder} holds a {what} started with other settings ({diff}); rerun with the "
                          f"settings in {RunLayout.config(folder)} to resume it, or write to a new folder")
