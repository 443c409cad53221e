"""The paper's two ablations as one command: negative schedule and pooling.

Schedule arms (all on the same synthesized records, seeds and steps):
    curriculum   L1 -> L4, one stage per level (the method)
    level_k      level k only (k = 1..4)
    random       a random level per example
    reverse      L4 -> L1
    cumulative   stage k samples from levels <= k
    in_batch     no explicit hard negative, in-batch negatives only
    mined        curriculum over negatives mined from the seed corpus by the reference embedder
    reference_levels  curriculum over the same records with levels re-ordered by the reference
                 embedder (quality policy relabel) instead of the LLM's levels (policy filter)
Pooling arms (curriculum schedule): ata, mean, last, weighted_mean.

Each (arm, seed) trains into its own folder and is skipped on a rerun once finished; all arms are
evaluated by `evaluation.evaluate` through Serve; a model both studies hold (pooling `ata` is schedule
`curriculum`, and their untrained rows coincide) is trained and scored once. Results are one table
(mean over seeds, with the spread when there are several seeds) and one bar chart per ablation. Each
table starts with the untrained backbone: `untrained` (the run's base, the config's pooling) in the
schedule table, and `untrained-<pooling>` for every pooling arm in the pooling table (is training
worth more than switching the pooling of the untrained model?).

    mgh-ray ablate jobs/configs/tiny.yaml ablation.steps=40 ablation.seeds=[0,1]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from mgh_ray import config, storage
from mgh_ray.layout import RunLayout, save_config
from mgh_ray.report import MEAN_UNLIKE

log = logging.getLogger(__name__)

SCHEDULES = ("curriculum", "level_1", "level_2", "level_3", "level_4", "random", "reverse", "cumulative",
             "in_batch", "mined", "reference_levels")
POOLINGS = ("ata", "mean", "last", "weighted_mean", "cls")
UNTRAINED = "untrained"  # the table rows of the untrained backbone


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


def arm_key(cfg, arm_cfg, arm: str) -> tuple[str, str]:
    """(records source, training fingerprint) of an arm: arms with equal keys train the same model.

    Sources: "mined", "synth" (the synthesized records through the run's gate policy), or
    "synth:<policy>" when the arm reads them through another policy (reference_levels: relabel, which
    re-orders each record's negatives by the reference embedder); the policy is then part of the
    fingerprint, so such an arm never reuses a model trained on the LLM's levels."""
    from mgh_ray import pipeline

    if arm == "mined":
        return "mined", pipeline.fingerprint(arm_cfg.train)
    policy = arm_cfg.synthesis.quality.policy
    if policy != cfg.synthesis.quality.policy:
        return f"synth:{policy}", pipeline.fingerprint(arm_cfg.train, arm_cfg.synthesis.quality)
    return "synth", pipeline.fingerprint(arm_cfg.train)


def _check_arms(arms: list[str], known: tuple[str, ...], what: str) -> None:
    bad = [a for a in arms if a not in known]
    if bad:
        raise ValueError(f"unknown {what} arm(s) {bad}; known: {', '.join(known)}")


def summarize(scores: dict[str, pd.Series], arms: list[str], seeds: list[int],
              untrained: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows: the `untrained` models' scores first (one model each, no spread: the line every arm has
    to clear), then one per arm; columns each task's mean over seeds, the task mean, and its std over
    seeds."""
    rows = {name: scores[name].to_dict() for name in untrained}
    for arm in arms:
        per_seed = pd.concat([scores[f"{arm}-s{s}"] for s in seeds], axis=1)  # (task, seed)
        row = per_seed.mean(axis=1).to_dict()
        row["std_over_seeds"] = per_seed.loc["mean"].std(ddof=1) if len(seeds) > 1 else float("nan")
        if MEAN_UNLIKE in per_seed.index:  # the spread the gain on unlike tasks is measured against
            row["std_unlike_over_seeds"] = per_seed.loc[MEAN_UNLIKE].std(ddof=1) if len(seeds) > 1 else float("nan")
        rows[arm] = row
    return pd.DataFrame(rows).T


def plot(table: pd.DataFrame, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    # the mean over all tasks, and over the tasks unlike the seeds when the table has them
    bars = [("mean", "std_over_seeds", "all tasks", "#4C72B0")]
    if MEAN_UNLIKE in table:
        bars.append((MEAN_UNLIKE, "std_unlike_over_seeds", "tasks unlike the seeds", "#DD8452"))
    x, width = np.arange(len(table)), 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table)), 3.5))
    for i, (col, std, label, color) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, table[col], width, yerr=table[std].fillna(0.0),
               capsize=3, color=color, label=label)
    ax.set_ylabel("mean main score")
    ax.set_title(title)
    values = table[[c for c, *_ in bars]].to_numpy(dtype=float)
    ax.set_ylim(max(0.0, float(np.nanmin(values)) - 0.05), float(np.nanmax(values)) + 0.03)
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30, ha="right")
    if len(bars) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _untrained(cfg, run: RunLayout, study: str, arms: list[str]) -> dict[str, str]:
    """{row name: untrained model folder} for a study: the run's base for the schedule study, and the
    backbone with each pooling arm's pooling for the pooling study (saved beside the arms)."""
    from mgh_ray import pipeline

    if study != "pooling":
        return {UNTRAINED: pipeline.base_model(cfg)}
    own = cfg.train.encoder.pooling.mode
    return {f"{UNTRAINED}-{p}": pipeline.base_model(
        config.override(cfg, [f"train.encoder.pooling.mode={p}"]),
        None if p == own else run.arm(study, f"{UNTRAINED}-{p}")) for p in arms}


def run_ablation(cfg) -> dict[str, pd.DataFrame]:
    """Train and evaluate every arm of both ablations; returns {"schedule": table, "pooling": table}."""
    from mgh_ray import evaluation, mining, pipeline, training
    from mgh_ray import records as records_io

    ab = cfg.ablation
    _check_arms(ab.schedules, SCHEDULES, "schedule")
    _check_arms(ab.poolings, POOLINGS, "pooling")
    run = RunLayout(cfg.run_dir)
    root = Path(pipeline.stage_dir(run.ablation))  # tables and plots; published to run_dir at the end
    save_config(cfg, str(root))
    pipeline.run_stage(run.synthesize, "synthesize", pipeline.fingerprint(cfg.synthesis),
                       lambda: pipeline.synthesize(cfg), cfg.ray.node_loss_retries)
    # what each records source trains on: a folder (training streams its gated view with the folder's
    # saved policy) or, for an arm with another gate policy, that gated view as a Dataset (arm_key)
    records: dict[str, Any] = {"synth": run.synthesize}
    if "mined" in ab.schedules:
        pipeline.run_stage(run.mine, "mine", pipeline.fingerprint(cfg.mining),
                           lambda: mining.mine(pipeline.mining_of(cfg), run.mine), cfg.ray.node_loss_retries)
        records["mined"] = run.mine

    # arms are only evaluated: no merged / sentence-transformers export for each of them
    base_over = ["train.export=false", *([f"train.steps={ab.steps}"] if ab.steps else [])]
    eval_cfg = config.override(cfg.evaluate, [f"tasks={ab.tasks}"]) if ab.tasks else cfg.evaluate
    studies = {
        "schedule": {arm: schedule_overrides(arm) for arm in ab.schedules},
        "pooling": {arm: ["train.curriculum.mode=curriculum", f"train.encoder.pooling.mode={arm}"]
                    for arm in ab.poolings},
    }
    tables: dict[str, pd.DataFrame] = {}
    trained: dict[tuple[str, str], Path] = {}  # (records, train fingerprint) -> model: arms that coincide
    scored: dict[str, pd.Series] = {}  # model folder -> its scores, across studies
    for study, arms in studies.items():
        if not arms:
            continue
        untrained = _untrained(cfg, run, study, list(arms))
        models: dict[str, Path | str] = dict(untrained)
        # every arm's first seed before any arm's second, so an interrupted run holds whole seeds; a
        # run with `ablation.seeds=[0]` (a one-seed table) trains what the full run trains first
        for seed in ab.seeds:
            for arm, over in arms.items():
                arm_cfg = config.override(cfg, [*base_over, *over, f"train.seed={seed}"])
                out = run.arm(study, f"{arm}-s{seed}")
                key = arm_key(cfg, arm_cfg, arm)
                source = key[0]
                if source not in records:  # the synthesized records through another gate policy
                    records[source] = records_io.gated(run.synthesize, policy=source.split(":", 1)[1])
                if key in trained:  # e.g. pooling "ata" is schedule "curriculum": train once, use twice
                    log.info("%s:%s-s%d trains exactly like %s; reusing it", study, arm, seed, trained[key])
                    models[f"{arm}-s{seed}"] = trained[key]
                    continue
                pipeline.run_stage(out, f"{study}:{arm}-s{seed}", key[1],
                                   lambda c=arm_cfg, d=records[source], o=out: training.train(c.train, d, o),
                                   cfg.ray.node_loss_retries)
                models[f"{arm}-s{seed}"] = trained[key] = storage.join(out, "model")
        # a model the previous study scored (pooling's "ata" arm and its untrained row are the schedule
        # study's "curriculum" and "untrained") keeps its scores: same folder, same tasks
        fresh = {name: m for name, m in models.items() if str(m) not in scored}
        for name in (n for n in models if n not in fresh):
            log.info("%s:%s is %s, scored earlier; reusing its scores", study, name, models[name])
        if fresh:
            scores = evaluation.evaluate(eval_cfg, fresh, root / study / "evaluate", cfg.serve,
                                         like_seeds=pipeline.like_seeds(cfg, eval_cfg.tasks))
            scored.update({str(m): scores[name] for name, m in fresh.items()})
        per_model = {name: scored[str(m)] for name, m in models.items()}
        table = summarize(per_model, list(arms), ab.seeds,
                          untrained=list(untrained))
        table.to_csv(root / f"{study}.csv")
        (root / f"{study}.md").write_text(table.to_markdown(floatfmt=".4f") + "\n")
        plot(table, f"{study} ablation ({len(ab.seeds)} seed(s), {ab.steps or cfg.train.steps} steps)",
             root / f"{study}.png")
        tables[study] = table
        log.info("%s ablation:\n%s", study, table.to_markdown(floatfmt=".4f"))
    pipeline.publish(root, run.ablation)
    return tables
