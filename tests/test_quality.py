"""Quality gates: flags and policies on known similarities, and the real MiniLM on crafted records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mgh_ray import quality
from mgh_ray.quality import QualityConfig


def _rows(sims: list[list[float]], simp: float = 0.2) -> pd.DataFrame:
    """Records with given [sim_1..sim_4, sim_pos] and negatives named after their written level."""
    rows = []
    for i, s in enumerate(sims):
        rows.append({"id": str(i), "query": f"q{i}", "positive": f"positive {i}",
                     **{f"gen_{k}": f"n{k} of {i}" for k in quality.LEVELS},
                     **{f"sim_{k}": s[k - 1] for k in quality.LEVELS}, "sim_pos": s[4],
                     **{f"simp_{k}": simp for k in quality.LEVELS}})
    return pd.DataFrame(rows)


ORDERED = [0.1, 0.2, 0.3, 0.4, 0.8]
SWAPPED = [0.3, 0.2, 0.1, 0.4, 0.8]  # L1 and L3 swapped, no false negative
ABOVE = [0.1, 0.2, 0.3, 0.79, 0.8]  # L4 scores at the positive: "answers the query"


def test_flags_order_and_false_negatives():
    f = quality.flags(_rows([ORDERED, SWAPPED, ABOVE]), QualityConfig())
    assert f["ordered"].tolist() == [True, False, True]  # ordered, yet L4 is a false negative
    assert f["order_L1_L2"].tolist() == [True, False, True]
    assert f["order_L4_pos"].tolist() == [True, True, True]
    assert f["fn_4"].tolist() == [False, False, True] and f["above_4"].tolist() == [False, False, True]
    assert f["n_false_negatives"].tolist() == [0, 0, 1]


def test_copy_of_positive_is_a_false_negative_by_text_or_by_similarity():
    df = _rows([ORDERED, ORDERED])
    df.loc[0, "gen_2"] = "  Positive 0. "  # same text up to case, spaces and the final period
    df.loc[1, "simp_3"] = 0.97
    f = quality.flags(df, QualityConfig())
    assert f["copy_2"].tolist() == [True, False] and f["copy_3"].tolist() == [False, True]
    assert f["n_false_negatives"].tolist() == [1, 1]


@pytest.mark.parametrize("policy, passed", [
    ("keep", [True, True, True]), ("drop", [True, False, False]),
    ("filter", [True, True, False]), ("relabel", [True, True, False])])
def test_policies(policy, passed):
    out = quality.gate(_rows([ORDERED, SWAPPED, ABOVE]), QualityConfig(policy=policy))
    assert out["passed"].tolist() == passed


def test_relabel_sorts_negatives_by_measured_similarity():
    out = quality.gate(_rows([SWAPPED]), QualityConfig(policy="relabel")).iloc[0]
    assert [out[c] for c in quality.NEG_COLS] == ["n3 of 0", "n2 of 0", "n1 of 0", "n4 of 0"]
    assert out["levels_from"] == "3,2,1,4"
    assert out["levels_in_order"] == 3  # relabelled: ordered by construction
    for policy in ("keep", "filter", "drop"):
        kept = quality.gate(_rows([SWAPPED]), QualityConfig(policy=policy)).iloc[0]
        assert [kept[c] for c in quality.NEG_COLS] == [f"n{k} of 0" for k in quality.LEVELS]
        assert kept["levels_from"] == "1,2,3,4"
        assert kept["levels_in_order"] == 1  # L1 > L2 > L3 < L4 as written: one adjacent pair in order


def test_default_gate_keeps_the_llm_levels_and_drops_only_flagged_records():
    """The LLM's grading is the curriculum: a record the embedder orders differently still trains with
    its negatives on the levels they were written for; one with a false negative is dropped."""
    assert QualityConfig().policy == "filter"
    out = quality.gate(_rows([SWAPPED, ABOVE]), QualityConfig())
    assert out["passed"].tolist() == [True, False]
    assert [out.iloc[0][c] for c in quality.NEG_COLS] == [f"n{k} of 0" for k in quality.LEVELS]


def test_summarize_rates():
    s = quality.summarize(_rows([ORDERED, SWAPPED, ABOVE, ORDERED]), QualityConfig())
    assert s["records"] == 4 and s["passed"] == 3
    assert s["fully_ordered_rate"] == 0.75
    assert s["order_agreement"]["L1<L2"] == 0.75 and s["order_agreement"]["L4<pos"] == 1.0
    assert s["false_negative_rate"] == pytest.approx(1 / 16, abs=1e-4)
    assert s["answers_query_rate"] == 0.25 and s["copies_positive_rate"] == 0.0
    assert quality.summarize(_rows([]), QualityConfig()) == {"records": 0}


@pytest.mark.integration
def test_minilm_scorer_catches_answers_and_copies(minilm_path):
    """Real MiniLM: a graded set orders, a paraphrase of the positive and a copy of it are flagged."""
    query = "Which team won the 2005 FA Cup final?"
    positive = "Arsenal won the 2005 FA Cup final, beating Manchester United on penalties in Cardiff."
    batch = pd.DataFrame([
        {"status": "ok", "query": query, "positive": positive,
         "gen_1": "The price of crude oil fell sharply on world markets on Monday.",
         "gen_2": "Manchester United signed a new shirt sponsorship deal worth millions.",
         "gen_3": "The 2005 FA Cup semi-final draw was made at Wembley on Sunday.",
         "gen_4": "Arsenal won the 2003 FA Cup final, beating Southampton in Cardiff."},
        {"status": "ok", "query": query, "positive": positive,
         "gen_1": "The price of crude oil fell sharply on world markets on Monday.",
         "gen_2": "Manchester United signed a new shirt sponsorship deal worth millions.",
         # answers the query anyway
         "gen_3": "In 2005 Arsenal won the FA Cup final against Manchester United after penalties.",
         "gen_4": positive},  # copies it
        {"status": "failed", "query": "x", "positive": "y", **{f"gen_{k}": None for k in quality.LEVELS}},
    ])
    scored = quality.Scorer(QualityConfig().model_dump())(batch)
    assert scored.loc[2, list(quality.SIM_COLS)].isna().all()  # failures are passed through unscored
    assert np.isfinite(scored.loc[:1, list(quality.SIM_COLS)].to_numpy(dtype=float)).all()
    f = quality.flags(scored.iloc[:2], QualityConfig())
    assert not f.loc[0, [f"fn_{k}" for k in quality.LEVELS]].any()
    assert f.loc[0, "order_L1_L3"] and f.loc[0, "order_L4_pos"]
    assert f.loc[1, "copy_4"] and f.loc[1, "fn_3"]
    assert quality.gate(scored.iloc[:2], QualityConfig(policy="relabel"))["passed"].tolist() == [True, False]
