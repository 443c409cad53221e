"""Benchmark of the synthesis stage: the Ray Data + vLLM pipeline vs a plain transformers loop.

The same augment prompts (first seeds of the config) go through (a) `synthesis.synthesize` (engine
actors, guided JSON, retries, quality scoring) and (b) a sequential `model.generate` loop, one prompt
at a time, on the same model, in one run. Both count generated tokens; the table gives tokens/s for
each and their ratio, plus the engine settings, and is saved as benchmark_synthesis.{md,json}.

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

from mgh_ray import assets, prompts, synthesis
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype)).eval()
    torch.manual_seed(cfg.seed)
    tokens, ok, t0 = 0, 0, time.time()
    for msgs in messages:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=cfg.max_tokens, do_sample=cfg.temperature > 0,
                                 temperature=cfg.temperature, top_p=cfg.top_p, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]  # (generated,)
        tokens += int(new.numel())
        ok += prompts.parse_negatives(tok.decode(new, skip_special_tokens=True)).ok
    seconds = time.time() - t0
    return {"rows": len(messages), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "parse_ok_rate": round(ok / max(len(messages), 1), 3), "torch_threads": torch.get_num_threads()}


def run(cfg: SynthesisConfig, out_dir: Path, baseline_rows: int = 8) -> pd.DataFrame:
    """Run both paths on the same prompts; log and save the table; return it."""
    out_dir = Path(out_dir)
    if cfg.mode != "augment":
        log.info("the benchmark uses augment prompts; running mode=augment")
        cfg = cfg.model_copy(update={"mode": "augment"})
    pipe_dir = out_dir / "pipeline"
    shutil.rmtree(pipe_dir, ignore_errors=True)  # a fresh run, never a resumed one
    report = synthesis.synthesize(cfg, str(pipe_dir))
    run_ = report["this_run"]

    ps = prompts.load(cfg.prompt_version)
    seeds = read_seeds(cfg.seeds, cfg.num_seeds)[0].head(baseline_rows)
    messages = [prompts.augment_messages(ps, q, p, cfg.max_input_chars)
                for q, p in zip(seeds["query"], seeds["positive"])]
    base = transformers_loop(cfg, messages)
    base_tps = base["generated_tokens"] / base["seconds"] if base["seconds"] else 0.0

    written = report["written"] / max(report["seeds"], 1)
    pipe = {"rows": run_["rows"], "generated_tokens": run_["generated_tokens"], "parse_ok_rate": written}
    rows = [
        {"path": "ray data + vllm (generation window)", **pipe, "seconds": run_["generation_window_s"],
         "tokens_per_s": run_["generation_tokens_per_s"]},
        {"path": "ray data + vllm (end to end)", **pipe, "seconds": run_["wall_s"],
         "tokens_per_s": run_["tokens_per_s"]},
        {"path": "transformers generate loop", "rows": base["rows"],
         "generated_tokens": base["generated_tokens"], "parse_ok_rate": base["parse_ok_rate"],
         "seconds": base["seconds"], "tokens_per_s": round(base_tps, 2)},
    ]
    table = pd.DataFrame(rows)
    table["ratio_vs_transformers"] = (table["tokens_per_s"] / base_tps).round(2) if base_tps else float("nan")
    settings = {**synthesis.engine_settings(cfg), "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature, "num_seeds": cfg.num_seeds, "baseline_rows": baseline_rows,
                "torch_threads": base["torch_threads"]}
    md = (f"# Synthesis benchmark\n\n{table.to_markdown(index=False)}\n\n"
          f"Engine settings: `{json.dumps(settings, default=str)}`\n")
    save(out_dir, "synthesis", md, {"table": rows, "ratio_vs_transformers": table["ratio_vs_transformers"].tolist(),
                                    "settings": settings, "synthesis_report": report})
    return table
