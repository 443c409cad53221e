"""The offline mteb tasks: layouts, seeded sizes, no overlap with training seeds, instruction policy,
and every task scored by mteb's own evaluator on a small real model, far above what random vectors
(a broken encoder) score on the same data."""

from __future__ import annotations

import hashlib

import mteb
import numpy as np
import pytest

from mgh_ray import corpora, evaluation, mteb_adapters, tasks


def _texts(task) -> set[str]:
    """Every text a task would embed."""
    out: set[str] = set()
    for subset in task.dataset.values() if "default" in task.dataset else [task.dataset]:
        for split in subset.values():
            if isinstance(split, dict):  # retrieval layout
                out |= set(split["queries"]["text"]) | set(split["corpus"]["text"])
            else:
                for col in ("text", "sentence1", "sentence2", "sentences"):
                    if col in split.column_names:
                        out |= set(split[col])
    return out


@pytest.fixture(scope="module")
def minilm_encoder(minilm_path):
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    return Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean")))


@pytest.fixture(scope="module")
def loaded():
    out = {}
    for name in tasks.NAMES:
        task = tasks.build(name, max_rows=30, seed=0)
        task.load_data()
        out[name] = task
    return out


def test_one_task_per_family(loaded):
    families = {t.metadata.type for t in loaded.values()}
    assert {"Retrieval", "Reranking", "STS", "Classification", "Clustering", "PairClassification"} <= families
    assert evaluation.EvalConfig().tasks == list(tasks.NAMES)


def test_sizes_are_seeded_and_part_of_the_revision(loaded):
    a = tasks.build("LeeSTS", max_rows=30, seed=0)
    b = tasks.build("LeeSTS", max_rows=30, seed=1)
    a.load_data()
    b.load_data()
    assert list(a.dataset["test"]["sentence1"]) == list(loaded["LeeSTS"].dataset["test"]["sentence1"])
    assert list(a.dataset["test"]["sentence1"]) != list(b.dataset["test"]["sentence1"])
    assert len(a.dataset["test"]) == 30
    other_size = tasks.build("LeeSTS", max_rows=31)
    revisions = {a.metadata.revision, b.metadata.revision, other_size.metadata.revision}
    assert len(revisions) == 3  # another size or seed is another dataset: its results are never reused
    assert tasks.LeeSTS.metadata.revision == tasks.DATA_VERSION  # instances never change the class


def test_no_training_seed_reaches_an_evaluation_task(loaded):
    seeds = corpora.table("seeds")
    seed_texts = set(seeds["query"]) | set(seeds["positive"])
    for name, task in loaded.items():
        assert not (_texts(task) & seed_texts), name
    bbc = tasks.build("BBCHeadlineRetrieval")  # all held-out articles, not just a sample
    bbc.load_data()
    split = bbc.dataset["default"]["test"]
    assert not {i[1:] for i in split["corpus"]["id"]} & set(seeds["id"])
    assert not set(split["queries"]["text"]) & set(seeds["query"])
    # the movie-dialog seeds (the small preset's second source) are held out of the reranking task
    # (by statement: a reply may also be another pair's statement, as dialogue lines follow each other)
    movie = corpora.seed_rows("moviedialog")
    queries = set(loaded["MovieDialogReranking"].dataset["default"]["test"]["queries"]["text"])
    assert len(queries) == 30 and not queries & set(movie["query"])


def test_tasks_like_the_seeds_are_those_held_out_of_the_seed_corpora():
    assert tasks.like_seeds(list(tasks.NAMES), ["bbc"]) == ["BBCHeadlineRetrieval"]
    assert tasks.like_seeds(list(tasks.NAMES), ["bbc", "moviedialog"]) == ["BBCHeadlineRetrieval",
                                                                          "MovieDialogReranking"]
    assert tasks.like_seeds(["LeeSTS", "SDGPairClassification"], ["bbc"]) == []


