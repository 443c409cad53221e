"""ATA memory benchmark: peak extra memory and time of the received-attention weights, chunked vs not.

ATA pools with the attention each token receives in one layer. Computed whole, that layer's float32
(batch, heads, seq, seq) scores and probabilities live at once (several copies); `received_from_qk`
sums them over chunks within `PoolingConfig.ata_chunk_mb`. This measures both on the same q/k:
peak memory above the inputs (CUDA: torch.cuda.max_memory_allocated; CPU: the rise of the resident
set's high-water mark, reset before each run through /proc/self/clear_refs, in a fresh process whose
malloc maps every block over 64 KiB afresh, so freed memory is never silently reused)
and the best of `repeats` wall times (the peak is the last, warm run's). Ratios are against the
unchunked baseline of the same run.
Default shape: batch 64 x 512 tokens, SmolLM2's probe layer (9 heads, 3 key heads, head dim 64).

    mgh-ray benchmark jobs/configs/tiny.yaml --stage pooling
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from mgh_ray import attention
from mgh_ray.benchmarks import save

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """One layer's q/k: (batch, heads, seq, head_dim) queries, (batch, kv_heads, seq, head_dim) keys."""

    batch: int = 64
    seq: int = 512
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "float32"

    def inputs(self, device: str | torch.device = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dt = getattr(torch, self.dtype)
        q = torch.randn(self.batch, self.heads, self.seq, self.head_dim, generator=g).to(device, dt)
        k = torch.randn(self.batch, self.kv_heads, self.seq, self.head_dim, generator=g).to(device, dt)
        mask = torch.ones(self.batch, self.seq, dtype=torch.long)
        lengths = torch.randint(self.seq // 4, self.seq + 1, (self.batch,), generator=g)
        mask[torch.arange(self.seq)[None, :] >= lengths[:, None]] = 0  # right padding, varied lengths
        return q, k, mask.to(device)


def _rss() -> tuple[float, float]:
    """(resident, high-water mark) of this process in bytes, from /proc/self/status."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def _run(shape: Shape, budget: float | None, device: str, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(peak bytes above the inputs, best seconds, r) in this process; CUDA peak, or RSS peak on CPU."""
    q, k, mask = shape.inputs(device)
    cuda = torch.device(device).type == "cuda"
    times, peak = [], 0.0
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                _reset_peak()
                base = _rss()[0]
            t0 = time.perf_counter()
            r = attention.received_from_qk(q, k, mask, True, True, chunk_mb=budget)  # (batch, seq)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            # the last (warm) run's peak: the first also pages in kernel code and warms allocators
            peak = torch.cuda.max_memory_allocated() - base if cuda else _rss()[1] - base
    return peak, min(times), r.float().cpu()


def _child(shape: Shape, budget: float | None, repeats: int, queue) -> None:
    peak, secs, r = _run(shape, budget, "cpu", repeats)
    queue.put((peak, secs, r.numpy()))  # numpy pickles by value; a tensor would pass a shared-memory fd


def measure(shape: Shape, budget: float | None, device: str = "cpu",
            repeats: int = 2) -> tuple[float, float, torch.Tensor]:
    """Peak bytes, seconds and r of one variant (budget None: unchunked); on CPU in a fresh process."""
    if torch.device(device).type == "cuda":
        return _run(shape, budget, device, repeats)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(shape, budget, repeats, queue))
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's malloc when it starts
    try:
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    try:
        while True:  # a child that dies (an error, the OOM killer) puts nothing: say so, never hang
            try:
                peak, secs, r = queue.get(timeout=5)
                break
            except queue_mod.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the measuring process died (exit code {proc.exitcode}); "
                                       "its error is above") from None
    finally:
        proc.join()
    return peak, secs, torch.from_numpy(r)


def compare(shape: Shape, budgets: list[float], device: str = "cpu", repeats: int = 2) -> pd.DataFrame:
    """Rows: unchunked (baseline), then each budget (MiB): peak_mb, seconds, ratios, agreement."""
    rows, base_r = [], None
    for budget in [None, *budgets]:
        peak, secs, r = measure(shape, budget, device, repeats)
        base_r = r if base_r is None else base_r
        plan = attention.chunk_plan(shape.batch, shape.heads, shape.seq, budget) if budget else None
        rows.append({"variant": "unchunked" if budget is None else f"chunked {budget:g} MiB",
                     "chunk (batch, heads, rows)": str(plan or (shape.batch, shape.heads, shape.seq)),
                     "peak_mb": peak / 2**20, "seconds": secs,
                     "max_abs_diff": float((r - base_r).abs().max())})
        log.info("ATA received attention, %s: %.0f MiB peak, %.3f s", rows[-1]["variant"],
                 rows[-1]["peak_mb"], secs)
    table = pd.DataFrame(rows)
    table["memory_vs_unchunked"] = table.peak_mb / table.peak_mb.iloc[0]
    table["time_vs_unchunked"] = table.seconds / table.seconds.iloc[0]
    return table


def run(out_dir: Path, shape: Shape | None = None, budgets: list[float] | None = None,
        device: str = "cpu") -> pd.DataFrame:
    """The benchmark table; writes benchmark_pooling.{md,json} in out_dir."""
    shape = shape or Shape()
    budgets = budgets or [64.0, 256.0]
    table = compare(shape, budgets, device)
    md = table.to_markdown(index=False, floatfmt=".3g")
    setup = (f"ATA received attention of one layer, {device}, batch {shape.batch} x {shape.seq} tokens, "
             f"{shape.heads} heads ({shape.kv_heads} key heads, dim {shape.head_dim}), {shape.dtype} q/k; "
             "peak memory above the inputs (warm run), best time of 2 runs; chunked rows must agree with the "
             "unchunked one (max_abs_diff).")
    save(out_dir, "pooling", f"# ATA memory\n\n{md}\n\n{setup}\n",
         {"rows": table.to_dict(orient="records"), "shape": asdict(shape), "device": device})
    return table
