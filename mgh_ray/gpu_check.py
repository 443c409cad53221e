"""GPU check: the model code on one CUDA device without Ray or vLLM, as one short script.

For a machine lent for minutes whose image has torch, transformers, peft and sentence-transformers
but no Ray and no vLLM (so this imports only mgh_ray modules that import neither: config, devices,
pooling, encoder, losses, benchmarks.pooling). SmolLM2's weights do not travel there, so its
architecture is built from its config and tokenizer with random weights (seeded): enough for
speed, memory and CPU-vs-GPU parity, not for quality. Checks, each a row of the table and JSON:

1. encoder   Encoder with ATA pooling on the device in its dtype (auto: bf16 on GPUs)
2. train     one contrastive InfoNCE step with LoRA: finite loss, LoRA weights moved, base weights not
3. ata_mem   received attention at gpu.yaml's training batch (64 queries x 3 texts x 512 tokens,
             Mistral-7B's probe layer: 32 heads, 8 key heads, dim 128), unchunked vs chunked:
             peak memory (torch.cuda.max_memory_allocated; RSS on CPU) and time
4. encode    texts/s of Encoder.encode, ATA vs mean pooling, same texts
5. parity    the same weights on the CPU (float32) and the device (its dtype): cosine >= 0.999
6. pooler    the vLLM engine's pooler (`vllm_model.pool_sequence`, ATA) on the device, per whole prompt
             as vLLM's flat batch hands it over, against `Encoder.encode` on the CPU in float32:
             cosine >= 0.9999 with the device in float32, >= 0.999 in its dtype. vLLM is not on the
             GPU image, so the probe layer's queries and keys come from the encoder's own projection
             (`AttentionProbe.project`), which the vLLM model's forward mirrors with vLLM's layers

    make gpu-check-inputs        # here: SmolLM2's config + tokenizer, pydantic wheels (runs/gpu_check_inputs)
    make gpu-check               # on the GPU machine (see the Makefile for the device call)
    python -m jobs.gpu_check --device cpu --tiny --out /tmp/gc     # anywhere: the same code at toy sizes
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mgh_ray import attention, devices, vllm_model
from mgh_ray.benchmarks import pooling as pooling_bench
from mgh_ray.encoder import Encoder, EncoderConfig, LoraConfig
from mgh_ray.losses import InfoNCE, LossConfig
from mgh_ray.pooling import PoolingConfig

log = logging.getLogger(__name__)

# what `make gpu-check-inputs` copies from the smollm2 asset folder (no weights)
INPUT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja")
MIN_COSINE = 0.999
MIN_COSINE_FP32 = 0.9999  # the vLLM engine's parity goal, float32 on both sides


@dataclass(frozen=True)
class Sizes:
    layers: int | None  # backbone depth; None: the config's own (30 for SmolLM2)
    train_batch: int  # queries per training step (each with a positive and a hard negative)
    train_len: int  # tokens per text in the training step
    probe: pooling_bench.Shape  # the ATA memory row's q/k
    chunk_mb: float  # ATA budget of the chunked memory row
    encode_texts: int
    encode_len: int
    parity_texts: int


FULL = Sizes(None, 32, 256, pooling_bench.Shape(192, 512, 32, 8, 128, "bfloat16"), 1024.0, 1024, 256, 64)
# the tiny probe is big enough (~32 MiB unchunked) for a CPU's resident-memory peak to show it
TINY = Sizes(2, 4, 32, pooling_bench.Shape(8, 256, 4, 2, 16, "float32"), 1.0, 16, 32, 8)


def prepare_inputs(src: Path, dst: Path) -> Path:
    """Copy SmolLM2's config and tokenizer files (a few MB, no weights) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in INPUT_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "config.json").is_file() or not (dst / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} holds no config.json/tokenizer.json: is it a transformers folder?")
    return dst


