"""Mined hard negatives, the baseline of the ablation: graded negatives picked from the seed corpus.

The reference embedder (MiniLM) ranks every seed positive against each seed query. Candidates that
are probable false negatives are skipped first, NV-Retriever style (positive-aware): a candidate
scoring >= fn_ratio * sim(query, own positive), or one this close to the own positive
(sim >= dup_sim, or the same text). The remaining candidates are ranked by similarity to the query
(rank 0 = most similar), and one negative per level is taken from a rank band: L1 (coarse) from a far
band ... L4 (fine) from the top, just below the positive. Output has the layout of synthesis, so

    report = mining.mine(MiningConfig(), Path("runs/mined"))
    df = mining.read_records(Path("runs/mined"))          # = synthesis.read_records: same columns

    python -m mgh_ray.mining [config.yaml] OUT_DIR [key=value ...]

Similarity is computed in query chunks (never the full N x N matrix at once), which is fine up to
~1e5 seeds on one machine; beyond that use an ANN index (faiss) for the candidate lists.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from mgh_ray import config, quality, synthesis
from mgh_ray.quality import GEN_COLS, QualityConfig

log = logging.getLogger(__name__)

VERSION = "mined_v1"  # part of the row ids, like a prompt version


class MiningConfig(config.Section):
    seeds: str | None = None  # same as SynthesisConfig.seeds; the corpus is every seed's positive
    num_seeds: int | None = Field(64, ge=1, strict=True)  # queries to mine for (the first N seeds); None: all
    embedder: str = "minilm"
    # [start, end) rank bands among valid candidates, for L1 (coarse) .. L4 (fine)
    bands: list[tuple[int, int]] = Field(default_factory=lambda: [(200, 600), (40, 200), (8, 40), (0, 8)])
    pick: Literal["top", "random"] = "random"  # "top": the most similar candidate of each band
    fn_ratio: float = Field(0.95, gt=0)  # skip candidates scoring >= this share of the positive's similarity
    dup_sim: float = Field(0.95, gt=-1, le=1)  # skip candidates this similar to the query's own positive
    instruction: str = synthesis.DEFAULT_INSTRUCTION
    seed: int = Field(0, strict=True)
    chunk_size: int = Field(1024, ge=1, strict=True)  # queries per similarity block
    batch_size: int = Field(64, ge=1, strict=True)
    quality: QualityConfig = Field(default_factory=lambda: QualityConfig(policy="keep"))

    @field_validator("bands")
    @classmethod
    def _four_bands(cls, bands: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(bands) != 4 or any(not 0 <= a < b for a, b in bands):
            raise ValueError("bands needs 4 [start, end) rank ranges with 0 <= start < end, L1 first")
        return bands


def pick_negatives(sims_q: np.ndarray, sims_p: np.ndarray, own: int, cfg: MiningConfig,
                   rng: np.random.Generator, same_text: np.ndarray) -> tuple[list[int] | None, str]:
    """Corpus indices of the L1..L4 negatives of one query, or (None, why).

    sims_q: (n,) similarity of the query to every corpus text; sims_p: (n,) of its positive to every
    corpus text; own: index of its positive; same_text: (n,) bool, corpus text equals its positive.
    """
    pos = sims_q[own]
    threshold = pos - (1.0 - cfg.fn_ratio) * abs(pos)
    valid = (sims_q < threshold) & (sims_p < cfg.dup_sim) & ~same_text
    valid[own] = False
    ranked = np.flatnonzero(valid)[np.argsort(-sims_q[valid], kind="stable")]  # most similar first
    chosen: list[int] = []
    for start, end in cfg.bands:
        band = [i for i in ranked[start:end] if i not in chosen]
        if not band:
            return None, f"no valid candidate in rank band [{start}, {end}) ({len(ranked)} valid candidates)"
        chosen.append(int(band[0] if cfg.pick == "top" else rng.choice(band)))
    return chosen, ""


def mine(cfg: MiningConfig, out_dir: Path) -> dict[str, Any]:
    """Mine graded negatives for the first `num_seeds` seeds into `out_dir` (records/, failures/, report)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    good, bad, dupes = synthesis.read_seeds(cfg.seeds, None)
    corpus = good.reset_index(drop=True)
    queries = corpus if cfg.num_seeds is None else corpus.head(cfg.num_seeds)
    model = quality.load_embedder(cfg.quality.model_copy(update={"embedder": cfg.embedder}))

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    docs = encode([str(t) for t in corpus["positive"]])  # (n, dim)
    qv = encode([str(t) for t in queries["query"]])  # (m, dim)
    norm = corpus["positive"].map(lambda t: " ".join(str(t).casefold().split())).to_numpy()
    rows, failures = [], []
    sampling = json.dumps({"bands": cfg.bands, "pick": cfg.pick, "fn_ratio": cfg.fn_ratio,
                           "dup_sim": cfg.dup_sim, "seed": cfg.seed})
    for lo in range(0, len(queries), cfg.chunk_size):
        sq = qv[lo:lo + cfg.chunk_size] @ docs.T  # (chunk, n)
        sp = docs[lo:lo + cfg.chunk_size] @ docs.T  # (chunk, n): query i's own positive is corpus row i
        for j in range(sq.shape[0]):
            i = lo + j
            seed = queries.iloc[i]
            rid = synthesis.row_id(seed["seed_id"], VERSION)
            base = {"id": rid, "seed_id": seed["seed_id"], "mode": "mined", "kind": "short-long",
                    "query": seed["query"], "positive": seed["positive"], "prompt_version": VERSION,
                    "model": cfg.embedder, "sampling": sampling, "attempts": 1, "retries": 0, "gen_tokens": 0}
            rng = np.random.default_rng([cfg.seed, int(rid, 16) % (2**32)])
            chosen, why = pick_negatives(sq[j], sp[j], i, cfg, rng, norm == norm[i])
            if chosen is None:
                failures.append({**base, "stage": "mine", "reason": "no_candidate", "detail": why,
                                 "raw_output": ""})
                continue
            instr = seed["instruction"] if isinstance(seed["instruction"], str) else cfg.instruction
            rows.append({**base, "task": "", "instruction": instr,
                         **{g: corpus["positive"].iloc[c] for g, c in zip(GEN_COLS, chosen)}})
    records = pd.DataFrame(rows, columns=[c for c in synthesis.RECORD_COLS])
    if len(records):
        # the same similarities synthesis stores, so the same gate and report apply
        records[list(quality.SIM_COLS)] = quality.similarities(records, encode).to_numpy()
    for sub in ("records", "failures"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)  # mining is cheap: each run rewrites the folder
    if len(records):
        synthesis.write_shard(records, out_dir / "records")
    if failures:
        failed = pd.DataFrame(failures).reindex(columns=synthesis.FAILURE_COLS)
        synthesis.write_shard(failed, out_dir / "failures")
    config.save(cfg, out_dir / "config.yaml")
    report = {"mode": "mined", "seeds": len(queries), "corpus": len(corpus), "bad_seeds_skipped": len(bad),
              "duplicate_seeds_dropped": dupes, "written": len(records), "failed": len(failures),
              "failed_by_reason": {"no_candidate": len(failures)} if failures else {},
              "wall_s": round(time.time() - t0, 2), "quality": quality.summarize(records, cfg.quality)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(
        f"# Mined negatives ({cfg.embedder}, bands {cfg.bands}, pick {cfg.pick})\n\n"
        f"{len(records)} of {len(queries)} queries mined against {len(corpus)} positives; "
        f"{len(failures)} without enough candidates.\n\n"
        f"```json\n{json.dumps(report['quality'], indent=1)}\n```\n")
    log.info("mined %d records (%d failed) in %.1f s", len(records), len(failures), report["wall_s"])
    return report


def read_records(out_dir: Path, policy: str | None = None) -> pd.DataFrame:
    """Training-ready mined rows: the same reader as synthesis (`synthesis.read_records`)."""
    return synthesis.read_records(out_dir, policy)


def main(argv: list[str]) -> None:
    cfg, out_dir = config.module_args(MiningConfig, argv, "mgh_ray.mining")
    mine(cfg, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
