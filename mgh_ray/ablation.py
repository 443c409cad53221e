"""The paper's two ablations as one command: pooling (crossed with the backbone's attention) and schedule.

Pooling study (curriculum schedule): arms are poolings (ata, mean, last, weighted_mean, cls), each under
every attention of `ablation.attentions` (causal as pretrained, or bidirectional after the MNTP
adaptation stage); with several attentions an arm is named "<attention>-<pooling>".
Schedule study (the run's own attention and pooling, `train.encoder`), on the same records, seeds and
steps:
    curriculum   L1 -> L4, one stage per level (the method)
    level_k      level k only (k = 1..4)
    random       a random level per example
    reverse      L4 -> L1
    cumulative   stage k samples from levels <= k
    in_batch     no explicit hard negative, in-batch negatives only
    mined        curriculum over negatives mined from the seed corpus by the reference embedder
    reference_levels  curriculum over the same records with levels re-ordered by the reference
                 embedder (quality policy relabel) instead of the LLM's levels (policy filter)

Each (arm, seed) trains into its own folder and is skipped on a rerun once finished. Arms that train the
same model (the pooling study's arm with the run's attention and pooling is the schedule study's
`curriculum`) train once: `models.json` in the ablation folder maps (records, training fingerprint) to the
model, across runs of the command, so the schedule study of a later run reuses the pooling study's
models. Every model is scored once, in one evaluation folder (`evaluate/`) under a name of its own
folder, so a model both studies hold, or a later run, reuses its scores and their bootstrap replicates.

Each table starts with the untrained models its arms start from: `untrained` (the run's base) in the
schedule table, `untrained-<arm>` for every pooling arm (for a bidirectional arm: the backbone after MNTP,
before contrastive training). Columns: every task's mean over seeds, the means (all tasks, tasks like and
unlike the seeds), the spread over seeds of the mean and of the unlike mean, the 95% bootstrap interval
of the unlike mean (row resampling: the replicate of an arm is the mean over its seeds' replicates, rows
paired), the paired difference on the unlike mean with its 95% interval against the row's untrained
model (`unlike vs untrained`), against `curriculum` (schedule) or mean pooling under the same attention
(pooling) (`comparisons`; every mean's in `<study>_differences.csv`), the mean ATA weight on position 0, on the instruction and on the text of BBC headlines read as
queries (where the probe layer's attention goes), and in the schedule table the share of adjacent
levels the reference embedder orders as the arm trains on them (`level order`). `<study>_intervals.md`
holds every task's and mean's interval. One bar chart per study.

    mgh-ray ablate jobs/configs/small.yaml ablation.seeds=[0,1,2]
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mgh_ray import config, stages, storage
from mgh_ray.arms import pooling_arms, schedule_overrides
from mgh_ray.layout import RunLayout, save_config
from mgh_ray.report import MEAN_UNLIKE

log = logging.getLogger(__name__)

UNTRAINED = "untrained"  # the table rows of the untrained models
PROBE_TEXTS = 64  # BBC headlines (held out of the seeds) whose ATA weights the tables report


def arm_key(cfg, arm_cfg, arm: str) -> tuple[str, str]:
    """(records source, training fingerprint) of an arm: arms with equal keys train the same model.

    Sources: "mined", "synth" (the synthesized records through the run's gate policy), or
    "synth:<policy>" when the arm reads them through another policy (reference_levels: relabel, which
    re-orders each record's negatives by the reference embedder); the policy is then part of the
    fingerprint, so such an arm never reuses a model trained on the LLM's levels. The fingerprint is
    the pipeline's (`train_fingerprint`, the adaptation included for a bidirectional encoder) without
    the synthesis config, which the source stands for."""
    from mgh_ray import pipeline

    train = pipeline.train_config(arm_cfg)
    adapted = [arm_cfg.adapt] if pipeline.adapted(arm_cfg) else []
    if arm == "mined":
        return "mined", stages.fingerprint(train, *adapted)
    policy = arm_cfg.synthesis.quality.policy
    if policy != cfg.synthesis.quality.policy:
        return f"synth:{policy}", stages.fingerprint(train, arm_cfg.synthesis.quality, *adapted)
    return "synth", stages.fingerprint(train, *adapted)


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


def merge_rows(boots: dict[str, dict[str, Any]], rows: dict[str, list[str]],
               task_names: list[str]) -> dict[str, dict[str, Any]]:
    """{table row: {task: Bootstrap}}: a row's replicates are the mean over its seed models' replicates
    (which resample the same rows), replicate by replicate. boots: {model name: {task: Bootstrap}};
    rows: {table row: its models}."""
    from mgh_ray.intervals import Bootstrap

    merged: dict[str, dict[str, Bootstrap]] = {}
    for row, names in rows.items():
        per = [boots.get(n, {}) for n in names]
        merged[row] = {t: Bootstrap(point=float(np.mean([b[t].point for b in per])),
                                    values=np.mean([b[t].values for b in per], axis=0),
                                    n_rows=per[0][t].n_rows)
                       for t in task_names if per and all(t in b for b in per)}
    return merged


def comparisons(study: str, arms: list[str], untrained: list[str]) -> dict[str, list[tuple[str, str]]]:
    """What each study's trained rows are compared with, paired: {what: [(row, reference row)]}.
    "vs untrained": the gain of training (the row's own untrained model); schedule arms "vs curriculum"
    (the method); pooling arms "vs mean" (mean pooling under the same attention) and, with several
    attentions, causal arms "vs bidirectional" (the same pooling after MNTP)."""
    own_untrained = (lambda a: UNTRAINED) if study == "schedule" else (lambda a: f"{UNTRAINED}-{a}")
    out = {"vs untrained": [(a, own_untrained(a)) for a in arms if own_untrained(a) in untrained]}
    if study == "schedule":
        out["vs curriculum"] = [(a, "curriculum") for a in arms if a != "curriculum" and "curriculum" in arms]
    else:
        def mean_of(a: str) -> str:
            head, _, _ = a.rpartition("-")
            return f"{head}-mean" if head else "mean"
        out["vs mean"] = [(a, mean_of(a)) for a in arms if mean_of(a) != a and mean_of(a) in arms]
        # the attention study: each causal arm against the same pooling on the bidirectional backbone
        out["vs bidirectional"] = [(a, "bidirectional-" + a.removeprefix("causal-")) for a in arms
                                   if a.startswith("causal-") and "bidirectional-" + a.removeprefix("causal-") in arms]
    return {k: v for k, v in out.items() if v}


def paired_differences(merged: dict[str, dict[str, Any]], pairs: dict[str, list[tuple[str, str]]],
                       task_names: list[str], like_seeds: list[str]) -> pd.DataFrame:
    """Row minus reference on every mean (all tasks, like and unlike the seeds), with the paired 95%
    bootstrap interval (`intervals.difference_interval`), long: comparison, row, reference, mean, point,
    low, high. It counts the evaluation rows' noise only; `std_over_seeds` counts the training seeds'."""
    from mgh_ray import evaluation, intervals

    out = []
    for what, rows in pairs.items():
        for row, ref in rows:
            for name, group in evaluation.mean_groups(task_names, like_seeds).items():
                if group and all(t in merged[row] and t in merged[ref] for t in group):
                    iv = intervals.difference_interval(merged[row], merged[ref], group)
                    out.append({"comparison": what, "row": row, "reference": ref, "mean": name,
                                "point": iv.point, "low": iv.low, "high": iv.high})
    return pd.DataFrame(out, columns=["comparison", "row", "reference", "mean", "point", "low", "high"])


# ------------------------------------------------------------------ per-model and per-source facts


def _shares(model: str, instruction: str, texts: list[str]) -> dict[str, float]:
    """ATA weight shares of one model folder (a Ray task: the model loads on a worker)."""
    from mgh_ray.encoder import Encoder

    return Encoder.load(model).anchor_shares(texts, instruction)


def anchor_shares(cfg, models: dict[str, str], known: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{model folder: ATA weight shares} of the models not in `known`, on held-out BBC headlines read as
    queries with their task's instruction."""
    import ray

    from mgh_ray import corpora, tasks

    texts = corpora.table("bbc_eval").title.head(PROBE_TEXTS).tolist()
    instruction = tasks.TASKS["BBCHeadlineRetrieval"].metadata.prompt["query"]
    todo = sorted({m for m in models.values() if m not in known})
    remote = ray.remote(_shares).options(num_cpus=cfg.train.cpus_per_worker)
    got = ray.get([remote.remote(m, instruction, texts) for m in todo])
    return {**known, **dict(zip(todo, got))}


def level_order(records: Any) -> float:
    """Share of adjacent levels (neg_k, neg_k+1) the reference embedder orders as training reads them,
    over a gated records dataset (counted on workers)."""
    parts = records.select_columns(["levels_in_order"]).map_batches(
        lambda b: pd.DataFrame({"n": [len(b)], "in_order": [float(b["levels_in_order"].sum())]}),
        batch_format="pandas", batch_size=None).to_pandas()
    n = float(parts["n"].sum())
    return float(parts["in_order"].sum()) / (3 * n) if n else float("nan")


class _Index:
    """A JSON file of the ablation folder: what earlier runs of the command already know (models by
    training key, ATA shares by model), so later runs reuse them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"models": {}, "shares": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


# ------------------------------------------------------------------ the command


def run_ablation(cfg) -> dict[str, pd.DataFrame]:
    """Train and evaluate every arm of both ablations; returns {"pooling": table, "schedule": table}."""
    from mgh_ray import mining, pipeline, quality, training

    ab = cfg.ablation
    run = RunLayout(cfg.run_dir)
    root = Path(stages.stage_dir(run.ablation))  # tables and plots; published to run_dir at the end
    save_config(cfg, str(root))
    index = _Index(root / "models.json")
    # the seeds the pipeline publishes: synthesis reads them, and so does an arm's MNTP adaptation
    pipeline.fetch_stage(cfg)
    stages.run_stage(run.synthesize, "synthesize", stages.fingerprint(cfg.synthesis),
                       lambda: pipeline.synthesize(cfg), cfg.ray.node_loss_retries)
    # what each records source trains on: a folder (training streams its gated view with the folder's
    # saved policy) or, for an arm with another gate policy, that gated view as a Dataset (arm_key)
    records: dict[str, Any] = {"synth": run.synthesize}
    if "mined" in ab.schedules:
        stages.run_stage(run.mine, "mine", stages.fingerprint(cfg.mining),
                           lambda: mining.mine(pipeline.mining_of(cfg), run.mine), cfg.ray.node_loss_retries)
        records["mined"] = run.mine

    # arms are only evaluated: no merged / sentence-transformers export for each of them
    base_over = ["train.export=false", *([f"train.steps={ab.steps}"] if ab.steps else [])]
    eval_cfg = config.override(cfg.evaluate, [f"tasks={ab.tasks}"]) if ab.tasks else cfg.evaluate
    if "precision" not in cfg.evaluate.model_fields_set:
        # float32 unless asked: bf16 autocast (evaluate.precision's default) moved a tiny model's mean
        # score by up to 0.004 against float32 (docs/benchmarks.md), the size of the arms' differences
        eval_cfg = eval_cfg.model_copy(update={"precision": "float32"})
        log.info("ablation: evaluating in float32 (set evaluate.precision to choose)")
    like = pipeline.like_seeds(cfg, eval_cfg.tasks)
    studies = {"pooling": pooling_arms(cfg), "schedule": {arm: schedule_overrides(arm) for arm in ab.schedules}}
    tables: dict[str, pd.DataFrame] = {}
    for study, arms in studies.items():
        if not arms:
            continue
        untrained = _untrained(cfg, run, study, arms)
        models: dict[str, str] = dict(untrained)
        sources: dict[str, str] = {}
        # every arm's first seed before any arm's second, so an interrupted run holds whole seeds; a
        # run with `ablation.seeds=[0]` (a one-seed table) trains what the full run trains first
        for seed in ab.seeds:
            for arm, over in arms.items():
                arm_cfg = config.override(cfg, [*base_over, *over, f"train.seed={seed}"])
                if pipeline.adapted(arm_cfg):  # a bidirectional arm starts from the run's MNTP adapter
                    pipeline.adapt_stage(arm_cfg)
                key = arm_key(cfg, arm_cfg, arm)
                source = sources[arm] = key[0]
                if source not in records:  # the synthesized records through another gate policy
                    records[source] = quality.gated(run.synthesize, policy=source.split(":", 1)[1])
                known = index.data["models"].get("|".join(key))
                if known is not None and storage.is_file(storage.join(known, "encoder.yaml")):
                    log.info("%s:%s-s%d trains exactly like %s; reusing it", study, arm, seed, known)
                    models[f"{arm}-s{seed}"] = known
                    continue
                out = run.arm(study, f"{arm}-s{seed}")
                stages.run_stage(out, f"{study}:{arm}-s{seed}", key[1],
                                   lambda c=arm_cfg, d=records[source], o=out: training.train(
                                       pipeline.train_config(c), d, o),
                                   cfg.ray.node_loss_retries)
                models[f"{arm}-s{seed}"] = storage.join(out, "model")
                index.data["models"]["|".join(key)] = models[f"{arm}-s{seed}"]
                index.save()
        tables[study] = _score(cfg, eval_cfg, like, study, arms, untrained, models, sources, records, index, root)
    stages.publish(root, run.ablation)
    return tables


def _untrained(cfg, run: RunLayout, study: str, arms: dict[str, list[str]]) -> dict[str, str]:
    """{row name: untrained model folder}: the run's base for the schedule study, and the backbone (after
    MNTP for a bidirectional arm) with each pooling arm's pooling for the pooling study, saved beside the
    arms (the run's own attention and pooling: the run's base)."""
    from mgh_ray import pipeline

    if study != "pooling":
        return {UNTRAINED: pipeline.base_model(cfg)}
    out = {}
    own = (cfg.train.encoder.pooling.mode, pipeline.train_config(cfg).encoder.attention or "causal")
    for arm, over in arms.items():
        arm_cfg = config.override(cfg, over)
        mine = (arm_cfg.train.encoder.pooling.mode, arm_cfg.train.encoder.attention or "causal") == own
        out[f"{UNTRAINED}-{arm}"] = pipeline.base_model(arm_cfg, None if mine else run.arm(study, f"{UNTRAINED}-{arm}"))
    return out


def _model_name(run: RunLayout, model: str) -> str:
    """The evaluation name of a model folder: its path under run_dir, so one folder is one name."""
    rel = storage.normalize(model)[len(run.run_dir) + 1:] if storage.normalize(model).startswith(run.run_dir) \
        else storage.normalize(model)
    return rel.removesuffix("/model").replace("/", "__")


def _score(cfg, eval_cfg, like: list[str], study: str, arms: dict[str, list[str]], untrained: dict[str, str],
           models: dict[str, str], sources: dict[str, str], records: dict[str, Any], index: _Index,
           root: Path) -> pd.DataFrame:
    """Evaluate a study's models (each folder once, in the shared evaluation folder) and write its tables."""
    from mgh_ray import evaluation, report

    ab = cfg.ablation
    run = RunLayout(cfg.run_dir)
    names = {row: _model_name(run, m) for row, m in models.items()}
    folders = {names[row]: m for row, m in models.items()}
    out_dir = root / "evaluate"
    table_scores = evaluation.evaluate(eval_cfg, folders, out_dir, cfg.serve, like_seeds=like)
    per_model = {row: table_scores[names[row]] for row in models}
    boots = {names[row]: evaluation.bootstraps(out_dir, names[row], evaluation.result_revision(eval_cfg, m),
                                               eval_cfg.tasks)
             for row, m in models.items()}
    table = summarize(per_model, list(arms), ab.seeds, untrained=list(untrained))
    rows = {**{u: [names[u]] for u in untrained},
            **{arm: [names[f"{arm}-s{s}"] for s in ab.seeds] for arm in arms}}
    merged = merge_rows(boots, rows, eval_cfg.tasks)
    ivs = evaluation.interval_table(merged, eval_cfg.tasks, like)
    unlike = ivs[ivs.row == MEAN_UNLIKE].set_index("model")
    if len(unlike):
        table["unlike 95% CI"] = [f"[{unlike.loc[r, 'low']:.4f}, {unlike.loc[r, 'high']:.4f}]"
                                  if r in unlike.index else "" for r in table.index]
    diffs = paired_differences(merged, comparisons(study, list(arms), list(untrained)), eval_cfg.tasks, like)
    for what, part in diffs[diffs["mean"] == (MEAN_UNLIKE if len(unlike) else "mean")].groupby("comparison"):
        cells = {r.row: f"{r.point:+.4f} [{r.low:+.4f}, {r.high:+.4f}]" for r in part.itertuples()}
        table[f"unlike {what}" if len(unlike) else what] = [cells.get(r, "") for r in table.index]
    shares = anchor_shares(cfg, {r: m for r, m in models.items()
                                 if _pooling_of(m) == "ata"}, index.data["shares"])
    index.data["shares"] = shares
    index.save()
    for part in ("position_0", "instruction", "text"):
        table[f"ata weight: {part}"] = [
            np.mean([shares[models[m]][part] for m in _row_models(r, ab.seeds, untrained)])
            if all(models[m] in shares for m in _row_models(r, ab.seeds, untrained)) else np.nan
            for r in table.index]
    if study == "schedule":
        order = _level_orders(records, set(sources.values()))
        table["level order"] = [np.nan if r in untrained or r == "in_batch" else order.get(sources[r], np.nan)
                                for r in table.index]
    table.to_csv(root / f"{study}.csv")
    ivs.to_csv(root / f"{study}_intervals.csv", index=False)
    diffs.to_csv(root / f"{study}_differences.csv", index=False)
    (root / f"{study}.md").write_text(table.to_markdown(floatfmt=".4f") + "\n")
    (root / f"{study}_intervals.md").write_text(report.interval_markdown(ivs, list(table_scores.index)) + "\n")
    report.ablation_chart(table, f"{study} ablation ({len(ab.seeds)} seed(s), {ab.steps or cfg.train.steps} steps)",
         root / f"{study}.png")
    log.info("%s ablation:\n%s", study, table.to_markdown(floatfmt=".4f"))
    return table


def _row_models(row: str, seeds: list[int], untrained: dict[str, str]) -> list[str]:
    return [row] if row in untrained else [f"{row}-s{s}" for s in seeds]


def _pooling_of(model: str) -> str:
    """The pooling mode a saved encoder folder records."""
    import yaml

    from mgh_ray.encoder import CONFIG_FILE

    return str(yaml.safe_load(storage.read_text(storage.join(model, CONFIG_FILE)))["pooling"]["mode"])


def _level_orders(records: dict[str, Any], used: set[str]) -> dict[str, float]:
    """{records source: `level_order`} of the sources the arms train on (NaN where the records carry no
    reference-embedder similarities)."""
    from mgh_ray import quality

    out = {}
    for src in used:
        data = records[src]
        ds = quality.gated(data) if isinstance(data, str) else data
        out[src] = level_order(ds) if "levels_in_order" in ds.schema().names else float("nan")
    return out