def random_backbone(inputs: Path, out: Path, layers: int | None, seed: int = 0) -> Path:
    """A transformers folder with the architecture and tokenizer of `inputs` and seeded random weights."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(inputs))
    if layers is not None:
        cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in INPUT_FILES:
        if name != "config.json" and (inputs / name).is_file():
            shutil.copy2(inputs / name, out / name)
    return out


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    """`n` seeded pseudo-sentences of about `words` words (random weights make wording irrelevant)."""
    vocab = ("market shares rise after the bank reports profit while ministers debate new rules on "
             "energy prices and the team wins its final match of the season in london").split()
    rng = np.random.default_rng(seed)
    sizes = rng.integers(words // 2, words + 1, size=n)
    return [" ".join(rng.choice(vocab, size=int(k))) + "." for k in sizes]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _encoder_cfg(backbone: Path, max_length: int, mode: str, dtype: str = "auto") -> EncoderConfig:
    return EncoderConfig(backbone=str(backbone), max_length=max_length, dtype=dtype,
                         pooling=PoolingConfig(mode=mode), lora=LoraConfig(r=16, alpha=32))


def check_train_step(backbone: Path, dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    """One InfoNCE step (in-batch + one hard negative) with LoRA; what moved and what did not."""
    enc = Encoder.from_config(_encoder_cfg(backbone, sizes.train_len, "ata"), device=dev).train()
    lora = {n: p.detach().clone() for n, p in enc.named_parameters() if p.requires_grad}
    base_name = next(n for n, p in enc.named_parameters() if not p.requires_grad and "layers" in n)
    base = dict(enc.named_parameters())[base_name].detach().clone()
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-3)
    b = sizes.train_batch
    words = sizes.train_len  # about a token per word: texts fill max_length
    q, p, n = texts(b, words // 4, 1), texts(b, words, 2), texts(b, words, 3)
    loss_fn = InfoNCE(LossConfig())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    qi = enc.tokenize(q, "Retrieve the passage that answers the question")
    di = enc.tokenize(p + n)
    qe = enc(**{k: v.to(dev) for k, v in qi.items()})  # (b, dim)
    de = enc(**{k: v.to(dev) for k, v in di.items()})  # (2b, dim): positives, then hard negatives
    loss = loss_fn(qe, de[:b], de[b:].unsqueeze(1))  # hard negatives: (b, 1, dim)
    loss.backward()
    opt.step()
    _sync(dev)
    secs = time.perf_counter() - t0
    moved = sum(not torch.equal(lora[k], v.detach()) for k, v in enc.named_parameters() if k in lora)
    out = {"loss": float(loss), "seconds": secs, "lora_tensors": len(lora), "lora_tensors_moved": moved,
           "base_unchanged": bool(torch.equal(base, dict(enc.named_parameters())[base_name].detach())),
           "seq": int(di["input_ids"].shape[1]), "texts": 3 * b,
           "param_dtype": str(base.dtype).removeprefix("torch.")}
    if dev.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    out["ok"] = bool(np.isfinite(out["loss"]) and moved == len(lora) and out["base_unchanged"])
    return out


def check_ata_memory(dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    table = pooling_bench.compare(sizes.probe, [sizes.chunk_mb], str(dev), repeats=2)
    rows = table.to_dict(orient="records")
    return {"shape": asdict(sizes.probe), "rows": rows,
            "ok": bool(rows[1]["max_abs_diff"] < 1e-3 and rows[1]["peak_mb"] < rows[0]["peak_mb"])}


def check_encode(backbone: Path, dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    """texts/s of encode for ATA and mean pooling on the same texts (after one warm-up batch)."""
    docs = texts(sizes.encode_texts, sizes.encode_len)
    out: dict[str, Any] = {"texts": len(docs), "max_length": sizes.encode_len}
    enc = Encoder.from_config(_encoder_cfg(backbone, sizes.encode_len, "ata"), device=dev)
    for mode in ("mean", "ata", "mean", "ata"):  # twice each, alternating; the better run counts
        enc.config.pooling = PoolingConfig(mode=mode)
        enc.encode(docs[:64], batch_size=64)  # warm-up: kernels, allocator
        _sync(dev)
        t0 = time.perf_counter()
        enc.encode(docs, batch_size=64)
        _sync(dev)
        out[f"{mode}_texts_per_s"] = max(out.get(f"{mode}_texts_per_s", 0.0),
                                         len(docs) / (time.perf_counter() - t0))
    out["ata_vs_mean"] = out["ata_texts_per_s"] / out["mean_texts_per_s"]
    out["ok"] = True
    return out


def check_parity(backbone: Path, dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Same weights on the CPU in float32 and on `dev` in its auto dtype (bf16 on GPUs; on a CPU, bf16
    too, so that the CPU run exercises the same comparison): cosine per text."""
    docs = texts(sizes.parity_texts, sizes.encode_len // 2, 7)
    cfg = _encoder_cfg(backbone, sizes.encode_len, "ata", "auto" if dev.type == "cuda" else "bfloat16")
    out: dict[str, Any] = {"texts": len(docs)}
    for name, instruction in (("documents", None), ("queries", "Retrieve the passage")):
        torch.manual_seed(0)  # the same (no-op) fresh LoRA on both sides
        cpu = Encoder.from_config(cfg.model_copy(update={"dtype": "float32"}), device="cpu")
        ref = cpu.encode(docs, instruction=instruction)
        del cpu
        torch.manual_seed(0)
        there = Encoder.from_config(cfg, device=dev)
        got = there.encode(docs, instruction=instruction)
        out[f"{name}_dtype"] = str(there.base_model.dtype).removeprefix("torch.")
        del there
        out[f"{name}_min_cosine"] = float((ref * got).sum(-1).min())
    out["ok"] = bool(min(out["documents_min_cosine"], out["queries_min_cosine"]) >= MIN_COSINE)
    return out


@torch.no_grad()
def pooled_like_vllm(enc: Encoder, docs: list[str], instruction: str | None) -> np.ndarray:
    """(n, dim) vectors from `vllm_model.pool_sequence`, fed as the vLLM engine feeds it: each text's token
    ids unpadded (`token_ids`: the same tokens and prefix count the engine sends), positions 0..n-1, the
    final states and the probe layer's q/k flattened to (seq, heads * head_dim)."""
    index = enc.config.pooling.layer % enc.num_layers
    probe = attention.probe_for(enc.base_model, index, enc.causal)
    out = []
    for ids, prefix in enc.inputs.token_ids(docs, instruction):
        n = len(ids)
        input_ids = torch.tensor([ids], device=enc.device)  # (1, seq)
        mask = torch.ones_like(input_ids)
        positions = torch.arange(n, device=enc.device)[None]  # (1, seq)
        res = enc.backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           output_hidden_states=True, return_dict=True)
        q, k = probe.project(res.hidden_states[index], mask, positions)  # (1, heads|kv_heads, seq, d)
        flat_q = q[0].transpose(0, 1).reshape(n, -1)  # (seq, heads * d), vLLM's layout
        flat_k = k[0].transpose(0, 1).reshape(n, -1)
        out.append(vllm_model.pool_sequence(enc.config, res.last_hidden_state[0], flat_q, flat_k, prefix,
                                            probe.heads, probe.kv_heads, probe.head_dim))
    return torch.stack(out).cpu().numpy()


