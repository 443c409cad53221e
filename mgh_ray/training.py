"""Training: Ray Train DDP contrastive learning of the encoder over MGH records, with the curriculum.

`train(cfg, records, out_dir)` runs a `TorchTrainer` (N workers; gloo on CPU, nccl on GPU) on the
Ray cluster already up (or a local one). `records` is a records folder (path or URI: its gated view,
`quality.gated`) or a ray.data.Dataset of training rows; it reaches the workers as Ray Data
streaming-split shards, read batch by batch (`iter_batches`), never materialised whole on the
driver; a worker keeps its shard after the first pass when the shard holds at most `keep_rows` rows
(each streamed pass re-runs the whole read, which costs small runs more than their steps; see
`train_data.batch_stream`), and streams every pass otherwise. Each step:
queries (with their E5 instruction), positives and the hard negative(s) of the level(s) the
curriculum picks are embedded in one forward (one DDP forward per backward), then InfoNCE over
candidates gathered from every worker (`batch_loss.contrastive_loss`). Every record holds all
levels' negatives, so the curriculum chooses the column per example: one stream serves every stage.

Checkpoints (every `checkpoint_every` steps and at the end) hold the adapter (`model/`, an
`Encoder.save` folder), optimizer, scheduler, curriculum cursor (rank 0) and each rank's RNG states.
Ray Train's `storage_path` is `out_dir` itself (a path or a URI: checkpoints go to object storage).
`FailureConfig(max_failures)` restarts failed workers from the latest one.

What a restart guarantees. Exactly restored: the step, the curriculum cursor (stage, levels of every
later step, its RNG), optimizer, scheduler, the adapter and each rank's RNG. The data stream is not
replayed: Ray Data does not promise that a streaming split hands a worker the same rows twice, so a
restored run starts a new pass over all gated records, in an order seeded by (seed, resume step).
Rows of the interrupted pass may repeat; none is lost: every pass visits every record once (up to
`drop_last` of fewer than one global batch). `log_batch_ids=true` writes each step's row ids into
metrics.jsonl, which the tests use to check exactly this.

A rerun with the same `out_dir` is a new driver on the same Ray Train run (same storage path and
name): it resumes from the latest checkpoint, and returns at once when training had finished. Once
a checkpoint exists, the rerun must bring the settings the run was started with (config.yaml):
another lr, step count or curriculum would continue the saved optimizer and schedule under new
rules, a model neither config describes, so it is refused with the changed fields named. Only the
fields in `RESUMABLE` (how it runs, not what it trains) may change.

Outputs under out_dir: config.yaml (resolved), metrics.jsonl (one line per step: loss, stage, level,
lr, pairs_per_s; written by rank 0 with each checkpoint), <run_name>/ (Ray Train storage), model/
(final `Encoder.save`), export/ (merged, adapter; made by a Ray task with the workers' resources,
never in the driver). Failure injection for tests, off by default: `fail_at_step=k` or env
MGH_RAY_FAIL_AT_STEP=k makes worker `fail_rank` exit hard at step k, once per out_dir.

    from mgh_ray.training import TrainConfig, train
    model_dir = train(TrainConfig(), "runs/tiny/synthesize", "runs/tiny/train")
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from mgh_ray import devices, logs, storage
from mgh_ray.batch_loss import contrastive_loss
from mgh_ray.config import MAX_COUNT, Section
from mgh_ray.curriculum import Curriculum, CurriculumConfig
from mgh_ray.encoder import Encoder, EncoderConfig, LoraConfig
from mgh_ray.layout import RunLayout, check_same_settings, save_config
from mgh_ray.losses import LossConfig
from mgh_ray.train_data import batch_stream, check_dataset, training_dataset

log = logging.getLogger(__name__)

FAIL_ENV = "MGH_RAY_FAIL_AT_STEP"

# TrainConfig fields a resumed run may change: operations and failure handling, never the model, the
# data order or the optimisation (num_workers stays: each rank's RNG state is in the checkpoint)
RESUMABLE = frozenset({"keep_rows", "cpus_per_worker", "threads_per_worker",
                       "max_failures", "log_every", "export",
                       "checkpoint_every", "keep_checkpoints", "fail_at_step", "fail_rank", "log_batch_ids"})


def _tiny_encoder() -> EncoderConfig:
    # CPU preset: short texts, LoRA on the top 8 of 30 blocks (backward stops there), ATA pooling
    return EncoderConfig(max_length=64, lora=LoraConfig(r=16, alpha=32, top_layers=8))


class TrainConfig(Section):
    """Defaults: the tiny CPU preset (SmolLM2-135M + LoRA + ATA, 2 gloo workers, minutes here).
    GPU cluster: use_gpu=true, num_workers=16, encoder.backbone=<hub id>, encoder.dtype=bfloat16,
    encoder.gradient_checkpointing=true, batch_size=64, steps=1000, max_length=512."""

    runtime_fields: ClassVar[frozenset[str]] = RESUMABLE - {"export"}  # export changes a finished stage's output
    encoder: EncoderConfig = Field(default_factory=_tiny_encoder)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    num_workers: int = Field(2, ge=1, le=MAX_COUNT, strict=True)
    use_gpu: bool = Field(False, strict=True)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, strict=True)  # torch threads; None = cpus_per_worker
    steps: int = Field(40, ge=1, strict=True)
    # a worker whose shard holds at most this many rows reads it once and keeps it (`train_data.batch_stream`);
    # larger shards stream from storage every pass. 0: always stream
    keep_rows: int = Field(20_000, ge=0, strict=True)
    batch_size: int = Field(4, ge=1, strict=True)  # queries per worker per step
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(4, ge=0, strict=True)  # steps of linear warmup
    # auto: the forward under bfloat16 autocast where the device does bf16 natively and the weights are
    # float32, else as the weights are (`devices.pick_autocast`)
    precision: devices.Precision = "auto"
    # after warmup: constant (LLM2Vec's supervised stage), or linear/cosine decay toward 0 at `steps`.
    # Constant is the default: a decay starves the curriculum's last, hardest stage (linear leaves it
    # 28% of the peak rate or less) while `reverse` sees the hardest negatives at full rate, which
    # would confound the schedule ablation with the learning rate
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1, strict=True)
    keep_checkpoints: int = Field(2, ge=1, strict=True)
    seed: int = Field(0, strict=True)
    max_failures: int = Field(2, ge=-1, strict=True)
    run_name: str = "train"
    log_every: int = Field(5, ge=1, strict=True)
    export: bool = True  # write export/ (merged + adapter + sentence-transformers) after training
    fail_at_step: int | None = Field(None, ge=0, strict=True)  # testing only: worker `fail_rank` dies at this step, once
    fail_rank: int = Field(1, ge=0, strict=True)
    log_batch_ids: bool = False  # write every step's row ids (all ranks) into metrics.jsonl

    @property
    def threads(self) -> int:
        """Torch threads per worker: threads_per_worker, else cpus_per_worker rounded down, at least 1."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


