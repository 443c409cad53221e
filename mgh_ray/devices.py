"""Devices: the device and dtype a model loads in, from the resources Ray granted to this process.

Every component that holds a model (Serve and evaluation replicas, the quality scorer, export and
parity, training workers) asks here instead of assuming the CPU, so a replica given `num_gpus: 1`
runs on its GPU and one given none stays on the CPU even on a GPU node:

    inside a Ray worker (task, actor, Serve replica, Train worker):
        cuda when Ray granted it GPUs (`ray.get_gpu_ids()`), at the index its first GPU has among
        CUDA_VISIBLE_DEVICES (Ray Train makes a node's GPUs visible to all its workers); else cpu
    outside Ray (driver, scripts, tests): cuda when torch sees one, else cpu
    dtype "auto": bfloat16 on cuda (float16 on GPUs without bf16), float32 on cpu
    training precision "auto": float32 weights compute under bfloat16 autocast where the device does
        bf16 arithmetic natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16), else as they are

`pick_device` and `pick_dtype` are pure functions of those facts (unit-tested for GPU cases on a
machine without one); `device()` and `dtype()` gather the facts of this process. Importing this
module imports neither ray nor CUDA.

    dev = devices.device()                 # torch.device("cuda", 0) in a replica with a GPU
    dt = devices.dtype("auto", dev)        # torch.bfloat16 there, torch.float32 on a CPU
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch

from mgh_ray.config import DTypeName, Precision  # noqa: F401  (the weights' dtype, what a forward computes in)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str | None, *, ray_gpu_ids: list[str] | None, visible: list[str] | None,
                cuda_available: bool) -> torch.device:
    """The device to load on.

    requested: "auto"/None, "cpu", "cuda" or "cuda:N"; ray_gpu_ids: GPUs Ray granted this worker
    (None outside a Ray worker); visible: CUDA_VISIBLE_DEVICES split on commas (None when unset).
    """
    req = (requested or "auto").strip().lower()
    if req == "cpu":
        return torch.device("cpu")
    if req.startswith("cuda"):
        if not cuda_available:
            raise ValueError(f"device {requested!r} was asked for but torch sees no CUDA device here; "
                             "use device 'auto' (GPU when granted, else CPU) or 'cpu'")
        if ray_gpu_ids is not None and not ray_gpu_ids:
            log.warning("device %s asked for in a Ray worker that was granted no GPU (num_gpus=0): it may "
                        "share a GPU another worker owns", requested)
        return torch.device(req)
    if req != "auto":
        raise ValueError(f"unknown device {requested!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if ray_gpu_ids is None:  # not a Ray worker: whatever torch sees
        return torch.device("cuda", 0) if cuda_available else torch.device("cpu")
    if not ray_gpu_ids or not cuda_available:
        if ray_gpu_ids and not cuda_available:
            log.warning("Ray granted GPU(s) %s but torch sees no CUDA device (CPU build of torch?); "
                        "loading on cpu", ray_gpu_ids)
        return torch.device("cpu")
    first = str(ray_gpu_ids[0])
    index = visible.index(first) if visible and first in visible else 0
    return torch.device("cuda", index)


def pick_dtype(configured: str, device: torch.device | str, *, bf16_supported: bool) -> torch.dtype:
    """The weights' dtype: the configured one, or for "auto" bf16 on GPUs (fp16 without bf16), fp32 on CPU."""
    if configured != "auto":
        if configured not in DTYPES:
            raise ValueError(f"unknown dtype {configured!r}; use one of auto, {', '.join(DTYPES)}")
        return DTYPES[configured]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.float32


def _ray_gpu_ids() -> list[str] | None:
    """GPUs Ray granted this process when it is a Ray worker; None in a driver or without Ray."""
    try:
        import ray
    except ImportError:  # the GPU check image has no Ray
        return None
    if not ray.is_initialized():  # never start Ray from here (get_runtime_context would)
        return None
    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return None
    return [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]


