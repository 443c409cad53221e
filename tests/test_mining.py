"""Mined-negative baseline: band picking with false-negative skipping on hand-built similarities, and a
real MiniLM run checked against an independent ranking, with planted false negatives and chunking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mgh_ray import corpora, mining
from mgh_ray.quality import NEG_COLS

BANDS = [(6, 8), (4, 6), (2, 4), (0, 2)]


def _cfg(**kw) -> mining.MiningConfig:
    return mining.MiningConfig(bands=BANDS, pick="top", **kw)


def test_pick_skips_false_negatives_and_near_duplicates():
    # corpus of 12; item 0 is the query's own positive (sim 0.80)
    sims_q = np.array([0.80, 0.79, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45, 0.40, 0.35, 0.30, 0.25])
    sims_p = np.full(12, 0.3)
    sims_p[2] = 0.99  # near-copy of the positive
    same = np.zeros(12, dtype=bool)
    chosen, why = mining.pick_negatives(sims_q, sims_p, 0, _cfg(), np.random.default_rng(0), same)
    # 1 scores >= 95% of the positive and 2 copies it: valid ranking is 3,4,5,...
    assert why == "" and chosen == [9, 7, 5, 3]  # L1 from ranks 6-8 ... L4 = the top valid candidate
    assert 1 not in chosen and 2 not in chosen and 0 not in chosen


def test_pick_reports_an_empty_band():
    sims_q = np.linspace(0.9, 0.1, 5)
    chosen, why = mining.pick_negatives(sims_q, np.zeros(5), 0, _cfg(), np.random.default_rng(0),
                                        np.zeros(5, dtype=bool))
    assert chosen is None and "rank band [6, 8)" in why


def test_config_needs_four_bands():
    with pytest.raises(ValueError, match="4"):
        mining.MiningConfig(bands=[(0, 2)])


def test_random_pick_stays_inside_each_band_and_never_repeats_a_candidate():
    # a hand-built similarity row: the own positive (index 0) scores 1.0, candidate i scores 0.9 - i/100
    n = 40
    sims_q = 0.9 - np.arange(n) / 100
    sims_q[0] = 1.0
    sims_p = np.zeros(n)
    cfg = mining.MiningConfig(bands=[(20, 30), (10, 25), (3, 12), (0, 4)], pick="random")
    ranks = {lv: set() for lv in range(4)}
    for seed in range(200):
        chosen, why = mining.pick_negatives(sims_q, sims_p, 0, cfg, np.random.default_rng(seed),
                                            np.zeros(n, dtype=bool))
        assert why == "" and len(set(chosen)) == 4  # overlapping bands never give one text twice
        for lv, c in enumerate(chosen):
            ranks[lv].add(c - 1)  # every candidate but the own positive is valid: rank = i - 1
    for lv, (start, end) in enumerate(cfg.bands):
        assert ranks[lv] <= set(range(start, end))
        assert len(ranks[lv]) >= (end - start) // 2  # it does draw across the band, not its first item


def test_pick_skips_a_corpus_text_equal_to_the_positive_even_when_it_scores_low():
    sims_q = np.array([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.22])
    same = np.zeros(10, dtype=bool)
    same[2] = True  # the same text as the positive under another seed (a duplicate article)
    cfg = mining.MiningConfig(bands=[(3, 4), (2, 3), (1, 2), (0, 1)], pick="top")
    chosen, why = mining.pick_negatives(sims_q, np.zeros(10), 0, cfg, np.random.default_rng(0), same)
    assert why == "" and chosen == [6, 5, 4, 3]


def _seeds_with_planted_copies(n: int = 80):
    """The first `n` seeds plus two planted false negatives of seed 0 under other ids: its positive
    verbatim, and its positive with one word changed. Neither may ever be mined as seed 0's negative."""
    seeds = corpora.table("seeds").head(n)[["id", "query", "positive"]].reset_index(drop=True)
    positive = seeds.loc[0, "positive"]
    words = positive.split()
    near = " ".join(words[:-1] + ["(" + words[-1] + ")"])  # a near-copy, one token changed
    planted = pd.DataFrame([
        {"id": "planted-copy", "query": "Gardening tips for a rainy spring", "positive": positive},
        {"id": "planted-near", "query": "Recipes for a quick weekday dinner", "positive": near}])
    return pd.concat([seeds, planted], ignore_index=True), positive, near


@pytest.mark.integration
def test_mine_skips_planted_false_negatives_and_picks_the_ranks_an_independent_ranking_gives(tmp_path, ray_cluster,
                                                                                          minilm_path):
    from sentence_transformers import SentenceTransformer

    seeds, positive, near = _seeds_with_planted_copies()
    path = tmp_path / "seeds.parquet"
    seeds.to_parquet(path)
    bands = [(40, 60), (15, 40), (4, 15), (0, 4)]
    # chunks of 5 queries: 12 queries span 3 chunks, so a chunking error (query i's own positive is
    # corpus row i in every chunk) shows as a negative the independent ranking below does not give
    cfg = mining.MiningConfig(seeds=str(path), num_seeds=12, bands=bands, pick="top", chunk_size=5)
    report = mining.mine(cfg, tmp_path / "mined")
    assert report["written"] == 12 and report["failed"] == 0
    df = mining.read_records(tmp_path / "mined").set_index("query")
    corpus = seeds["positive"].tolist()

    # an independent ranking with the same model: all corpus texts, own positive and copies removed
    st = SentenceTransformer(str(minilm_path), device="cpu")
    docs = st.encode(corpus, normalize_embeddings=True)  # (82, dim)
    assert float(docs[0] @ docs[-1]) >= cfg.dup_sim  # the near-copy is one by the config's own test
    for i in range(12):
        query = seeds.loc[i, "query"]
        negs = [df.loc[query, c] for c in NEG_COLS]
        q = st.encode([query], normalize_embeddings=True)[0]
        sim_q, sim_p = docs @ q, docs @ docs[i]  # (82,), (82,)
        own = corpus[i]
        ok = [j for j in range(len(corpus)) if corpus[j] != own and sim_p[j] < cfg.dup_sim
              and sim_q[j] < sim_q[i] - (1 - cfg.fn_ratio) * abs(sim_q[i])]
        ranked = [corpus[j] for j in sorted(ok, key=lambda j: -sim_q[j])]
        want = [ranked[a] for a, _ in bands]
        assert negs == want, f"query {i}"  # pick "top": the first of each band, L1 .. L4
        if i == 0:
            assert positive not in negs and near not in negs
