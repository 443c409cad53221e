"""The replica's inference engines, chosen by `serve.engine`: `torch` (eager `Encoder.encode`, texts
gathered by `@serve.batch`) or `vllm` (the folder's merged export on vLLM's pooling runner,
`vllm_model.py`, with vLLM's own continuous batching).

Both read the same tokens: the replica tokenises with the encoder's `Inputs` (templates, truncation, the
instruction's exact token count), and the vLLM engine receives token ids and the number of leading tokens
left out of the pool, so the two engines pool the same set and give the same vectors (parity >= 0.9999 in
float32, tests/test_vllm_model.py). `encode` takes (text, instruction, tokens) items and returns, per
item, its vector or the exception that text alone met.

The vLLM engine runs vLLM's `AsyncLLM` (its engine core in a child process of the replica). A request
that is cancelled (the client went away) aborts its texts in the engine: nothing is encoded for nobody.
Its merged export is written once per node and revision under the model cache
(`$MGH_RAY_CACHE/vllm/<revision>/`); its threads follow the replica's `num_cpus` (`ServeConfig.threads`)
rather than vLLM's whole-node CPU binding, unless `VLLM_CPU_OMP_THREADS_BIND` is set: a CPU replica binds
its engine's threads to cores that no other replica on the node holds (`claim_cores`), as vLLM's own
server binds its threads, and runs unbound when the node has no such cores left.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import shutil
import tempfile
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from mgh_ray.serving.config import ServeConfig

log = logging.getLogger(__name__)

Item = tuple[str, "str | None", int]  # (text, instruction, tokens it uses)
_BIND_SET_HERE: str | None = None  # the engine threads' binding this process chose (not the user's)


class TorchEngine:
    """Eager PyTorch: `Encoder.encode` over batches that `@serve.batch` gathers across requests; per
    instruction, texts sorted by tokens and packed into passes of at most `max_batch_tokens`."""

    kind = "torch"

    def __init__(self, model_dir: str, cfg: ServeConfig, observe_batch: Any = None) -> None:
        import torch
        from ray import serve

        from mgh_ray import devices
        from mgh_ray.encoder import Encoder

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.encoder = Encoder.load(model_dir)
        self.inputs, self.config, self.dim = self.encoder.inputs, self.encoder.config, self.encoder.dim
        self.max_tokens = self.encoder.max_tokens
        param = next(self.encoder.parameters())
        self.device, self.dtype = str(param.device), str(param.dtype).removeprefix("torch.")
        # `serve.precision`, decided once; a fresh context per pass, entered in the pass's own thread
        # (`asyncio.to_thread`). `compute` goes into /v1/models
        self._autocast, self.compute = devices.autocast_maker(cfg.precision, self.encoder, param.device)
        self.batches, self.recent_batches = 0, deque(maxlen=256)  # sizes of the last forward passes
        self._observe = observe_batch
        self._batched = serve.batch(max_batch_size=cfg.max_batch_size,
                                    batch_wait_timeout_s=cfg.batch_wait_timeout_s)(self._run_batch)

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def _forward(self, items: list[Item]) -> list[np.ndarray | Exception]:
        out: list[np.ndarray | Exception | None] = [None] * len(items)
        for instruction in dict.fromkeys(i for _, i, _ in items):
            idx = sorted((k for k, it in enumerate(items) if it[1] == instruction), key=lambda k: -items[k][2])
            start = 0
            while start < len(idx):
                stop = start + 1  # longest first: the pass is padded to its first text's length
                while stop < len(idx) and (stop - start + 1) * items[idx[start]][2] <= self.cfg.max_batch_tokens:
                    stop += 1
                part = idx[start:stop]
                try:
                    with self._autocast():
                        vecs = self.encoder.encode([items[k][0] for k in part], instruction=instruction,
                                                   batch_size=len(part))  # (len(part), dim)
                    for k, v in zip(part, vecs):
                        out[k] = v
                except Exception:  # find the text at fault; the others still get vectors
                    log.exception("a forward pass of %d texts failed; retrying them one by one", len(part))
                    for k in part:
                        try:
                            with self._autocast():
                                out[k] = self.encoder.encode([items[k][0]], instruction=instruction)[0]
                        except Exception as exc:
                            out[k] = exc
                start = stop
        return out  # type: ignore[return-value]

    async def _run_batch(self, items: list[Item]) -> list[np.ndarray | Exception]:
        self.batches += 1
        self.recent_batches.append(len(items))
        if self._observe is not None:
            self._observe(len(items))
        return await asyncio.to_thread(self._forward, items)

    async def encode(self, items: list[Item]) -> list[np.ndarray | Exception]:
        """Submitted in batch-sized pieces so that other requests' texts interleave."""
        rows: list[np.ndarray | Exception] = []
        step = self.cfg.max_batch_size
        for start in range(0, len(items), step):
            rows += await asyncio.gather(*(self._batched(it) for it in items[start:start + step]))
        return rows

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "recent_batches": list(self.recent_batches)}

    def shutdown(self) -> None:
        pass


