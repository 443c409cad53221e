"""Mined hard negatives, the baseline of the ablation: graded negatives picked from the seed corpus.

The reference embedder (MiniLM) ranks every seed positive against each seed query. Candidates that
are probable false negatives are skipped first, NV-Retriever style (positive-aware): a candidate
scoring >= fn_ratio * sim(query, own positive), or one this close to the own positive
(sim >= dup_sim, or the same text). The remaining candidates are ranked by similarity to the query
(rank 0 = most similar), and one negative per level is taken from a rank band: L1 (coarse) from a far
band ... L4 (fine) from the top, just below the positive. Output has the layout of synthesis, so

    report = mining.mine(MiningConfig(), "runs/tiny/mine")      # or an s3:// URI
    ds = quality.gated("runs/tiny/mine")                        # the same gated view as synthesis

    mgh-ray mine jobs/configs/tiny.yaml [key=value ...]       # into RUN_DIR/mine

Runs as Ray Data stages: seeds are read by Ray Data, positives embedded by `Embedder` actors and
materialized in the object store as the corpus; queries stream through `Embedder` and `Miner` (which
holds the corpus matrix) into `records.ShardSink`. Similarity is computed per query batch (never the
full N x N matrix at once), fine up to ~1e5-1e6 seeds on one actor; beyond that use an ANN index
(faiss) for the candidate lists.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from mgh_ray import config, quality, records, seeds, storage
from mgh_ray.layout import RunLayout, save_config
from mgh_ray.quality import QualityConfig
from mgh_ray.records import DEFAULT_INSTRUCTION, GEN_COLS, LEVELS, stable_id

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
    instruction: str = DEFAULT_INSTRUCTION
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
    cand = np.flatnonzero(valid)
    deepest = max(end for _, end in cfg.bands)
    if len(cand) > deepest:  # only the top `deepest` ranks are ever used: partition, then sort those
        cand = cand[np.argpartition(-sims_q[cand], deepest - 1)[:deepest]]
    ranked = cand[np.argsort(-sims_q[cand], kind="stable")]  # most similar first
    chosen: list[int] = []
    for start, end in cfg.bands:
        band = [i for i in ranked[start:end] if i not in chosen]
        if not band:
            return None, f"no valid candidate in rank band [{start}, {end}) ({len(ranked)} valid candidates)"
        chosen.append(int(band[0] if cfg.pick == "top" else rng.choice(band)))
    return chosen, ""


class Embedder:
    """Ray Data stage: the reference embedder, loaded once per actor; adds a unit `vec` per row.

    A text seen before by this actor is not embedded again (seed sets repeat texts: BBC has duplicate
    articles, and a query's positive is often another seed's); the cache is bounded."""

    def __init__(self, cfg: dict[str, Any], column: str, cache_size: int = 200_000) -> None:
        mcfg = MiningConfig.model_validate(cfg)
        self.batch_size, self.column, self.cache_size = mcfg.batch_size, column, cache_size
        self.model = quality.load_embedder(mcfg.quality.model_copy(update={"embedder": mcfg.embedder}))
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = [str(t) for t in batch[self.column]]
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            vecs = self.model.encode(new, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)  # (new, dim)
            if len(self.cache) + len(new) > self.cache_size:
                self.cache.clear()
            self.cache.update(zip(new, vecs.astype(np.float32)))
        return batch.assign(vec=[self.cache[t] for t in texts])  # (rows,) of (dim,)


class Miner:
    """Ray Data stage: holds the corpus (every seed positive and its vector, read from the embedded
    corpus dataset inside the actor, never on the driver) and turns a batch of embedded queries
    into records or failures, with the similarities the quality gate reads (the same vectors, so no
    text is embedded twice)."""

    def __init__(self, cfg: dict[str, Any], corpus: Any) -> None:
        self.cfg = MiningConfig.model_validate(cfg)
        df = corpus.to_pandas().drop_duplicates("seed_id").reset_index(drop=True)
        self.docs = np.stack(df["vec"].to_numpy()).astype(np.float32)  # (n, dim)
        self.texts = df["positive"].tolist()
        self.index = {s: i for i, s in enumerate(df["seed_id"])}
        # same_text as integer codes: comparing codes per query is cheap, comparing strings is not
        self.text_code = pd.factorize(pd.Series([" ".join(str(t).casefold().split()) for t in self.texts]))[0]
        self.sampling = json.dumps({"bands": self.cfg.bands, "pick": self.cfg.pick, "fn_ratio": self.cfg.fn_ratio,
                                    "dup_sim": self.cfg.dup_sim, "seed": self.cfg.seed})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        c = self.cfg
        own = np.array([self.index[s] for s in batch["seed_id"]])  # (b,): each query's own positive
        qv = np.stack(batch["vec"].to_numpy()).astype(np.float32)  # (b, dim)
        sq = qv @ self.docs.T  # (b, n)
        sp = self.docs[own] @ self.docs.T  # (b, n)
        rows = []
        for j, seed in enumerate(batch.to_dict("records")):
            rid = row_id(seed["seed_id"], VERSION)
            base = {"id": rid, "seed_id": seed["seed_id"], "mode": "mined", "kind": seed.get("kind") or "short-long",
                    "task": "", "query": seed["query"], "positive": seed["positive"], "prompt_version": VERSION,
                    "model": c.embedder, "sampling": self.sampling, "attempts": 1, "retries": 0, "gen_tokens": 0}
            rng = np.random.default_rng([c.seed, int(rid, 16) % (2**32)])
            chosen, why = pick_negatives(sq[j], sp[j], int(own[j]), c, rng,
                                         self.text_code == self.text_code[own[j]])
            if chosen is None:
                rows.append({**base, "status": "failed", "stage": "mine", "reason": "no_candidate", "detail": why,
                             "raw_output": ""})
                continue
            sims = {"sim_pos": float(sq[j, own[j]])}
            for k, ci in zip(LEVELS, chosen):
                sims[f"sim_{k}"] = float(sq[j, ci])
                sims[f"simp_{k}"] = float(sp[j, ci])
            rows.append({**base, "status": "ok", "instruction": seed["instruction"] or c.instruction,
                         **{g: self.texts[ci] for g, ci in zip(GEN_COLS, chosen)}, **sims})
        return pd.DataFrame(rows)


def row_id(seed_id: str, version: str) -> str:
    return stable_id(str(seed_id), version)


def mine(cfg: MiningConfig, out_dir: str) -> dict[str, Any]:
    """Mine graded negatives for the first `num_seeds` seeds into `out_dir` (path or URI: records/,
    failures/, report). Every step runs on workers; the driver gets counts."""
    import ray
    import ray.data

    t0 = time.time()
    out_dir = storage.normalize(out_dir)
    storage.check_writable(out_dir)
    if not ray.is_initialized():
        ray.init()
    for folder in (RunLayout.records(out_dir), RunLayout.failures(out_dir)):
        storage.delete_dir(folder)  # mining is cheap and deterministic: each run rewrites the folder
    all_seeds = seeds.dataset(cfg.seeds)
    good = all_seeds.filter(lambda r: not r["problem"])
    actor = dict(compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.quality.num_cpus,
                 batch_format="pandas", batch_size=cfg.batch_size * 8)
    corpus = good.map_batches(Embedder, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"),
                                                               "column": "positive"}, **actor).materialize()
    queries = good.limit(cfg.num_seeds) if cfg.num_seeds is not None else good
    sink = records.ShardSink(out_dir, rows_per_shard=cfg.chunk_size)
    (queries.map_batches(Embedder, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "column": "query"},
                         **actor)
     .map_batches(Miner, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "corpus": corpus},
                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.quality.num_cpus,
                  batch_format="pandas", batch_size=cfg.chunk_size)
     .write_datasink(sink))
    save_config(cfg, out_dir)
    n_corpus, n_bad = corpus.count(), all_seeds.count() - good.count()
    written, failed = sink.totals.get("written", 0), sink.totals.get("failed", 0)
    q = quality.folder_counts(out_dir, cfg.quality)
    report = {"mode": "mined", "seeds": written + failed, "corpus": n_corpus, "bad_seeds_skipped": n_bad,
              "written": written, "failed": failed,
              "failed_by_reason": {"no_candidate": failed} if failed else {},
              "wall_s": round(time.time() - t0, 2), "quality": quality.summary_rates(q, cfg.quality)}
    storage.write_text(RunLayout.report(out_dir, "json"), json.dumps(report, indent=2, default=str))
    storage.write_text(RunLayout.report(out_dir),
                       f"# Mined negatives ({cfg.embedder}, bands {cfg.bands}, pick {cfg.pick})\n\n"
                       f"{written} of {written + failed} queries mined against {n_corpus} positives; "
                       f"{failed} without enough candidates.\n\n"
                       f"```json\n{json.dumps(report['quality'], indent=1)}\n```\n")
    log.info("mined %d records (%d failed) in %.1f s", written, failed, report["wall_s"])
    return report


def read_records(out_dir: str, policy: str | None = None) -> pd.DataFrame:
    """Training-ready mined rows of a small folder as pandas: the same gated view as synthesis."""
    return quality.gated_frame(out_dir, policy)