def check_pooler(backbone: Path, dev: torch.device, sizes: Sizes) -> dict[str, Any]:
    """The vLLM pooler's ATA path on `dev`, float32 and the device's dtype, against the CPU's float32
    `Encoder.encode` on the same weights, for documents and for queries (whose instruction is not pooled)."""
    docs = texts(sizes.parity_texts, sizes.encode_len // 2, 11)
    dtype = "auto" if dev.type == "cuda" else "bfloat16"  # "native": the device's own (bf16 on GPUs)
    cfg = _encoder_cfg(backbone, sizes.encode_len, "ata", dtype)
    kinds = {"documents": None, "queries": "Retrieve the passage"}
    torch.manual_seed(0)
    ref_enc = Encoder.from_config(cfg.model_copy(update={"dtype": "float32"}), device="cpu")
    refs = {name: ref_enc.encode(docs, instruction=inst) for name, inst in kinds.items()}
    del ref_enc
    out: dict[str, Any] = {"texts": len(docs)}
    for label, run_dtype in (("float32", "float32"), ("native", dtype)):
        torch.manual_seed(0)  # the same (no-op) fresh LoRA as the reference
        there = Encoder.from_config(cfg.model_copy(update={"dtype": run_dtype}), device=dev)
        out[f"{label}_dtype"] = str(there.base_model.dtype).removeprefix("torch.")
        for name, inst in kinds.items():
            got = pooled_like_vllm(there, docs, inst)
            out[f"{name}_{label}_min_cosine"] = float((refs[name] * got).sum(-1).min())
        del there
        out[f"{label}_min_cosine"] = min(out[f"{name}_{label}_min_cosine"] for name in kinds)
    out["ok"] = bool(out["float32_min_cosine"] >= MIN_COSINE_FP32 and out["native_min_cosine"] >= MIN_COSINE)
    return out


def run(inputs: Path, out_dir: Path, device: str = "auto", tiny: bool = False) -> dict[str, Any]:
    """All checks; writes gpu_check.json in out_dir and returns it (`ok` per check and overall)."""
    dev = devices.device(device)
    sizes = TINY if tiny else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the random weights (0.5 GB at full depth) stay out of out_dir, whose files travel back
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    backbone = random_backbone(Path(inputs), scratch / "smollm2", sizes.layers)
    report: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "tiny": tiny,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    enc = Encoder.from_config(_encoder_cfg(backbone, sizes.encode_len, "ata"), device=dev)
    vec = enc.encode(texts(4, 12))
    report["encoder"] = {"device": str(enc.device), "dtype": str(enc.base_model.dtype).removeprefix("torch."),
                         "layers": enc.num_layers, "dim": enc.dim, "max_tokens": enc.max_tokens,
                         "ok": bool(np.isfinite(vec).all() and enc.device.type == dev.type)}
    del enc
    for name, fn in (("train", lambda: check_train_step(backbone, dev, sizes)),
                     ("ata_mem", lambda: check_ata_memory(dev, sizes)),
                     ("encode", lambda: check_encode(backbone, dev, sizes)),
                     ("parity", lambda: check_parity(backbone, dev, sizes)),
                     ("pooler", lambda: check_pooler(backbone, dev, sizes))):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # one failing check must not hide the others' figures
            log.exception("check %s failed", name)
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        report[name]["check_seconds"] = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s: %s", name, report[name])
    report["ok"] = all(v.get("ok", False) for v in report.values() if isinstance(v, dict))
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a markdown table (one line per figure)."""
    names = ("encoder", "train", "ata_mem", "encode", "parity", "pooler")
    e, t, m, c, p, v = (report.get(k, {}) for k in names)
    lines = [f"GPU check on {report.get('gpu', report['device'])} (torch {report['torch']}, "
             f"{report['date']}{', tiny sizes' if report['tiny'] else ''})", "",
             "| check | figure | ok |", "|---|---|---|",
             f"| encoder | {e.get('device')} {e.get('dtype')}, {e.get('layers')} layers, ATA "
             f"| {e.get('ok')} |"]
    if "loss" in t:
        peak = f"{t['peak_gb']:.1f} GB peak, " if "peak_gb" in t else ""
        lines.append(f"| train step | {t['texts']} texts x {t['seq']} tokens, loss {t['loss']:.3f}, "
                     f"{t['seconds']:.2f} s, {peak}LoRA moved "
                     f"{t['lora_tensors_moved']}/{t['lora_tensors']}, base unchanged {t['base_unchanged']} "
                     f"| {t['ok']} |")
    for row in m.get("rows", []):
        lines.append(f"| ATA memory, {row['variant']} {row['chunk (batch, heads, rows)']} | "
                     f"{row['peak_mb']:.0f} MiB peak, {row['seconds'] * 1e3:.1f} ms, "
                     f"x{row['memory_vs_unchunked']:.3f} memory, diff {row['max_abs_diff']:.1e} "
                     f"| {m['ok']} |")
    if "ata_texts_per_s" in c:
        lines.append(f"| encode | mean {c['mean_texts_per_s']:.0f} texts/s, ATA {c['ata_texts_per_s']:.0f} "
                     f"texts/s (x{c['ata_vs_mean']:.2f}), {c['texts']} texts x {c['max_length']} tokens "
                     f"| {c['ok']} |")
    if "documents_min_cosine" in p:
        lines.append(f"| parity CPU fp32 vs {report['device']} {p['documents_dtype']} | min cosine "
                     f"{p['documents_min_cosine']:.5f} (documents), {p['queries_min_cosine']:.5f} (queries) "
                     f"| {p['ok']} |")
    if "float32_min_cosine" in v:
        lines.append(f"| vLLM pooler (ATA) on {report['device']} vs CPU fp32 Encoder | min cosine "
                     f"{v['float32_min_cosine']:.6f} in {v['float32_dtype']}, {v['native_min_cosine']:.5f} in "
                     f"{v['native_dtype']} (documents and queries, {v['texts']} texts) | {v['ok']} |")
    for name in names[1:]:
        if "error" in report.get(name, {}):
            lines.append(f"| {name} | {report[name]['error'][:200]} | False |")
    lines.append(f"\nall ok: {report['ok']}")
    return "\n".join(lines)
