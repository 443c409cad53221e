"""Benchmark of the synthesis stage: the Ray Data + vLLM pipeline vs the engine alone and vs a plain
transformers loop.

The same augment prompts (first seeds of the config) go through (a) `synthesis.synthesize` (engine
actors, guided JSON, retries, quality scoring, the id ledger, shards written), (e) the engine alone:
the same `engine.Generator` with the same settings in one Ray task of the same resources, every row at
once (as many in flight as the pipeline keeps: `batch_size x max_concurrent_batches`), no Ray Data, no
scorer, nothing written; and (b) a sequential `model.generate` loop, one prompt at a time, on the same
model, in one run. Each row has its own sampling seeds, so (a) and (e) generate the same work. All
count generated tokens; the table gives tokens/s for each, their ratios against (e) (what the data
plane costs: the target is 0.9x or more end to end) and against (b), plus the engine settings, and is
saved as benchmark_synthesis.{md,json}.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage synthesis [key=value ...]

(a) is reported twice: end to end (engine start included) and over its generation window (first
request to last answer). (b) runs `baseline_rows` prompts only (default 8), as it is ~10x slower;
tokens/s is a rate, so the two compare. Unguided (b) output is also parsed, to show what guided
decoding buys. Compare ratios, not absolute numbers: other work on the machine moves both.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd

from mgh_ray import assets, devices, parsing, prompts, synthesis
from mgh_ray.benchmarks import save
from mgh_ray.seeds import read_seeds
from mgh_ray.synthesis import SynthesisConfig

log = logging.getLogger(__name__)


def transformers_loop(cfg: SynthesisConfig, messages: list[list[dict[str, str]]]) -> dict:
    """Generate for each prompt in turn with transformers; returns tokens, seconds, parse rate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(assets.model_path(cfg.model))
    tok = AutoTokenizer.from_pretrained(path)
    dt = devices.engine_dtype(cfg.dtype)  # what the engine arms run in on this machine
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt if dt == "auto" else getattr(torch, dt)).eval()
    torch.manual_seed(cfg.seed)
    tokens, ok, t0 = 0, 0, time.time()
    for msgs in messages:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=cfg.max_tokens, do_sample=cfg.temperature > 0,
                                 temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,  # 0: off, as in vLLM
                                 pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]  # (generated,)
        tokens += int(new.numel())
        ok += parsing.parse_negatives(tok.decode(new, skip_special_tokens=True)).ok
    seconds = time.time() - t0
    return {"rows": len(messages), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "parse_ok_rate": round(ok / max(len(messages), 1), 3), "torch_threads": torch.get_num_threads()}


