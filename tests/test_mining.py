"""Mined-negative baseline: band picking with false-negative skipping, and a real MiniLM run."""

from __future__ import annotations

import numpy as np
import pytest

from mgh_ray import corpora, mining, synthesis
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


@pytest.mark.integration
def test_mine_writes_graded_records_that_read_like_synthesis(tmp_path, minilm_path):
    seeds = corpora.table("seeds").head(80)
    path = tmp_path / "seeds.parquet"
    seeds.to_parquet(path)
    cfg = mining.MiningConfig(seeds=str(path), num_seeds=12, bands=[(40, 60), (15, 40), (4, 15), (0, 4)])
    report = mining.mine(cfg, tmp_path / "mined")
    assert report["written"] + report["failed"] == 12 and report["written"] == 12
    q = report["quality"]
    assert q["fully_ordered_rate"] == 1.0 and q["false_negative_rate"] == 0.0
    df = mining.read_records(tmp_path / "mined")
    assert df.equals(synthesis.read_records(tmp_path / "mined"))
    assert list(df.columns[:8]) == ["id", "query", "positive", *NEG_COLS, "instruction"]
    assert len(df) == 12 and df["id"].is_unique
    corpus = set(seeds["positive"])
    for row in df.itertuples():
        negs = [getattr(row, c) for c in NEG_COLS]
        assert set(negs) <= corpus and row.positive not in negs and len(set(negs)) == 4
    again = mining.mine(cfg, tmp_path / "mined")  # deterministic: same seed, same picks
    assert again["written"] == 12
    assert synthesis.read_records(tmp_path / "mined")[list(NEG_COLS)].equals(df[list(NEG_COLS)])
