"""Training: Ray Train DDP contrastive learning of the encoder over MGH records, with the curriculum.

`train(cfg, records, out_dir)` runs a `TorchTrainer` (N workers; gloo on CPU, nccl on GPU) on the
Ray cluster already up (or a local one). Records reach the workers as Ray Data shards; each worker
keeps its shard (sorted by id) and draws batches from seeded epoch permutations, so the data cursor
is the step itself. Each step: queries (with their E5 instruction), positives and the hard negative
of the level the curriculum picks are embedded in one forward (one DDP forward per backward), then
InfoNCE over candidates gathered from every worker.

Checkpoints (every `checkpoint_every` steps and at the end) hold the adapter (`model/`, an
`Encoder.save` folder), optimizer, scheduler, curriculum cursor (rank 0) and each rank's RNG states.
`FailureConfig(max_failures)` restarts failed workers from the latest one, at the same step and stage.
A rerun with the same `out_dir` is a new driver on the same Ray Train run (same storage path and
name): it resumes from the latest checkpoint, and returns at once when training had finished.

Outputs under out_dir: config.yaml (resolved), metrics.jsonl (one line per step: loss, stage, level,
lr, pairs_per_s), <run_name>/ (Ray Train storage), model/ (final `Encoder.save`), export/ (merged,
adapter). Failure injection for tests, off by default: `fail_at_step=k` or env MGH_RAY_FAIL_AT_STEP=k
makes worker `fail_rank` exit hard at step k, once per out_dir.

    from mgh_ray.training import TrainConfig, train
    model_dir = train(TrainConfig(), records, Path("runs/tiny/train"))
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from mgh_ray import config as config_io
from mgh_ray.config import Section
from mgh_ray.curriculum import Curriculum, CurriculumConfig
from mgh_ray.encoder import Encoder, EncoderConfig, LoraConfig
from mgh_ray.losses import LossConfig

log = logging.getLogger(__name__)

FAIL_ENV = "MGH_RAY_FAIL_AT_STEP"


def _tiny_encoder() -> EncoderConfig:
    # CPU preset: short texts, LoRA on the top 8 of 30 blocks (backward stops there), ATA pooling
    return EncoderConfig(max_length=64, lora=LoraConfig(r=16, alpha=32, top_layers=8))


class TrainConfig(Section):
    """Defaults: the tiny CPU preset (SmolLM2-135M + LoRA + ATA, 2 gloo workers, minutes here).
    GPU cluster: use_gpu=true, num_workers=16, encoder.backbone=<hub id>, encoder.dtype=bfloat16,
    encoder.gradient_checkpointing=true, batch_size=64, steps=1000, max_length=512."""

    encoder: EncoderConfig = Field(default_factory=_tiny_encoder)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    num_workers: int = Field(2, ge=1, strict=True)
    use_gpu: bool = Field(False, strict=True)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, strict=True)  # torch threads; None = cpus_per_worker
    steps: int = Field(40, ge=1, strict=True)
    batch_size: int = Field(4, ge=1, strict=True)  # queries per worker per step
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(4, ge=0, strict=True)  # steps of linear warmup
    schedule: Literal["constant", "linear", "cosine"] = "linear"  # after warmup, toward 0 at `steps`
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

    @property
    def threads(self) -> int:
        """Torch threads per worker: threads_per_worker, else cpus_per_worker rounded down, at least 1."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


RECORD_COLUMNS = ["id", "query", "positive", "instruction"]


def negative_columns(levels: int) -> list[str]:
    return [f"neg_{k}" for k in range(1, levels + 1)]


def check_records(records: pd.DataFrame, cfg: TrainConfig) -> pd.DataFrame:
    """The columns training reads, as str; a clear error when the synthesis output lacks one."""
    cols = RECORD_COLUMNS + negative_columns(cfg.curriculum.levels)
    missing = [c for c in cols if c not in records.columns]
    if missing:
        raise ValueError(f"records lack columns {missing}; expected {cols} (the synthesis stage's output)")
    if len(records) < cfg.num_workers:
        raise ValueError(f"{len(records)} records cannot feed {cfg.num_workers} workers")
    return records[cols].astype(str).reset_index(drop=True)


