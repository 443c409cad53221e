"""Bootstrap confidence intervals: a task's score with its replicates (`Bootstrap`), the 95% percentile
interval of one task, of a mean over tasks and of a paired difference between two models, and the
replicate files evaluation saves. How the replicates are drawn from mteb's predictions, per task type:
resampling.py.

    boot = resampling.replicates(task, folder / task.prediction_file_name)   # point + (n_boot,) replicates
    boot.interval()                          # Interval(point=0.48, low=0.31, high=0.62, n_rows=60)
    save_bootstraps(path, {"LeeSTS": boot, ...}); boots = load_bootstraps(path)
    mean_interval([b.values for b in boots.values()], [b.point for b in boots.values()])
    difference_interval(boots_a, boots_b, tasks)   # paired: both models resample the same rows
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "mgh_ray.intervals/1"  # the version of the replicate files `save_bootstraps` writes

# mteb's retrieval score names -> pytrec_eval measure families (mteb's calculate_retrieval_scores)
@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval over `n_rows` resampled rows."""

    point: float
    low: float
    high: float
    n_rows: int

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True, eq=False)
class Bootstrap:
    """One task's recomputed main score and the metric on each of `n_boot` bootstrap replicates."""

    point: float
    values: np.ndarray  # (n_boot,) the metric per replicate; nan where a replicate leaves it undefined
    n_rows: int

    def interval(self, level: float = 0.95) -> Interval:
        return _percentile_interval(self.point, self.values, level, self.n_rows)

    def to_json(self) -> dict[str, Any]:
        # float(repr) round-trips exactly, so a loaded bootstrap gives the same intervals
        return {"point": self.point, "n_rows": self.n_rows,
                "replicates": [None if np.isnan(v) else float(v) for v in self.values]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Bootstrap:
        values = np.array([np.nan if v is None else v for v in data["replicates"]], dtype=np.float64)
        return cls(float(data["point"]), values, int(data["n_rows"]))


def mean_interval(replicate_arrays: Sequence[np.ndarray], points: Sequence[float], level: float = 0.95,
                  n_rows: Sequence[int] | None = None) -> Interval:
    """The interval of the mean of several tasks' scores: replicate k of the mean is the mean over tasks
    of each task's replicate k (tasks resampled independently, all with the same n_boot). The interval's
    row count is the sum of `n_rows` (each task's), 0 when they are not given."""
    if len(replicate_arrays) != len(points) or not points:
        raise ValueError(f"need one replicate array per point, got {len(replicate_arrays)} and {len(points)}")
    sizes = {len(a) for a in replicate_arrays}
    if len(sizes) != 1:
        raise ValueError(f"every task needs the same number of replicates, got {sorted(sizes)}")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in replicate_arrays])  # (tasks, n_boot)
    return _percentile_interval(float(np.mean(points)), stacked.mean(axis=0), level,
                                int(sum(n_rows)) if n_rows is not None else 0)


def difference_interval(a: Mapping[str, Bootstrap], b: Mapping[str, Bootstrap], tasks: Sequence[str],
                        level: float = 0.95) -> Interval:
    """The interval of model a's mean score over `tasks` minus model b's, paired: replicate k of the
    difference is a's replicate k minus b's, and both resample the same rows (replicates are seeded by
    task name), so what the two models share (which rows are hard) cancels. Much narrower than the two
    models' own intervals; it prices the evaluation rows only, not another training seed."""
    for t in tasks:
        if a[t].values.shape != b[t].values.shape or a[t].n_rows != b[t].n_rows:
            raise ValueError(f"{t}: a paired difference needs replicates of the same rows, got "
                             f"{a[t].values.shape[0]} replicates of {a[t].n_rows} rows against "
                             f"{b[t].values.shape[0]} of {b[t].n_rows}; score both with the same evaluate.bootstrap")
    return mean_interval([a[t].values - b[t].values for t in tasks], [a[t].point - b[t].point for t in tasks],
                         level, [a[t].n_rows for t in tasks])


def save_bootstraps(path: Path, bootstraps: Mapping[str, Bootstrap]) -> Path:
    """Write {task name: Bootstrap} as JSON (replicates as lists), for `mean_interval` over any subset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "bootstraps": {name: b.to_json() for name, b in bootstraps.items()}}
    path.write_text(json.dumps(body))
    return path


def load_bootstraps(path: Path) -> dict[str, Bootstrap]:
    """What `save_bootstraps` wrote: task name -> Bootstrap."""
    body = json.loads(Path(path).read_text())
    if body.get("format") != FORMAT:
        raise ValueError(f"{path} is not a replicate file of {FORMAT} (format {body.get('format')!r})")
    return {name: Bootstrap.from_json(b) for name, b in body["bootstraps"].items()}


def _percentile_interval(point: float, values: np.ndarray, level: float, n_rows: int) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), not {level}")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no replicate has a defined score")
    if finite.size < values.size:  # e.g. a resample without a positive pair: AP is undefined there
        log.warning("%d of %d replicates have no defined score; the interval ignores them",
                    values.size - finite.size, values.size)
    low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(point), float(low), float(high), int(n_rows))
