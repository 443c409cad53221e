"""Curriculum: which negative level each training example uses at each step.

A sampler with a cursor, not one dataset per stage (a run restored from a checkpoint would
restart its stage from the top), so a restored run lands mid-stage:
the cursor (step, stage, RNG state) is saved in every checkpoint. Modes, for the paper's ablation:

    curriculum   stages L1 -> L2 -> L3 -> L4 (coarse to fine)
    reverse      stages L4 -> L3 -> L2 -> L1
    cumulative   stage k: every example uses its negatives of ALL levels 1..k together (k per query)
    single       one stage, level `level` throughout
    random       one stage, each example's level drawn uniformly from 1..levels

`levels(n)` gives an (n, K) array: the levels of each example's K hard negatives at this step. K is 1
in every mode but `cumulative`, where it is the stage number; it is the same for every example and
every worker, so the loss's all_gather sees equal shapes.

Stages are equally long unless `stage_weights` gives relative lengths. The RNG is shared by all
workers: each draws the levels of the *global* batch and takes its own slice, so every worker holds
the same cursor and rank 0's copy is enough for a checkpoint.

    cur = Curriculum(CurriculumConfig(), total_steps=40, seed=0)
    levels = cur.levels(global_batch)[rank * b:(rank + 1) * b]; cur.advance()   # (b, K)
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from mgh_ray.config import Section

log = logging.getLogger(__name__)


class CurriculumConfig(Section):
    mode: Literal["curriculum", "reverse", "cumulative", "single", "random"] = "curriculum"
    levels: int = Field(4, ge=1, strict=True)  # negative levels in the records (neg_1 .. neg_<levels>)
    level: int = Field(2, ge=1, strict=True)  # the level of `single` mode
    stage_weights: list[float] | None = None  # relative stage lengths; None = equal

    @model_validator(mode="after")
    def _check(self) -> CurriculumConfig:
        if self.level > self.levels:
            raise ValueError(f"level {self.level} > levels {self.levels}")
        n = len(stage_levels(self))
        if self.stage_weights is not None and (len(self.stage_weights) != n or min(self.stage_weights) <= 0):
            raise ValueError(f"stage_weights needs {n} positive numbers for mode {self.mode!r}")
        return self


def stage_levels(cfg: CurriculumConfig) -> list[list[int]]:
    """The levels each stage draws from, in stage order."""
    all_levels = list(range(1, cfg.levels + 1))
    if cfg.mode == "curriculum":
        return [[k] for k in all_levels]
    if cfg.mode == "reverse":
        return [[k] for k in reversed(all_levels)]
    if cfg.mode == "cumulative":
        return [all_levels[:k] for k in all_levels]
    if cfg.mode == "single":
        return [[cfg.level]]
    return [all_levels]  # random


def stage_bounds(cfg: CurriculumConfig, total_steps: int) -> list[int]:
    """Start step of each stage, plus `total_steps` at the end."""
    n = len(stage_levels(cfg))
    w = np.asarray(cfg.stage_weights or [1.0] * n, dtype=float)
    ends = np.round(np.cumsum(w) / w.sum() * total_steps).astype(int)
    return [0, *ends.tolist()]


class Curriculum:
    """Cursor over (step, stage) with the RNG that draws levels in multi-level stages."""

    def __init__(self, cfg: CurriculumConfig, total_steps: int, seed: int = 0) -> None:
        self.cfg, self.total_steps = cfg, total_steps
        self.stages = stage_levels(cfg)
        self.bounds = stage_bounds(cfg, total_steps)
        self.step = 0
        self.rng = np.random.default_rng(seed)

    @property
    def stage(self) -> int:
        """0-based index of the current stage (the last one once training is over)."""
        for i in range(len(self.stages)):
            if self.step < self.bounds[i + 1]:
                return i
        return len(self.stages) - 1

    def levels(self, n: int) -> np.ndarray:
        """(n, K) levels (1-based) of the hard negatives of each of the `n` examples of the global batch
        at the current step: K = 1 (one level per example) except in `cumulative` mode (all levels <= k)."""
        choices = self.stages[self.stage]
        # always draw, even where nothing is random, so the RNG stream is a function of the step alone
        draw = self.rng.integers(0, len(choices), size=n)
        if self.cfg.mode == "cumulative":
            return np.tile(np.asarray(choices), (n, 1))  # (n, k): every level of the stage together
        return np.asarray(choices)[draw][:, None]  # (n, 1)

    def advance(self) -> None:
        self.step += 1

    def plan(self) -> list[dict[str, Any]]:
        """[{stage, levels, start, stop}] for logs and reports."""
        return [{"stage": i, "levels": lv, "start": self.bounds[i], "stop": self.bounds[i + 1]}
                for i, lv in enumerate(self.stages)]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.stage, "mode": self.cfg.mode,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.cfg.mode:
            raise ValueError(f"checkpoint was written by a {state['mode']!r} curriculum, "
                             f"not {self.cfg.mode!r}")
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        if self.stage != state["stage"]:
            raise ValueError(f"checkpoint cursor says stage {state['stage']} at step {self.step}, this "
                             f"schedule says {self.stage}: steps or stage_weights changed since")
