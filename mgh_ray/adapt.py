"""Adaptation: masked next-token prediction (MNTP), LLM2Vec's step between "make the decoder bidirectional"
and contrastive training.

A decoder LLM was pretrained under a causal mask; switched to bidirectional attention (`encoder.attention:
bidirectional`) its tokens suddenly see their right context, which its weights never learnt to use.
LLM2Vec (BehnamGhader et al., 2024) adapts it with MNTP before any contrastive step: a fraction
`mask_probability` of the text tokens is corrupted (of those, 80% become the mask token, 10% a random
token, 10% stay: BERT's recipe, as LLM2Vec's collator applies it), and the model predicts the original
token at position i from its output at position i - 1, through its own, frozen LM head. The mask token
is the tokenizer's own, or `mask_token` ("_", LLM2Vec's choice for decoders without one). LoRA (peft)
on every layer's linear maps learns the adaptation; the adapter is then merged into the backbone as the
base that contrastive training starts from (`EncoderConfig.base_adapter`).

Text: the run's own seed file (queries and positives, each source in equal share), in the input format
the encoder reads documents with; never an evaluation table. Batches are a function of (seed, rank,
step), so a resumed run draws exactly the batches the interrupted one would have.

Runs on Ray Train like `training`: DDP workers, checkpoints every `checkpoint_every` steps (adapter,
optimizer, scheduler, step; nothing else is random) under `out_dir`; a rerun resumes from the latest one, or
returns at once when the stage finished. Outputs under out_dir: adapter/ (the LoRA of the headless
backbone, with adapted.yaml naming the attention it was adapted under), metrics.jsonl (loss and masked-
token accuracy per step), report.md and loss.png (the loss curve), config.yaml.

    from mgh_ray.adapt import AdaptConfig, adapt
    adapter = adapt(AdaptConfig(steps=200), encoder_cfg, "runs/small/fetch/seeds.parquet", "runs/small/adapt")
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from mgh_ray import devices, logs, storage
from mgh_ray.config import MAX_COUNT, Section
from mgh_ray.backbone import ADAPTED_FILE
from mgh_ray.encoder import EncoderConfig
from mgh_ray.layout import RunLayout

log = logging.getLogger(__name__)

# AdaptConfig fields a resumed run may change: how it runs, never what it learns
RESUMABLE = frozenset({"cpus_per_worker", "threads_per_worker", "max_failures", "checkpoint_every", "log_every",
                       "fail_at_step", "fail_rank"})


class AdaptConfig(Section):
    """MNTP adaptation of a bidirectional decoder (skipped for causal encoders and when steps is 0).
    Defaults: the tiny CPU preset (SmolLM2-135M, 2 gloo workers)."""

    runtime_fields: ClassVar[frozenset[str]] = RESUMABLE
    steps: int = Field(100, ge=0, strict=True)
    batch_size: int = Field(8, ge=1, strict=True)  # texts per worker per step
    max_length: int = Field(96, ge=8, strict=True)  # tokens per text, EOS included
    lr: float = Field(2e-4, gt=0)
    warmup: int = Field(10, ge=0, strict=True)  # steps of linear warmup; constant after
    mask_probability: float = Field(0.2, gt=0, lt=1)  # LLM2Vec's value for Llama-family decoders
    mask_token: str = "_"  # when the tokenizer has none (decoders), as LLM2Vec does
    lora_r: int = Field(16, ge=1, strict=True)
    lora_alpha: int = Field(32, ge=1, strict=True)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: devices.Precision = "auto"  # as train.precision: bf16 autocast where the device does bf16
    num_workers: int = Field(2, ge=1, le=MAX_COUNT, strict=True)
    use_gpu: bool = Field(False, strict=True)
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, strict=True)
    checkpoint_every: int = Field(25, ge=1, strict=True)
    log_every: int = Field(10, ge=1, strict=True)
    max_failures: int = Field(2, ge=-1, strict=True)
    seed: int = Field(0, strict=True)
    fail_at_step: int | None = Field(None, ge=0, strict=True)  # testing only: worker `fail_rank` dies here, once
    fail_rank: int = Field(0, ge=0, strict=True)

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


def needed(encoder: EncoderConfig, cfg: AdaptConfig) -> bool:
    """Whether this encoder gets an adaptation stage: a bidirectional decoder and steps > 0."""
    return encoder.attention == "bidirectional" and cfg.steps > 0


# ------------------------------------------------------------------ masking


def seed_texts(seeds: pd.DataFrame, n: int, seed: int) -> list[str]:
    """Up to `n` distinct texts from a seed table's queries and positives, each source (a `source`
    column, else one) in equal share, in a seeded order."""
    frames = [g for _, g in seeds.groupby("source")] if "source" in seeds else [seeds]
    per = max(1, n // len(frames))
    out: list[str] = []
    for i, frame in enumerate(frames):
        texts = pd.unique(pd.concat([frame["query"], frame["positive"]]).astype(str))
        texts = [t for t in texts if t.strip()]
        rng = np.random.default_rng(seed + i)
        out += [texts[j] for j in rng.permutation(len(texts))[:per]]
    return out


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab: int, prob: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: (corrupted ids, labels) where labels hold the original id at the chosen
    positions and -100 elsewhere. input_ids, maskable: (batch, seq)."""
    chosen = (torch.rand(input_ids.shape, generator=gen) < prob) & maskable  # (batch, seq)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=gen)  # (batch, seq)
    ids = input_ids.clone()
    ids[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[swap] = torch.randint(vocab, input_ids.shape, generator=gen)[swap]
    return ids, labels


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """Cross-entropy of predicting each masked token from the previous position's output; only the
    masked positions go through the LM head (the full (batch, seq, vocab) logits are never made).

    hidden: (batch, seq, dim); labels: (batch, seq) with -100 where nothing is predicted."""
    target = labels[:, 1:]  # (batch, seq - 1): token i + 1 ...
    source = hidden[:, :-1]  # (batch, seq - 1, dim): ... predicted from position i
    picked = target != -100
    if not picked.any():  # nothing masked in this batch (tiny texts): a zero that keeps the graph
        return hidden.sum() * 0.0, 0.0
    logits = lm_head(source[picked]).float()  # (n_masked, vocab)
    want = target[picked]  # (n_masked,)
    loss = torch.nn.functional.cross_entropy(logits, want)
    return loss, float((logits.argmax(-1) == want).float().mean())


# ------------------------------------------------------------------ worker side


def adapt_loop(loop_config: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    import peft
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mgh_ray import assets, attention
    from mgh_ray.inputs import load_tokenizer, resolve_templates
    from mgh_ray.training import maybe_fail

    cfg = AdaptConfig.model_validate(loop_config["cfg"])
    enc_cfg = EncoderConfig.model_validate(loop_config["encoder"])
    out_dir = loop_config["out_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logs.setup(rank=rank)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)

    source = assets.model_path(enc_cfg.backbone)
    lm = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32,
                                              attn_implementation=enc_cfg.attn_implementation)
    base = lm.get_decoder()  # the headless backbone: the adapter's names are an `Encoder`'s
    attention.set_attention(base.config, "bidirectional")
    attention.mark_modules(base, "bidirectional")
    lm.requires_grad_(False)
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear", bias="none")
    model = peft.get_peft_model(base, lora)
    tok = load_tokenizer(source, True, enc_cfg)
    _, _, doc_template = resolve_templates(enc_cfg, tok)
    mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.convert_tokens_to_ids(cfg.mask_token)
    special = torch.tensor(sorted(set(tok.all_special_ids)))

    texts = seed_texts(pd.read_parquet(io.BytesIO(storage.read_bytes(loop_config["seeds"]))), 100_000, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup + 1)))
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            from safetensors.torch import load_file

            peft.set_peft_model_state_dict(model, load_file(str(Path(d) / "adapter" / "adapter_model.safetensors")))
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = int(state["step"])
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    device = ray.train.torch.get_device()
    lm_head = lm.get_output_embeddings().to(device)
    lines = _metric_lines(out_dir, start) if rank == 0 else []
    amp, compute = devices.autocast(cfg.precision, base, device)
    if rank == 0:
        log.info("MNTP: %d steps from step %d, %d texts, mask token %r, %d LoRA tensors, computing in %s",
                 cfg.steps, start, len(texts), tok.convert_ids_to_tokens(mask_id), len(params),
                 compute)
    for step in range(start, cfg.steps):
        maybe_fail(cfg.fail_at_step, cfg.fail_rank, step, rank, out_dir)
        # the batch of (rank, step) is a function of the seed: a resumed run draws the same ones
        gen = torch.Generator().manual_seed(hash((cfg.seed, rank, step)) % (2**31))
        pick = torch.randint(len(texts), (cfg.batch_size,), generator=gen).tolist()
        batch = tok([doc_template.format(text=texts[i]) for i in pick], truncation=True,
                    max_length=cfg.max_length, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        maskable = mask.bool() & ~torch.isin(ids, special)  # (batch, seq): never EOS, padding or markers
        corrupted, labels = mask_tokens(ids, maskable, mask_id, lm.config.vocab_size, cfg.mask_probability, gen)
        positions = attention.positions_from_mask(mask)
        with amp:  # the forward only, as in training
            hidden = ddp(input_ids=corrupted.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device)).last_hidden_state  # (batch, seq, dim)
            loss, acc = mntp_loss(hidden, labels.to(device), lm_head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        mean = torch.tensor([float(loss.detach()), acc])
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        metrics = {"step": step + 1, "loss": float(mean[0]), "masked_accuracy": float(mean[1]),
                   "lr": scheduler.get_last_lr()[0], "resumed_from": start}
        if rank == 0:
            lines.append(json.dumps(metrics))
            if (step + 1) % cfg.log_every == 0 or step == start:
                log.info("MNTP step %d/%d loss %.4f masked accuracy %.3f", step + 1, cfg.steps, metrics["loss"],
                         metrics["masked_accuracy"])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    storage.write_text(RunLayout.metrics(out_dir), "\n".join(lines) + "\n")
                    model.save_pretrained(Path(tmp) / "adapter")
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "step": step + 1}, Path(tmp) / "train_state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # no report between checkpoints: each would wait for the controller's next poll (`trainer`)