# ------------------------------------------------------------------ worker side


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return max(0.0, 1 - progress) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def maybe_fail(fail_at_step: int | None, fail_rank: int, step: int, rank: int, out_dir: str) -> None:
    """Failure injection for tests (training and adaptation): worker `fail_rank` exits hard at
    `fail_at_step` (or env MGH_RAY_FAIL_AT_STEP), once per out_dir."""
    at = os.environ.get(FAIL_ENV) or fail_at_step
    marker = storage.join(out_dir, "_failure_injected")
    if at is None or int(at) != step or rank != fail_rank or storage.exists(marker):
        return
    storage.write_text(marker, f"step {step} rank {rank}\n")
    # Ray's controller collects reports every poll of its workers (`trainer`); a death right after a report
    # can lose that report's checkpoint (Ray then resumes from the one before, also correct). Wait
    # so that the test sees the deterministic case.
    from mgh_ray.trainer import poll_interval_s

    time.sleep(2 * poll_interval_s() + 1)
    log.warning("injected failure: worker %d exits at step %d", rank, step)
    os._exit(17)  # a hard death, as an OOM kill or a lost node would look to Ray


def _metrics_lines(out_dir: str, resume_step: int) -> list[str]:
    """metrics.jsonl lines of steps that will not run again (a restart replays later ones)."""
    loc = RunLayout.metrics(out_dir)
    if not storage.is_file(loc):
        return []
    # "step" counts completed steps (1-based): lines up to resume_step hold, later ones rerun
    return [ln for ln in storage.read_text(loc).splitlines() if ln and json.loads(ln)["step"] <= resume_step]