def _engine_task(cfg: dict, model_path: str, rows: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Body of the engine-alone arm (a Ray task): start a Generator, run every row at once, stop it.
    Returns the rows and the engine's start-up seconds."""
    import asyncio

    from mgh_ray.engine import Generator, _shutdown

    t0 = time.time()
    gen = Generator(cfg, model_path)
    started = time.time() - t0
    try:
        out = asyncio.run(gen(rows))
    finally:
        _shutdown(gen.engine)
    return out, started


def engine_alone(cfg: SynthesisConfig) -> dict:
    """The engine alone on the rows `synthesize` would run (its own work rows, ids and all)."""
    import ray

    rows = synthesis.work_rows(cfg, prompts.load(cfg.prompt_version)).to_pandas()
    rows = rows[rows["problem"] == ""].reset_index(drop=True)
    t0 = time.time()
    task = ray.remote(**synthesis.remote_args(cfg))(_engine_task)
    out, started = ray.get(task.remote(cfg.model_dump(mode="json"), str(assets.model_path(cfg.model)), rows))
    wall = time.time() - t0
    window = float(out["t_end"].max() - out["t_start"].min())
    tokens = int(out["gen_tokens"].sum())
    return {"rows": len(out), "generated_tokens": tokens,
            "parse_ok_rate": float((out["status"] == "ok").mean()), "wall_s": round(wall, 2),
            "engine_start_s": round(started, 2), "window_s": round(window, 2)}


def run(cfg: SynthesisConfig, out_dir: Path, baseline_rows: int = 8) -> pd.DataFrame:
    """Run both paths on the same prompts; log and save the table; return it."""
    out_dir = Path(out_dir)
    if cfg.mode != "augment":
        log.info("the benchmark uses augment prompts; running mode=augment")
        cfg = cfg.model_copy(update={"mode": "augment"})
    pipe_dir = out_dir / "pipeline"
    shutil.rmtree(pipe_dir, ignore_errors=True)  # a fresh run, never a resumed one
    t0 = time.time()
    report = synthesis.synthesize(cfg, str(pipe_dir))
    stage_s = time.time() - t0  # the whole call: ledger, claims, engine, scorer, shards and the report
    run_ = report["this_run"]
    alone = engine_alone(cfg)

    ps = prompts.load(cfg.prompt_version)
    seeds = read_seeds(cfg.seeds, cfg.num_seeds)[0].head(baseline_rows)
    messages = [prompts.augment_messages(ps, q, p, cfg.max_input_chars)
                for q, p in zip(seeds["query"], seeds["positive"])]
    base = transformers_loop(cfg, messages)
    base_tps = base["generated_tokens"] / base["seconds"] if base["seconds"] else 0.0

    written = report["written"] / max(report["seeds"], 1)
    pipe = {"rows": run_["rows"], "generated_tokens": run_["generated_tokens"], "parse_ok_rate": written}
    gen = run_["generated_tokens"]
    eng = {"rows": alone["rows"], "generated_tokens": alone["generated_tokens"],
           "parse_ok_rate": alone["parse_ok_rate"]}
    rows = [
        {"path": "ray data + vllm (generation window)", **pipe, "seconds": run_["generation_window_s"],
         "tokens_per_s": run_["generation_tokens_per_s"]},
        {"path": "ray data + vllm (end to end)", **pipe, "seconds": run_["wall_s"],
         "tokens_per_s": run_["tokens_per_s"]},
        {"path": "ray data + vllm (the whole synthesize call)", **pipe, "seconds": round(stage_s, 2),
         "tokens_per_s": round(gen / stage_s, 2)},
        {"path": "engine alone (generation window)", **eng, "seconds": alone["window_s"],
         "tokens_per_s": round(alone["generated_tokens"] / max(alone["window_s"], 1e-9), 2)},
        {"path": "engine alone (end to end)", **eng, "seconds": alone["wall_s"],
         "tokens_per_s": round(alone["generated_tokens"] / alone["wall_s"], 2)},
        {"path": "transformers generate loop", "rows": base["rows"],
         "generated_tokens": base["generated_tokens"], "parse_ok_rate": base["parse_ok_rate"],
         "seconds": base["seconds"], "tokens_per_s": round(base_tps, 2)},
    ]
    table = pd.DataFrame(rows)
    table["ratio_vs_transformers"] = (table["tokens_per_s"] / base_tps).round(2) if base_tps else float("nan")
    # like with like: windows against the engine's window, the rest against its end to end
    alone_tps = {kind: float(table.loc[table.path == f"engine alone ({kind})", "tokens_per_s"].iloc[0])
                 for kind in ("generation window", "end to end")}
    table["ratio_vs_engine_alone"] = [
        round(r.tokens_per_s / alone_tps["generation window" if "window" in r.path else "end to end"], 2)
        if "transformers" not in r.path else float("nan") for r in table.itertuples()]
    settings = {**synthesis.engine_settings(cfg), "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature, "num_seeds": cfg.num_seeds, "baseline_rows": baseline_rows,
                "torch_threads": base["torch_threads"],
                "engine_alone_start_s": alone["engine_start_s"]}
    md = (f"# Synthesis benchmark\n\n{table.to_markdown(index=False)}\n\n"
          f"Engine settings: `{json.dumps(settings, default=str)}`\n")
    save(out_dir, "synthesis", md, {"table": table.to_dict(orient="records"),
                                    "ratio_vs_transformers": table["ratio_vs_transformers"].tolist(),
                                    "settings": settings, "synthesis_report": report})
    return table