# ------------------------------------------------------------------ worker side


class ShardSampler:
    """Batches of this worker's rows; batch t is a pure function of (seed, rank, t), so a restored
    run draws exactly the batches the first run would have drawn."""

    def __init__(self, rows: pd.DataFrame, batch_size: int, seed: int, rank: int) -> None:
        self.rows = rows.sort_values("id").reset_index(drop=True)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            self._perms = {epoch: rng.permutation(len(self.rows))}
        return self._perms[epoch]

    def batch(self, step: int) -> pd.DataFrame:
        n = len(self.rows)
        pos = range(step * self.batch_size, (step + 1) * self.batch_size)
        return self.rows.iloc[[int(self._perm(p // n)[p % n]) for p in pos]]


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


def _maybe_fail(cfg: TrainConfig, step: int, rank: int, out_dir: Path) -> None:
    at = os.environ.get(FAIL_ENV) or cfg.fail_at_step
    marker = out_dir / ".failure_injected"
    if at is None or int(at) != step or rank != cfg.fail_rank or marker.exists():
        return
    marker.write_text(f"step {step} rank {rank}\n")
    # Ray's controller collects reports every health-check interval; a death right after a report
    # can lose that report's checkpoint (Ray then resumes from the one before, also correct). Wait
    # so that the test sees the deterministic case.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
    log.warning("injected failure: worker %d exits at step %d", rank, step)
    os._exit(17)  # a hard death, as an OOM kill or a lost node would look to Ray


def _metrics_file(out_dir: Path, resume_step: int) -> Path:
    """metrics.jsonl without lines of steps that will run again (a restart replays them)."""
    path = out_dir / "metrics.jsonl"
    if path.exists():
        # "step" counts completed steps (1-based): lines up to resume_step hold, later ones rerun
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(ln + "\n" for ln in keep))
    return path


def train_loop(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from mgh_ray.losses import InfoNCE

    cfg = TrainConfig.model_validate(loop_config["cfg"])
    out_dir = Path(loop_config["out_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    shard = ray.train.get_dataset_shard("train")
    rows = pd.concat(list(shard.iter_batches(batch_format="pandas", batch_size=4096)), ignore_index=True)
    sampler = ShardSampler(rows, cfg.batch_size, cfg.seed, rank)
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
    # every LoRA parameter takes part in each forward: no unused-parameter search (ANCHORS R11)
    model = ray.train.torch.prepare_model(encoder, parallel_strategy_kwargs={"find_unused_parameters": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    loss_fn = InfoNCE(cfg.loss)
    metrics_path = _metrics_file(out_dir, start) if rank == 0 else None
    if rank == 0:
        log.info("training %d steps from step %d (stage %d); plan %s", cfg.steps, start, curriculum.stage,
                 curriculum.plan())

    b = cfg.batch_size
    device = ray.train.torch.get_device()
    for step in range(start, cfg.steps):
        _maybe_fail(cfg, step, rank, out_dir)
        t0 = time.perf_counter()
        stage = curriculum.stage
        levels = curriculum.levels(world * b)[rank * b:(rank + 1) * b]  # (b,): this worker's slice
        loss = contrastive_loss(model, encoder, loss_fn, sampler.batch(step), levels, device)
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
                   "pairs_per_s": world * b / elapsed, "step_s": elapsed, "resumed_from": start}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if (step + 1) % cfg.log_every == 0 or step == start:
                log.info("step %d/%d stage %d loss %.4f lr %.2e %.1f pairs/s", step + 1, cfg.steps, stage + 1,
                         metrics["loss"], metrics["lr"], metrics["pairs_per_s"])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _report_with_checkpoint(metrics, encoder, optimizer, scheduler, curriculum, rank)
        else:
            ray.train.report(metrics)


def contrastive_loss(model: torch.nn.Module, encoder: Encoder, loss_fn: torch.nn.Module, batch: pd.DataFrame,
                     levels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """InfoNCE of one worker's batch: each query (with its instruction) against the positives and the
    level-`levels[i]` hard negatives of every worker. `model` is `encoder` or its DDP wrapper."""
    from mgh_ray.losses import text_keys

    b = len(batch)
    use_negs = getattr(getattr(loss_fn, "cfg", None), "hard_negatives", True)
    negs = [batch[f"neg_{lv}"].iloc[i] for i, lv in enumerate(levels)] if use_negs else []
    q = encoder.tokenize(list(batch["query"]), list(batch["instruction"]))
    d = encoder.tokenize(list(batch["positive"]) + negs)
    # one forward for queries and documents together: DDP expects one forward per backward
    inputs = _concat(q, d, encoder.tokenizer.padding_side == "left", encoder.tokenizer.pad_token_id)
    emb = model(**{k: v.to(device) for k, v in inputs.items()})  # (3b, dim), or (2b, dim) in-batch only
    qe, pe = emb[:b], emb[b:2 * b]  # (b, dim), (b, dim)
    p_keys = text_keys(list(batch["positive"])).to(device)
    if not use_negs:
        return loss_fn(qe, pe, None, p_keys, None)
    ne, n_keys = emb[2 * b:].unsqueeze(1), text_keys(negs).view(b, 1)  # (b, 1, dim), (b, 1)
    return loss_fn(qe, pe, ne, p_keys, n_keys.to(device))


def _concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], left: bool,
            pad_id: int) -> dict[str, torch.Tensor]:
    """Stack two tokenised batches (queries, documents), padding the shorter on the tokenizer's side."""
    seq = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out: dict[str, torch.Tensor] = {}
    keys = ["input_ids", "attention_mask"] + (["pool_mask"] if "pool_mask" in a or "pool_mask" in b else [])
    for key in keys:
        parts = []
        for part in (a, b):
            t = part.get(key, part["attention_mask"])  # no pool_mask: every real token pools
            t = t.long() if key == "input_ids" else t.bool()
            pad = seq - t.shape[1]
            value = pad_id if key == "input_ids" else 0
            parts.append(torch.nn.functional.pad(t.long(), (pad, 0) if left else (0, pad), value=value))
        out[key] = torch.cat(parts)
    return out


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


def train(cfg: TrainConfig, records: pd.DataFrame, out_dir: Path) -> Path:
    """Train on `records`; returns `out_dir / "model"` (an `Encoder.save` folder, also exported)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(out_dir).resolve()
    model_dir, done = out_dir / "model", out_dir / "done.json"
    finished = done.is_file() and json.loads(done.read_text())["steps"] == cfg.steps
    if finished and (model_dir / "encoder.yaml").is_file():
        log.info("%s already holds a finished run of %d steps; not training again", out_dir, cfg.steps)
        return model_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    config_io.save(cfg, out_dir / "config.yaml")
    rows = check_records(records, cfg)
    if not ray.is_initialized():
        ray.init()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=cfg.run_name, storage_path=str(out_dir),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets={"train": ray.data.from_pandas(rows)},
    )
    log.info("training: %d workers (%s), %d steps x %d pairs per worker; storage %s", cfg.num_workers,
             backend, cfg.steps, cfg.batch_size, out_dir / cfg.run_name)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training under {out_dir} finished without a checkpoint")
    tmp = out_dir / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.replace(model_dir)
    if cfg.export:
        Encoder.load(model_dir).export(out_dir / "export")
    done.write_text(json.dumps({"steps": cfg.steps, "checkpoint": result.checkpoint.path}))
    log.info("trained model in %s%s", model_dir, f", export in {out_dir / 'export'}" if cfg.export else "")
    return model_dir


def read_metrics(out_dir: Path) -> pd.DataFrame:
    """metrics.jsonl as a table (one row per step)."""
    path = Path(out_dir) / "metrics.jsonl"
    return pd.DataFrame([json.loads(ln) for ln in path.read_text().splitlines() if ln])
