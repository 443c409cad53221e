"""Training benchmark: pairs/s of ATA vs mean pooling, of 1 vs 2 workers, and float32 vs bfloat16
autocast, in one run.

Each variant is a short real `training.train` run (same records, steps, batch and length); its speed
is the median `pairs_per_s` of metrics.jsonl after the first `warmup` steps (model start-up, first
allocations). The table holds ratios against the baseline (mean pooling, same worker count; and
1 worker, same pooling), so it compares like with like on whatever machine runs it. Target: ATA
costs under 10% over mean pooling (its extra work is one layer's q/k projections and n^2 scores).
Runs one after another see the machine's load drift: each variant runs twice, in ABBA order, and the
ATA cost is also measured in-process (`step_times`: the same batch, mean and ATA steps alternating),
and so is `train.precision` (float32 against bfloat16 autocast steps, alternating).
Every run also gives `input_cost`: how long its steps waited for Ray Data's split shard, over their
compute (the records reach the workers through Ray Data, as the pipeline's do). `poll_cost` times whole
runs (`train` from call to return: start-up, steps, checkpoints, shutdown) with Ray Train's controller
polling at Ray's default 2 s against `trainer.POLL_INTERVAL_S`, alternating.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage training
    python -c "from mgh_ray.benchmarks import training as b; from mgh_ray.training import TrainConfig; \\
               b.run(TrainConfig(steps=8), Path('runs/bench'))"

`seed_records` builds training records from the BBC seeds (negatives: other seeds' positives, L1 from
another category, L2-L4 from the same one) for benchmarks and tests, independent of synthesis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mgh_ray import config as config_io
from mgh_ray import trainer
from mgh_ray.benchmarks import save
from mgh_ray.records import DEFAULT_INSTRUCTION
from mgh_ray.training import TrainConfig, read_metrics, train

log = logging.getLogger(__name__)

INSTRUCTION = DEFAULT_INSTRUCTION


def seed_records(n: int, seed: int = 0, levels: int = 4) -> pd.DataFrame:
    """`n` training records from corpora's seeds, in the synthesis output schema."""
    from mgh_ray import corpora

    seeds = corpora.table("seeds")
    picked = seeds.sample(min(n, len(seeds)), random_state=seed).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    rows = []
    for r in picked.itertuples():
        other = seeds.positive[seeds.category != r.category].to_numpy()
        same = seeds.positive[(seeds.category == r.category) & (seeds.id != r.id)].to_numpy()
        negs = [rng.choice(other)] + list(rng.choice(same, size=levels - 1, replace=False))
        rows.append({"id": r.id, "query": r.query, "positive": r.positive,
                     **{f"neg_{k + 1}": str(t) for k, t in enumerate(negs)}, "instruction": INSTRUCTION})
    return pd.DataFrame(rows)


