"""Long inputs: the token limit, the character limit derived from it, the truncation policy of
`Encoder.encode`, and the full BBC table (its longest articles included) through evaluation."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from mgh_ray import evaluation, serving
from mgh_ray.encoder import Encoder, EncoderConfig, InputTooLong
from mgh_ray.pooling import PoolingConfig


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return Encoder.from_config(EncoderConfig(backbone=str(minilm_path), pooling=PoolingConfig(mode="mean"),
                                             max_length=128))


@pytest.fixture(scope="module")
def bbc_longest():
    from mgh_ray import corpora

    df = corpora.table("bbc_eval")
    return df.loc[df.body.str.len().sort_values(ascending=False).index[:4]].body.tolist()


def test_limits_derive_from_the_tokens(minilm, bbc_longest):
    assert minilm.max_tokens == 128
    # WordPiece reads an unknown word of up to 100 characters as one token
    assert minilm.max_chars == 128 * 100
    assert max(len(t) for t in bbc_longest) > 8192  # what the fixed 8,192-character limit refused
    cut = [t[:minilm.max_chars] for t in bbc_longest]
    # the derived cut keeps everything the model reads
    assert all(n > minilm.max_tokens for n in minilm.token_counts(cut))


def test_truncate_is_the_default_and_changes_nothing_the_model_reads(minilm, bbc_longest):
    vecs = minilm.encode(bbc_longest)
    assert vecs.shape == (4, 384) and np.isfinite(vecs).all()
    # a text cut anywhere past the token limit's characters gives the same vector
    np.testing.assert_allclose(minilm.encode([t[:minilm.max_chars] + " tail" for t in bbc_longest]), vecs,
                               atol=1e-6)


def test_error_policy_names_the_text(minilm, bbc_longest):
    with pytest.raises(InputTooLong, match=r"input 1 has \d+ tokens, more than the model's limit of 128"):
        minilm.encode(["short", bbc_longest[0]], truncation="error")
    assert minilm.encode(["short"], truncation="error").shape == (1, 384)
    with pytest.raises(ValueError, match="unknown truncation policy 'cut'"):
        minilm.encode(["short"], truncation="cut")


def test_smollm2_limits(smollm2_path):
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=64))
    assert enc.max_tokens == 64
    assert enc.max_chars == 64 * 81  # SmolLM2's longest vocabulary entry is 81 characters
    assert enc.token_counts(["hello"])[0] == len(enc.tokenize(["hello"])["input_ids"][0])


def test_evaluation_passes_its_policy_to_the_deployment():
    assert evaluation.EvalConfig().truncation == "truncate"
    for policy in ("truncate", "error"):
        cfg = evaluation.EvalConfig(truncation=policy)
        assert evaluation.eval_serve_config(cfg, serving.ServeConfig(truncation="error")).truncation == policy
    with pytest.raises(pydantic.ValidationError, match="truncation"):
        evaluation.EvalConfig(truncation="drop")


def test_full_bbc_table_evaluates_in_process(minilm):
    """All 406 held-out BBC articles (the 4 longer than 8,192 characters included), as gpu.yaml's
    `max_rows: null` runs them; under "error" the same table stops on its first long article."""
    cfg = evaluation.EvalConfig(tasks=["BBCHeadlineRetrieval"], max_rows=None, batch_size=64)
    scores = evaluation.score_in_process(cfg, minilm)
    assert scores["BBCHeadlineRetrieval"] > 0.5
    with pytest.raises(InputTooLong):
        evaluation.score_in_process(cfg.model_copy(update={"truncation": "error"}), minilm)