def test_layouts(loaded):
    ret = loaded["BBCHeadlineRetrieval"].dataset["default"]["test"]
    assert "title" not in ret["corpus"].column_names  # a title in the document would give the answer away
    assert all(len(v) == 1 and f"d{q[1:]}" in v for q, v in ret["relevant_docs"].items())
    rr = loaded["MovieDialogReranking"].dataset["default"]["test"]
    n = tasks.MovieDialogReranking.n_candidates
    for q, cands in rr["top_ranked"].items():
        assert len(cands) == len(set(cands)) == n
        assert set(rr["relevant_docs"][q]) <= set(cands)
    assert "labels" in loaded["SDGPairClassification"].dataset["test"].column_names
    assert set(loaded["SDGPairClassification"].dataset["test"]["labels"]) <= {0, 1}
    trec = loaded["TRECCoarseClassification"].dataset
    assert set(trec) == {"train", "test"} and not set(trec["train"]["text"]) & set(trec["test"]["text"])
    assert len(trec["test"]) == 30 and len(trec["train"]) == 30 * tasks.TRECCoarseClassification.train_factor
    assert tasks.ReutersR8Clustering.max_fraction_of_documents_to_embed is None


def test_instruction_policy(loaded):
    from mteb.types import PromptType

    ret = loaded["BBCHeadlineRetrieval"].metadata
    assert tasks.instruction(ret, PromptType.query)
    assert tasks.instruction(ret, PromptType.document) is None
    assert tasks.instruction(ret, None) is None
    for name in ("LeeSTS", "TRECCoarseClassification", "ReutersR8Clustering", "SDGPairClassification"):
        meta = loaded[name].metadata
        sides = {tasks.instruction(meta, p) for p in (None, PromptType.query, PromptType.document)}
        assert len(sides) == 1 and None not in sides, name  # symmetric: one instruction, every text


def test_unknown_task_is_named():
    with pytest.raises(KeyError, match="NoSuchTask"):
        tasks.build("NoSuchTask")


class Counting:
    """A real encoder that also records how many texts each call embeds and with which instruction."""

    def __init__(self, encoder):
        self.encoder, self.dim, self.calls = encoder, encoder.dim, []

    def encode(self, texts, *, instruction=None, batch_size=32):
        self.calls.append((len(texts), instruction))
        return self.encoder.encode(texts, instruction=instruction, batch_size=batch_size)


@pytest.mark.integration
def test_every_task_runs_through_mteb(minilm_encoder):
    enc = Counting(minilm_encoder)
    cfg = evaluation.EvalConfig(max_rows=20)
    scores = evaluation.score_in_process(cfg, enc)
    assert set(scores) == set(tasks.NAMES)
    assert all(np.isfinite(v) for v in scores.values())
    # headlines find their article far above chance (1/20) even with a small general model
    assert scores["BBCHeadlineRetrieval"] > 0.8
    # the clustering pitfall: every sampled document is embedded, not mteb's default 4%
    clustering = tasks.build("ReutersR8Clustering", max_rows=30)
    enc.calls.clear()
    mteb.evaluate(mteb_adapters.LocalEncoder(enc), clustering, cache=None, co2_tracker=False,
                  show_progress_bar=False)
    assert sum(n for n, _ in enc.calls) == 30
    assert {i for _, i in enc.calls} == {clustering.metadata.prompt}


class RandomVectors:
    """A broken encoder: a fixed random unit vector per (instruction, text), unrelated to meaning."""

    dim = 384

    def encode(self, texts, *, instruction=None, batch_size=32):
        out = []
        for t in texts:
            key = hashlib.blake2b(f"{instruction}|{t}".encode(), digest_size=8).digest()
            v = np.random.default_rng(int.from_bytes(key, "little")).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


# Bars a working small encoder clears on 60 rows per task (MiniLM, mean pooling, measured: BBC 0.97,
# reranking 0.46, STS 0.48, TREC 0.65, Reuters 0.51) and random vectors do not (0.06-0.08, 0.28-0.29,
# -0.05-0.05, 0.22-0.25, 0.27-0.33 over two seeds). SDGPairClassification is left out: at this size
# MiniLM (0.58) does not beat random vectors (0.54), so the task cannot tell a broken encoder.
BARS = {"BBCHeadlineRetrieval": 0.8, "MovieDialogReranking": 0.4, "LeeSTS": 0.35,
        "TRECCoarseClassification": 0.5, "ReutersR8Clustering": 0.42}


@pytest.mark.integration
def test_scores_separate_a_real_encoder_from_random_vectors(minilm_encoder):
    cfg = evaluation.EvalConfig(max_rows=60, tasks=list(BARS))
    real = evaluation.score_in_process(cfg, minilm_encoder)
    broken = evaluation.score_in_process(cfg, RandomVectors())
    for name, bar in BARS.items():
        assert broken[name] < bar < real[name], (name, broken[name], real[name])
        assert real[name] - broken[name] > 0.1, name