def train_loop(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from mgh_ray.losses import InfoNCE

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    out_dir = loop_config["out_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logs.setup(rank=rank)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    shard = ray.train.get_dataset_shard("train")
    curriculum = Curriculum(cfg.curriculum, cfg.steps, cfg.seed)

    encoder = Encoder.from_config(cfg.encoder)
    ckpt = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            encoder.load_adapter(d / "model")
            state = torch.load(d / "train_state.pt", map_location="cpu", weights_only=False)
            curriculum.load_state_dict(json.loads((d / "cursor.json").read_text()))
            rng_file = d / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    start = curriculum.step
    batches = batch_stream(shard, cfg.batch_size, cfg.seed, rank, start, keep_rows=cfg.keep_rows)
    # every LoRA parameter takes part in each forward: no unused-parameter search (with it on, DDP
    # walks the graph every step and errors on parameters used twice under gradient checkpointing)
    model = ray.train.torch.prepare_model(encoder, parallel_strategy_kwargs={"find_unused_parameters": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    loss_fn = InfoNCE(cfg.loss)
    metric_lines = _metrics_lines(out_dir, start) if rank == 0 else []
    if rank == 0:
        log.info("training %d steps from step %d (stage %d); plan %s", cfg.steps, start, curriculum.stage,
                 curriculum.plan())

    b = cfg.batch_size
    device = ray.train.torch.get_device()
    # `compute` goes into every step's metrics: what `precision: auto` chose on this node
    amp, compute = devices.autocast(cfg.precision, encoder, device)
    if rank == 0:
        log.info("training computes in %s (precision %s)", compute, cfg.precision)
    for step in range(start, cfg.steps):
        maybe_fail(cfg.fail_at_step, cfg.fail_rank, step, rank, out_dir)
        t0 = time.perf_counter()
        stage = curriculum.stage
        levels = curriculum.levels(world * b)[rank * b:(rank + 1) * b]  # (b,): this worker's slice
        batch = next(batches)
        # the step's wait for its input (Ray Data's split shard): what streaming costs over rows in memory
        input_s = time.perf_counter() - t0
        with amp:  # the forward only: backward runs each op in the dtype its forward chose
            loss = contrastive_loss(model, encoder, loss_fn, batch, levels, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        curriculum.advance()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        elapsed = time.perf_counter() - t0
        metrics = {"step": step + 1, "loss": float(mean_loss), "stage": stage + 1,
                   "level": float(np.mean(levels)), "lr": scheduler.get_last_lr()[0],
                   "pairs_per_s": world * b / elapsed, "step_s": elapsed, "input_s": input_s,
                   "resumed_from": start, "compute": compute}
        if cfg.log_batch_ids:
            ids = [None] * world
            if world > 1:
                dist.all_gather_object(ids, batch["id"].tolist())
            else:
                ids = [batch["id"].tolist()]
            metrics["ids"] = ids
        if rank == 0:
            metric_lines.append(json.dumps(metrics))
            if (step + 1) % cfg.log_every == 0 or step == start:
                log.info("step %d/%d stage %d loss %.4f lr %.2e %.1f pairs/s", step + 1, cfg.steps, stage + 1,
                         metrics["loss"], metrics["lr"], metrics["pairs_per_s"])
        # Only checkpoints go to Ray Train: a report waits for its controller's next poll of the workers
        # (`trainer`), which would hold every step shorter than the poll interval; the step lines are
        # metrics.jsonl's
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if rank == 0:  # the metrics of every step so far, written with the checkpoint that ends them
                storage.write_text(RunLayout.metrics(out_dir), "\n".join(metric_lines) + "\n")
            report = {k: v for k, v in metrics.items() if k != "ids"}
            _report_with_checkpoint(report, encoder, optimizer, scheduler, curriculum, rank)


def _report_with_checkpoint(metrics: dict[str, Any], encoder: Encoder, optimizer, scheduler,
                            curriculum: Curriculum, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if rank == 0:  # replicas are identical under DDP; the cursor is shared by construction
            encoder.save(d / "model")
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       d / "train_state.pt")
            (d / "cursor.json").write_text(json.dumps(curriculum.state_dict()))
        torch.save(_rng_state(), d / f"rng_rank{rank}.pt")  # per-rank dropout streams; merged by Ray
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ------------------------------------------------------------------ driver side


def _export(model_loc: str, export_loc: str, prompts: dict[str, str]) -> str:
    """Merge and export a trained model folder with its query prompts (a Ray task: the model loads
    on a worker)."""
    with tempfile.TemporaryDirectory() as tmp:
        from mgh_ray import export

        export.write(Encoder.load(storage.local_dir(model_loc)), Path(tmp) / "export", prompts=prompts)
        return storage.upload_dir(Path(tmp) / "export", export_loc)


def _check_same_run(cfg: TrainConfig, out_dir: str) -> None:
    """Once the run has a checkpoint (metrics.jsonl is written with each one), it resumes only with the
    settings it was started with, but for how it runs (`RESUMABLE`)."""
    if storage.is_file(RunLayout.metrics(out_dir)):
        check_same_settings(cfg, out_dir, set(TrainConfig.model_fields) - RESUMABLE, "training run")


def train(cfg: TrainConfig, records: Any, out_dir: str | Path) -> str:
    """Train on `records` (a records folder, a ray.data.Dataset, or a small DataFrame); returns the
    location of `out_dir/model` (an `Encoder.save` folder, also exported to `out_dir/export`)."""
    import ray
    import ray.data

    from mgh_ray import trainer

    out_dir = storage.normalize(out_dir)
    _check_same_run(cfg, out_dir)
    model_loc, export_loc, done = (storage.join(out_dir, "model"), storage.join(out_dir, "export"), RunLayout.done(out_dir))
    finished = storage.is_file(done) and json.loads(storage.read_text(done))["steps"] == cfg.steps
    if finished and storage.is_file(storage.join(model_loc, "encoder.yaml")):
        log.info("%s already holds a finished run of %d steps; not training again", out_dir, cfg.steps)
        return model_loc
    storage.check_writable(out_dir)
    save_config(cfg, out_dir)
    if not ray.is_initialized():
        ray.init()
    ds = training_dataset(records)
    counts = check_dataset(ds, cfg.curriculum.levels, cfg.num_workers, cfg.batch_size)
    n = sum(counts.values())
    backend = trainer.resolve_backend(cfg.backend, cfg.use_gpu)
    log.info("training: %d workers (%s), %d steps x %d pairs per worker over %d records; storage %s",
             cfg.num_workers, backend, cfg.steps, cfg.batch_size, n, storage.join(out_dir, cfg.run_name))
    before, start = _steps_written(out_dir), time.time()
    result = trainer.fit(train_loop, {"cfg": cfg.model_dump(mode="json"), "out_dir": out_dir}, name=cfg.run_name,
                         storage_path=out_dir, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                         keep_checkpoints=cfg.keep_checkpoints, backend=backend, datasets={"train": ds})
    _log_time(out_dir, before, time.time() - start)
    if result.checkpoint is None:
        raise RuntimeError(f"training under {out_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:  # adapter-sized files; no model is loaded here
        storage.upload_dir(Path(d) / "model", model_loc)
    if cfg.export:
        from mgh_ray.export import query_prompts

        prompts = query_prompts({k: v for k, v in counts.items() if k is not None})
        remote = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0)(_export)
        ray.get(remote.remote(model_loc, export_loc, prompts))
    storage.write_text(done, json.dumps({"steps": cfg.steps, "checkpoint": result.checkpoint.path}))
    log.info("trained model in %s%s", model_loc, f", export in {export_loc}" if cfg.export else "")
    return model_loc


def _steps_written(out_dir: str) -> int:
    return int(read_metrics(out_dir).step.max()) if storage.is_file(RunLayout.metrics(out_dir)) else 0


def _log_time(out_dir: str, before: int, wall_s: float) -> None:
    """Where this fit's wall time went: steps (of which waiting for input) and the rest (worker and
    model start, DDP set-up, checkpoints, shutdown)."""
    m = read_metrics(out_dir) if storage.is_file(RunLayout.metrics(out_dir)) else pd.DataFrame()
    m = m[m.step > before] if len(m) else m
    if not len(m) or "input_s" not in m:
        return
    steps_s, input_s = float(m.step_s.sum()), float(m.input_s.sum())
    log.info("training took %.0f s: %d steps %.0f s (waiting for input %.1f s, %.1f%% of the steps' "
             "compute), start-up, checkpoints and shutdown %.0f s", wall_s, len(m), steps_s, input_s,
             100 * input_s / max(steps_s - input_s, 1e-9), wall_s - steps_s)


def read_metrics(out_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a table (one row per step)."""
    text = storage.read_text(RunLayout.metrics(out_dir))
    return pd.DataFrame([json.loads(ln) for ln in text.splitlines() if ln])