def device(requested: str | None = "auto") -> torch.device:
    """The device for a model in this process (see the module docstring)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in env.split(",") if v.strip()] if env is not None else None
    return pick_device(requested, ray_gpu_ids=_ray_gpu_ids(), visible=visible,
                       cuda_available=torch.cuda.is_available())


def dtype(configured: str, dev: torch.device | str) -> torch.dtype:
    """`pick_dtype` with this machine's bf16 support."""
    cuda = torch.device(dev).type == "cuda"
    return pick_dtype(configured, dev, bf16_supported=cuda and torch.cuda.is_bf16_supported())


def pick_autocast(precision: str, weights: torch.dtype, *, bf16_native: bool) -> torch.dtype | None:
    """The dtype a forward (training, or the torch serving engine) runs in under `torch.autocast`, or
    None (no autocast).

    "auto" picks bfloat16 for float32 weights on a device with native bf16 arithmetic: on this
    project's 2-core CPU (AVX512-BF16) a SmolLM2 training step takes 0.56-0.60x the time of float32
    (the training benchmark's `step_times`), with master weights, gradients and the loss in float32.
    Weights already in half precision (GPUs' "auto" dtype) need none."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; use auto, float32 or bfloat16")
    return torch.bfloat16 if weights == torch.float32 and bf16_native else None


def bf16_native(dev: torch.device | str) -> bool:
    """Whether `dev` does bf16 arithmetic in hardware (CPU: oneDNN's AVX512-BF16/AMX check)."""
    if torch.device(dev).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def pick_engine_dtype(configured: str, *, cuda: bool, bf16_native: bool) -> str:
    """The dtype to hand a vLLM engine for a configured one.

    "auto": vLLM's own choice on a GPU (the model's dtype); on a CPU, bfloat16 only where it does bf16
    arithmetic natively (AVX512-BF16 or AMX: 1.6x float32's tokens/s there), else float32. Without
    it vLLM's CPU kernels emulate bf16: on an AVX2-only AMD EPYC (2026-12-04) SmolLM2's decode steps
    took over a minute each. An explicit dtype is honoured, even if emulated (the config's `DTypeName`
    has already refused an unknown one)."""
    if configured != "auto":
        return configured
    if cuda:
        return "auto"
    return "bfloat16" if bf16_native else "float32"


def engine_dtype(configured: str) -> str:
    """`pick_engine_dtype` on this machine (call it where the engine runs: the actor's node)."""
    cuda = torch.cuda.is_available()
    return pick_engine_dtype(configured, cuda=cuda, bf16_native=not cuda and bf16_native("cpu"))


def autocast_maker(precision: str, model: torch.nn.Module, dev: torch.device | str
                   ) -> tuple[Callable[[], torch.autocast], str]:
    """What `autocast` returns, with a maker of fresh contexts instead of one context: for code that
    enters one per forward pass, possibly in another thread each time (autocast state is per thread)."""
    weights = next(model.parameters()).dtype
    dt = pick_autocast(precision, weights, bf16_native=bf16_native(dev))
    make = functools.partial(torch.autocast, torch.device(dev).type, dtype=dt or torch.bfloat16,
                             enabled=dt is not None)
    return make, f"{str(dt).removeprefix('torch.')} autocast" if dt is not None else "the weights' dtype"


def autocast(precision: str, model: torch.nn.Module, dev: torch.device | str) -> tuple[torch.autocast, str]:
    """The autocast context a forward of `model` on `dev` runs in (disabled, a no-op, where
    `pick_autocast` chooses none) and what it computes in, for logs and metrics ("bfloat16 autocast"
    or "the weights' dtype")."""
    make, label = autocast_maker(precision, model, dev)
    return make(), label


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block, then back to what they were, on error too.

    `torch.set_num_threads` holds for the whole process: a benchmark that measures at a replica's thread
    count in its caller's process left the caller there (the test suite ran every later in-process
    training on one of its two cores, at half speed, after the serving-peers smoke)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
