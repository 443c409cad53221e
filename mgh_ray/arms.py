"""The ablations' arms: their names, what each changes in the run's config, and the ablation's config.

Schedule arms (`ablation.schedules`) change how the run trains on the same records; pooling arms
(`ablation.poolings`, crossed with `ablation.attentions`) change the encoder. `ablation.py` trains,
scores and tabulates them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mgh_ray.config import Section

SCHEDULES = ("curriculum", "level_1", "level_2", "level_3", "level_4", "random", "reverse", "cumulative",
             "in_batch", "mined", "reference_levels")
POOLINGS = ("ata", "mean", "last", "weighted_mean", "cls")


class AblationConfig(Section):
    """The paper's two ablations (see ablation.py); every arm gets the same seeds and steps."""

    schedules: list[str] = list(SCHEDULES)
    poolings: list[str] = [p for p in POOLINGS if p != "cls"]  # "cls" (position 0) on request
    # attentions crossed with the poolings (arms "<attention>-<pooling>" when there are several); the
    # schedule study trains with the run's own train.encoder attention and pooling
    attentions: list[Literal["causal", "bidirectional"]] = ["causal"]
    seeds: list[int] = [0]
    steps: int | None = Field(None, ge=1, strict=True)  # None: train.steps
    tasks: list[str] | None = None  # None: evaluate.tasks

    @field_validator("schedules", "poolings")
    @classmethod
    def _known(cls, arms: list[str], info) -> list[str]:
        known = SCHEDULES if info.field_name == "schedules" else POOLINGS
        bad = [a for a in arms if a not in known]
        if bad:
            raise ValueError(f"unknown {info.field_name[:-1]} arm(s) {bad}; known: {', '.join(known)}")
        return arms


def schedule_overrides(arm: str) -> list[str]:
    """Train-config overrides that turn the base config into the given schedule arm."""
    if arm in ("curriculum", "mined"):
        return ["train.curriculum.mode=curriculum"]
    if arm.startswith("level_") and arm[6:].isdigit():
        return ["train.curriculum.mode=single", f"train.curriculum.level={int(arm[6:])}"]
    if arm in ("random", "reverse", "cumulative"):
        return [f"train.curriculum.mode={arm}"]
    if arm == "in_batch":
        return ["train.curriculum.mode=curriculum", "train.loss.hard_negatives=false"]
    if arm == "reference_levels":
        # a read-time change: the records must be read (gated) with this arm's quality policy
        return ["train.curriculum.mode=curriculum", "synthesis.quality.policy=relabel"]
    raise ValueError(f"unknown schedule arm {arm!r}; known: {', '.join(SCHEDULES)}")


def pooling_arms(cfg) -> dict[str, list[str]]:
    """{arm name: overrides} of the pooling study: every pooling under every attention. The run's own
    attention is no override, so its arms train what the schedule study trains (and are reused)."""
    ab = cfg.ablation
    own = cfg.train.encoder.attention or "causal"
    arms = {}
    for attention in ab.attentions:
        for p in ab.poolings:
            name = p if len(ab.attentions) == 1 else f"{attention}-{p}"
            arms[name] = ["train.curriculum.mode=curriculum", f"train.encoder.pooling.mode={p}",
                          *([] if attention == own else [f"train.encoder.attention={attention}"])]
    return arms