def _alternating(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each step function, run in turns (the order flipped every round) so that load
    from other processes hits all alike; round 0 warms up."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats + 1):
        for name in list(steps) if r % 2 else list(steps)[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def step_times(cfg: TrainConfig, records: pd.DataFrame, repeats: int = 6) -> dict[str, float]:
    """Median seconds of one forward+backward of the training step in this process on the same batch:
    mean vs ATA pooling (in `cfg.precision`), and float32 vs bfloat16 autocast (`cfg`'s pooling)."""
    from mgh_ray import devices
    from mgh_ray.batch_loss import contrastive_loss
    from mgh_ray.encoder import Encoder
    from mgh_ray.losses import InfoNCE

    with devices.threads(cfg.threads):  # this process's threads, given back after
        enc = Encoder.from_config(cfg.encoder).train()
        batch = records.head(cfg.batch_size)
        levels = np.ones(len(batch), dtype=int)
        loss_fn = InfoNCE(cfg.loss)
        pooling = cfg.encoder.pooling

        def step(mode: str, precision: str) -> Callable[[], None]:
            def run() -> None:
                enc.config.pooling = pooling.model_copy(update={"mode": mode})
                with devices.autocast(precision, enc, enc.device)[0]:
                    loss = contrastive_loss(enc, enc, loss_fn, batch, levels)
                loss.backward()
                enc.zero_grad(set_to_none=True)
            return run

        out = _alternating({m: step(m, cfg.precision) for m in ("mean", "ata")}, repeats)
        out.update(_alternating({p: step(pooling.mode, p) for p in ("float32", "bfloat16")}, repeats))
        enc.config.pooling = pooling
        return out


def _speed(out_dir: Path, warmup: int) -> float:
    m = read_metrics(out_dir)
    steady = m[m.step > warmup]
    return float((steady if len(steady) else m).pairs_per_s.median())


def input_cost(out_dir: Path) -> float:
    """What the streamed input cost over rows already in memory, on the same steps: the time every
    step waited for its batch (the split shard's `iter_batches`), over the steps' compute without it."""
    m = read_metrics(out_dir)
    return float(m.input_s.sum() / (m.step_s - m.input_s).sum())


def poll_cost(cfg: TrainConfig, records: pd.DataFrame, out_dir: Path, repeats: int = 2) -> dict[str, float]:
    """Median wall seconds of one whole one-worker run with the controller polling every 2 s (Ray's
    default, set as a user would) and every `trainer.POLL_INTERVAL_S` (what `trainer.fit` sets), in
    ABBA order."""
    import os

    if trainer.POLL_ENV in os.environ:
        raise ValueError(f"unset {trainer.POLL_ENV}: this benchmark compares Ray's default with the project's")
    variant = config_io.override(cfg, ["num_workers=1", "export=false", "fail_at_step=null"])
    walls: dict[str, list[float]] = {"ray_default_2s": [], "project": []}
    for r in range(repeats):
        for name in walls if r % 2 == 0 else list(walls)[::-1]:
            if name == "ray_default_2s":
                os.environ[trainer.POLL_ENV] = "2.0"
            try:
                t0 = time.perf_counter()
                train(variant, records, out_dir / f"poll_{name}_r{r}")
                walls[name].append(time.perf_counter() - t0)
            finally:
                os.environ.pop(trainer.POLL_ENV, None)
            log.info("benchmark poll %s, run %d: %.1f s", name, r, walls[name][-1])
    return {name: float(np.median(v)) for name, v in walls.items()}


def run(cfg: TrainConfig, out_dir: Path, records: pd.DataFrame | None = None,
        warmup: int = 2, repeats: int = 2) -> pd.DataFrame:
    """Train each variant briefly and tabulate pairs/s; writes benchmark_training.{md,json} in out_dir.

    Each worker count runs its pooling variants `repeats` times in ABBA order (mean, ATA, ATA, mean,
    ...), so that a steady drift in machine load hits both alike; a variant's speed is the mean of its
    runs, and `spread` is (max - min) / mean over them."""
    out_dir = Path(out_dir)
    records = records if records is not None else seed_records(max(32, 4 * cfg.batch_size * 2), cfg.seed)
    runs: dict[tuple[str, int], list[float]] = {}
    inputs: dict[tuple[str, int], list[float]] = {}
    for workers in (1, 2):
        for r in range(repeats):
            for mode in ("mean", "ata") if r % 2 == 0 else ("ata", "mean"):
                variant = config_io.override(cfg, [f"encoder.pooling.mode={mode}", f"num_workers={workers}",
                                                   "export=false", "fail_at_step=null"])
                run_dir = out_dir / f"{mode}_{workers}w_r{r}"
                train(variant, records, run_dir)
                runs.setdefault((mode, workers), []).append(_speed(run_dir, warmup))
                inputs.setdefault((mode, workers), []).append(input_cost(run_dir))
                log.info("benchmark %s, %d worker(s), run %d: %.2f pairs/s", mode, workers, r,
                         runs[(mode, workers)][-1])
    rows = [{"pooling": mode, "workers": workers, "runs": len(v), "pairs_per_s": float(np.mean(v)),
             "spread": float((max(v) - min(v)) / np.mean(v)),
             "input_cost": float(np.mean(inputs[(mode, workers)]))}
            for (mode, workers), v in runs.items()]
    table = pd.DataFrame(rows)  # (mean, 1), (ata, 1), (mean, 2), (ata, 2): the order `runs` was filled in
    speed = {(r.pooling, r.workers): r.pairs_per_s for r in table.itertuples()}
    table["vs_mean_same_workers"] = [speed[(r.pooling, r.workers)] / speed[("mean", r.workers)]
                                     for r in table.itertuples()]
    table["vs_1_worker_same_pooling"] = [speed[(r.pooling, r.workers)] / speed[(r.pooling, 1)]
                                         for r in table.itertuples()]
    overhead = {w: speed[("mean", w)] / speed[("ata", w)] - 1 for w in (1, 2)}
    step = step_times(cfg, records)
    step_overhead = step["ata"] / step["mean"] - 1
    polls = poll_cost(cfg, records, out_dir, repeats)
    md = table.to_markdown(index=False, floatfmt=".3f")
    summary = (f"ATA cost over mean pooling (target < 10%): {step_overhead:+.1%} per training step in one "
               f"process, alternating ({step['mean']:.2f} s mean vs {step['ata']:.2f} s ATA, the cleaner "
               f"figure); {overhead[1]:+.1%} (1 worker) and {overhead[2]:+.1%} (2 workers) from the Ray "
               f"Train runs ({repeats} each, ABBA order; they run one after another, so load drift that is "
               f"not linear still shows: see the spread column). Setup: "
               f"{cfg.encoder.backbone}, batch {cfg.batch_size}/worker, max_length {cfg.encoder.max_length}, "
               f"{cfg.steps} steps, median after {warmup} warm-up steps. `input_cost`: the time the steps "
               f"waited for their batches from Ray Data's split shards, over the steps' compute without it "
               f"(what streaming costs over rows already in memory; target 10% or less): "
               f"{table.input_cost.max():.1%} at most. Precision, in one process, alternating: a "
               f"{cfg.encoder.pooling.mode} step under bfloat16 autocast takes "
               f"{step['bfloat16'] / step['float32']:.2f}x the time of float32 ({step['bfloat16']:.2f} s "
               f"vs {step['float32']:.2f} s; the runs above compute in precision {cfg.precision!r}). A whole "
               f"one-worker run of {cfg.steps} steps, call to return: {polls['project']:.1f} s with Ray Train's "
               f"controller polling every {trainer.POLL_INTERVAL_S} s (`trainer.fit`), {polls['ray_default_2s']:.1f} s at "
               f"Ray's default 2 s: {polls['project'] / polls['ray_default_2s']:.2f}x ({repeats} each, ABBA).")
    report = {"rows": table.to_dict(orient="records"), "runs": {f"{m}_{w}w": v for (m, w), v in runs.items()},
              "ata_overhead_ray_runs": overhead,
              "step_seconds_in_process": step, "ata_overhead_step": step_overhead,
              "bf16_vs_float32_step": step["bfloat16"] / step["float32"],
              "run_wall_seconds_by_poll": polls,
              "config": cfg.model_dump(mode="json")}
    save(out_dir, "training", f"# Training throughput\n\n{md}\n\n{summary}\n", report)
    return table