def _metric_lines(out_dir: str, resume_step: int) -> list[str]:
    loc = RunLayout.metrics(out_dir)
    if not storage.is_file(loc):
        return []
    return [ln for ln in storage.read_text(loc).splitlines() if ln and json.loads(ln)["step"] <= resume_step]


# ------------------------------------------------------------------ driver side


def read_metrics(out_dir: str) -> pd.DataFrame:
    text = storage.read_text(RunLayout.metrics(out_dir))
    return pd.DataFrame([json.loads(ln) for ln in text.splitlines() if ln])


def write_report(out_dir: str, cfg: AdaptConfig, seconds: float | None) -> None:
    """report.md (the loss curve every `log_every` steps, and the first and last ten steps' means) and
    loss.png beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = read_metrics(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot(m["step"], m["loss"], lw=0.8, color="#4C72B0", label="loss")
        ax.plot(m["step"], m["loss"].rolling(10, min_periods=1).mean(), lw=2, color="#DD8452",
                label="mean of 10 steps")
        ax.set_xlabel("step")
        ax.set_ylabel("MNTP cross-entropy")
        ax.set_title("MNTP adaptation")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(tmp) / "loss.png", dpi=120)
        plt.close(fig)
        storage.write_bytes(storage.join(out_dir, "loss.png"), (Path(tmp) / "loss.png").read_bytes())
    head, tail = m.head(10), m.tail(10)
    shown = m[(m["step"] % cfg.log_every == 0) | (m["step"] == 1)]
    lines = [f"# MNTP adaptation: {cfg.steps} steps", "",
             f"Loss, mean of the first 10 steps {head.loss.mean():.4f}, of the last 10 {tail.loss.mean():.4f}; "
             f"masked-token accuracy {head.masked_accuracy.mean():.3f} -> {tail.masked_accuracy.mean():.3f}"
             + (f"; {seconds:.0f} s." if seconds else "."), "", "![loss](loss.png)", "",
             shown[["step", "loss", "masked_accuracy", "lr"]].to_markdown(index=False, floatfmt=("g", ".4f", ".3f", "g"))]
    storage.write_text(RunLayout.report(out_dir), "\n".join(lines) + "\n")


def adapt(cfg: AdaptConfig, encoder: EncoderConfig, seeds: str, out_dir: str) -> str:
    """Adapt `encoder`'s backbone with MNTP on the texts of `seeds` (a parquet seed file, path or URI);
    returns the location of the adapter (out_dir/adapter). Resumes; returns at once when done."""
    import time

    import ray
    import yaml

    from mgh_ray import trainer
    from mgh_ray.layout import check_same_settings, save_config

    out_dir = storage.normalize(out_dir)
    adapter, done = storage.join(out_dir, "adapter"), RunLayout.done(out_dir)
    if storage.is_file(done) and storage.is_file(storage.join(adapter, ADAPTED_FILE)):
        log.info("%s already holds a finished adaptation; not adapting again", out_dir)
        return adapter
    if storage.is_file(RunLayout.metrics(out_dir)):
        check_same_settings(cfg, out_dir, set(AdaptConfig.model_fields) - RESUMABLE, "MNTP adaptation")
    storage.check_writable(out_dir)
    save_config(cfg, out_dir)
    if not ray.is_initialized():
        ray.init()
    start = time.time()
    log.info("MNTP adaptation of %s: %d workers, %d steps x %d texts; storage %s", encoder.backbone,
             cfg.num_workers, cfg.steps, cfg.batch_size, out_dir)
    result = trainer.fit(adapt_loop, {"cfg": cfg.model_dump(mode="json"), "encoder": encoder.model_dump(mode="json"),
                                      "seeds": storage.normalize(seeds), "out_dir": out_dir},
                         name="adapt", storage_path=out_dir, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, keep_checkpoints=2)
    if result.checkpoint is None:
        raise RuntimeError(f"MNTP adaptation under {out_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = {"attention": "bidirectional", "backbone": encoder.backbone, "steps": cfg.steps,
                "mask_probability": cfg.mask_probability}
        (Path(d) / "adapter" / ADAPTED_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        storage.upload_dir(Path(d) / "adapter", adapter)
    write_report(out_dir, cfg, time.time() - start)
    storage.write_text(done, json.dumps({"steps": cfg.steps, "seconds": round(time.time() - start, 1)}))
    log.info("MNTP adapter in %s (%.0f s)", adapter, time.time() - start)
    return adapter