class VllmEngine:
    """The folder's merged export on vLLM's pooling runner (`vllm_model.MghRayEncoder`): float32 on CPU,
    bfloat16 on the GPU a replica's `num_gpus` grants (not yet run on a GPU)."""

    kind = "vllm"

    def __init__(self, model_dir: str, cfg: ServeConfig, revision: str) -> None:
        from mgh_ray import vllm_model
        from mgh_ray.encoder import Encoder

        self.cfg = cfg
        encoder = Encoder.load(model_dir, device="cpu")  # the text side, and the weights to export once
        kind = getattr(encoder.base_model.config, "model_type", None)
        if kind != "llama":
            raise ValueError(f"serve.engine=vllm runs Llama-family backbones (smollm2); {model_dir} holds a "
                             f"{kind} backbone ({encoder.config.backbone}): serve it with serve.engine=torch")
        self.inputs, self.config, self.dim = encoder.inputs, encoder.config, encoder.dim
        self.max_tokens = encoder.max_tokens
        merged = merged_export(encoder, revision)
        del encoder
        gc.collect()
        # a GPU replica (serve.num_gpus > 0): Ray sets CUDA_VISIBLE_DEVICES to the GPU it granted, and
        # vLLM's CUDA build runs there in bfloat16; a CPU replica runs float32 on its own threads
        gpu = cfg.num_gpus > 0
        self.device, self.dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
        self.compute = "the weights' dtype"  # serve.precision's autocast is the torch engine's (ServeConfig)
        self.cores: list[int] = []
        self._claims: list[int] = []  # lock files held while this replica lives
        if not gpu:
            global _BIND_SET_HERE
            if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", _BIND_SET_HERE) == _BIND_SET_HERE:  # not the user's
                # bound threads: one text 189 -> 97 ms through Serve on 2 cores (docs/serving.md)
                self.cores, self._claims = claim_cores(cfg.threads)
                _BIND_SET_HERE = ",".join(map(str, self.cores)) or "nobind"
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _BIND_SET_HERE
            os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        vllm_model.register()  # this process; the entry point registers it in the engine core's
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(model=str(merged), runner="pooling", dtype=self.dtype,
                               enforce_eager=not (gpu or cfg.vllm_compile),
                               max_model_len=self.max_tokens, enable_chunked_prefill=False,
                               enable_prefix_caching=False, kv_cache_memory_bytes=cfg.vllm_kv_cache_mb << 20,
                               max_num_seqs=cfg.max_batch_size, seed=0, disable_log_stats=True)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self.finished = self.aborted = 0  # texts encoded, texts dropped because their request was cancelled

    def threads(self) -> int:
        return self.cfg.threads

    async def _one(self, ids: list[int], prefix: int) -> np.ndarray:
        from vllm import PoolingParams

        params = PoolingParams(task="embed", extra_kwargs={"prefix_len": prefix})
        out = None
        try:
            async for out in self.engine.encode({"prompt_token_ids": ids}, params, request_id=uuid.uuid4().hex):
                pass
        except asyncio.CancelledError:  # vLLM has aborted the request in its engine core
            self.aborted += 1
            raise
        self.finished += 1
        if out is None:
            raise RuntimeError("the engine returned no output")
        return np.asarray(out.outputs.data, dtype=np.float32)  # (dim,)

    async def encode(self, items: list[Item]) -> list[np.ndarray | Exception]:
        """Every text as its own engine request (vLLM batches them); a cancelled call aborts them all."""
        prompts: list[tuple[list[int], int]] = [None] * len(items)  # type: ignore[list-item]
        for instruction in dict.fromkeys(i for _, i, _ in items):
            idx = [k for k, it in enumerate(items) if it[1] == instruction]
            ids = await asyncio.to_thread(self.inputs.token_ids, [items[k][0] for k in idx], instruction)
            for k, p in zip(idx, ids):
                prompts[k] = p
        return list(await asyncio.gather(*(self._one(ids, n) for ids, n in prompts), return_exceptions=True))

    def stats(self) -> dict[str, Any]:
        # vLLM schedules the forward passes: texts instead
        return {"batches": None, "recent_batches": [], "texts_finished": self.finished,
                "texts_aborted": self.aborted, "cores": self.cores}

    def shutdown(self) -> None:
        self.engine.shutdown()
        for fd in self._claims:
            os.close(fd)  # the cores are free for the node's next replica
        self._claims = []


def claim_cores(n: int, folder: Path | None = None) -> tuple[list[int], list[int]]:
    """`n` of this process's allowed cores that no other replica on the node holds, and the open lock
    files that hold them (one `flock` per core under the node's temp folder: released when they are
    closed or the process exits, however it exits). ([], []) when fewer than `n` are free."""
    folder = folder or Path(tempfile.gettempdir()) / "mgh_ray_cores"
    folder.mkdir(parents=True, exist_ok=True)
    cores, fds = [], []
    for core in sorted(os.sched_getaffinity(0)):
        if len(cores) == n:
            break
        fd = os.open(folder / f"{core}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another replica's
            os.close(fd)
            continue
        cores.append(core)
        fds.append(fd)
    if len(cores) < n:
        for fd in fds:
            os.close(fd)
        log.info("fewer than %d free cores on this node: the vLLM engine's threads run unbound", n)
        return [], []
    return cores, fds


def merged_export(encoder: Any, revision: str) -> Path:
    """The encoder's merged export for vLLM, written once per node and revision (atomically: a replica
    that dies mid-write leaves a temporary folder, never a half folder under the final name)."""
    from mgh_ray import export, storage

    final = storage.cache_home() / "vllm" / revision
    merged = final / "merged"
    if not (merged / "config.json").is_file():
        tmp = final.with_name(f"{revision}.tmp-{uuid.uuid4().hex[:8]}")
        export.write(encoder, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another replica on this node finished first
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported %s for vLLM", final)
    return merged


def create(model_dir: str, cfg: ServeConfig, revision: str, observe_batch: Any = None) -> TorchEngine | VllmEngine:
    if cfg.engine == "vllm":
        return VllmEngine(model_dir, cfg, revision)
    return TorchEngine(model_dir, cfg, observe_batch)
