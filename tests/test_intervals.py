"""Bootstrap intervals from mteb's saved predictions: on the six real tasks scored by mteb with the real
MiniLM encoder, the point recomputed from the predictions is mteb's main score, the interval holds it,
narrows with more rows, is seeded, and averages over tasks; the vectorised replicate metrics equal
sklearn's and scipy's on explicitly resampled rows."""

from __future__ import annotations

import json

import mteb
import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, v_measure_score

from mgh_ray import intervals, mteb_adapters, resampling, tasks

SMALL, BIG = 40, 160  # rows per task; a table's 40-row sample is the first rows of its 160-row one
# Among 40 (even 60) BBC articles MiniLM ranks every headline's article first: ndcg@10 is 1 on every
# query, so every resample scores 1 and the interval is [1, 1] (true, but no test of its width). With
# 160 articles some headlines miss.
ROWS = {name: BIG if name == "BBCHeadlineRetrieval" else SMALL for name in tasks.NAMES}


class _CachedEncoder:
    """The encoder behind a per-(instruction, text) cache: the seeded samples of one table are nested,
    so a task's 40-row run re-uses its 160-row run's vectors (and Lee's 50 documents are encoded once)."""

    def __init__(self, encoder) -> None:
        self.encoder, self.dim, self.cache = encoder, encoder.dim, {}

    def encode(self, texts, *, instruction=None, batch_size=32, truncation="truncate"):
        missing = list(dict.fromkeys(t for t in texts if (instruction, t) not in self.cache))
        if missing:
            vectors = self.encoder.encode(missing, instruction=instruction, batch_size=batch_size,
                                          truncation=truncation)
            self.cache.update(zip(((instruction, t) for t in missing), np.asarray(vectors), strict=True))
        return np.stack([self.cache[(instruction, t)] for t in texts])


@pytest.fixture(scope="module")
def adapter(minilm_path):
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    encoder = Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean")))
    return mteb_adapters.LocalEncoder(_CachedEncoder(encoder), "minilm")


@pytest.fixture(scope="module")
def scored(adapter, tmp_path_factory):
    """scored(name, rows) -> (task, mteb's main score, prediction file); each task and size runs once."""
    runs: dict[tuple[str, int], tuple] = {}

    def run(name: str, rows: int):
        if (name, rows) not in runs:
            task = tasks.build(name, max_rows=rows, seed=0)
            folder = tmp_path_factory.mktemp(f"pred-{name}-{rows}")
            result = mteb.evaluate(adapter, task, cache=None, overwrite_strategy="always", co2_tracker=False,
                                   show_progress_bar=False, prediction_folder=folder)
            score = float(result.task_results[0].get_score())
            runs[name, rows] = task, score, folder / task.prediction_file_name
        return runs[name, rows]

    return run


def _rows(task) -> int:
    """The rows a task's score is a mean or statistic over: queries, pairs, test items, documents."""
    data = task.dataset["default"]["test"] if "default" in task.dataset else task.dataset["test"]
    return len(data["queries"]) if isinstance(data, dict) else len(data)


def _interval(scored, name: str, rows: int, **kwargs) -> intervals.Interval:
    task, _, path = scored(name, rows)
    return resampling.task_interval(task, path, **kwargs)


@pytest.mark.parametrize("name", tasks.NAMES)
def test_point_is_mteb_score_and_the_interval_holds_it(scored, name):
    task, score, path = scored(name, ROWS[name])
    assert path.is_file()
    boot = resampling.replicates(task, path, n_boot=1000, seed=0)
    assert boot.point == pytest.approx(score, abs=1e-6), name
    assert boot.values.shape == (1000,) and np.isfinite(boot.values).all()
    iv = resampling.task_interval(task, path)
    assert iv == boot.interval()
    assert iv.low <= iv.point <= iv.high and iv.contains(score)
    assert iv.width > 0.005, iv
    assert -1 <= iv.low and iv.high <= 1
    assert iv.n_rows == _rows(task) and ROWS[name] * 0.9 <= iv.n_rows <= ROWS[name]  # reranking: fewer


# Retrieval is checked on the reranking task (mteb's retrieval evaluator and metrics, 10 candidates per
# query at any size): BBCHeadlineRetrieval's corpus grows with its rows, so its task gets harder (MiniLM's
# ndcg@10 falls from ~1 at 40 rows), the per-query spread grows and the interval need not narrow.
@pytest.mark.parametrize("name", ["LeeSTS", "MovieDialogReranking"])
def test_interval_narrows_as_rows_grow(scored, name):
    small, big = _interval(scored, name, SMALL), _interval(scored, name, BIG)
    assert 3.5 * small.n_rows <= big.n_rows <= 4 * small.n_rows  # reranking drops duplicate replies
    # 4x the rows: about half the width (1/sqrt(4)); "clearly" smaller, with room for sampling noise
    assert big.width < 0.75 * small.width, (small, big)


def test_same_seed_same_interval_other_seed_slightly_different(scored):
    first, again = _interval(scored, "LeeSTS", SMALL), _interval(scored, "LeeSTS", SMALL, seed=0)
    other = _interval(scored, "LeeSTS", SMALL, seed=1)
    assert first == again
    assert (other.low, other.high) != (first.low, first.high) and other.point == first.point
    assert abs(other.low - first.low) < 0.25 * first.width
    assert abs(other.high - first.high) < 0.25 * first.width


def test_mean_interval_over_independent_tasks(scored, tmp_path):
    runs = {name: scored(name, ROWS[name]) for name in tasks.NAMES}
    boots = {name: resampling.replicates(task, path) for name, (task, _, path) in runs.items()}
    points = [b.point for b in boots.values()]
    mean = intervals.mean_interval([b.values for b in boots.values()], points,
                                   n_rows=[b.n_rows for b in boots.values()])
    widths = [b.interval().width for b in boots.values()]
    assert mean.point == pytest.approx(np.mean(points)) and mean.contains(mean.point)
    assert mean.n_rows == sum(b.n_rows for b in boots.values())
    # independent tasks: the mean's spread is ~sqrt(sum of squares)/6 of theirs, below even the average
    assert mean.width < max(widths) and mean.width < np.mean(widths), (mean, widths)

    # tasks are resampled independently (seeded by task name): LeeSTS and SDG have as many rows, yet
    # their replicates are not drawn from the same rows
    assert abs(np.corrcoef(boots["LeeSTS"].values, boots["SDGPairClassification"].values)[0, 1]) < 0.2

    # saved and loaded, any subset's mean is the same as from the arrays in memory
    path = intervals.save_bootstraps(tmp_path / "replicates.json", boots)
    loaded = intervals.load_bootstraps(path)
    assert set(loaded) == set(boots)
    for name, boot in boots.items():
        assert loaded[name].point == boot.point and np.array_equal(loaded[name].values, boot.values)
    subset = ["LeeSTS", "BBCHeadlineRetrieval"]
    assert intervals.mean_interval([loaded[t].values for t in subset], [loaded[t].point for t in subset]) == \
        intervals.mean_interval([boots[t].values for t in subset], [boots[t].point for t in subset])
    with pytest.raises(ValueError, match="same number"):
        intervals.mean_interval([boots["LeeSTS"].values, boots["LeeSTS"].values[:10]], [0.1, 0.2])


def test_clustering_draws_must_replay(scored):
    _, _, path = scored("ReutersR8Clustering", SMALL)
    stale = tasks.build("ReutersR8Clustering", max_rows=SMALL, seed=0)
    stale.load_data()
    stale.seed = 1  # same documents, but not the random state mteb drew its clustering samples from
    with pytest.raises(ValueError, match="replayed"):
        resampling.replicates(stale, path)


def test_paired_models_resample_the_same_rows(scored):
    """Two sets of predictions on one task resample the same rows: replicate differences are paired."""
    task, _, path = scored("SDGPairClassification", SMALL)
    preds = json.loads(path.read_text())["default"]["test"]
    worse = {k: (np.asarray(v) + np.random.default_rng(0).normal(0, 0.05, len(v))).tolist()
             for k, v in preds.items()}
    a, b = resampling.replicates(task, preds), resampling.replicates(task, worse)
    assert np.corrcoef(a.values, b.values)[0, 1] > 0.5  # the same resampled pairs in replicate k


def test_paired_difference_is_narrower_than_either_interval_and_centred_on_the_difference(scored):
    """A model and a noisier copy of it on the same STS pairs: the paired interval of their difference
    holds the difference of their scores and is far narrower than either model's own interval (the
    pairs' shared difficulty cancels); replicates of other rows are refused."""
    task, _, path = scored("LeeSTS", SMALL)
    preds = json.loads(path.read_text())["default"]["test"]
    # noise of a tenth of the similarities' spread: measured, paired width 0.17 against 0.58 and 0.61
    noisy = {k: (np.asarray(v) + np.random.default_rng(1).normal(0, 0.1 * np.std(v), len(v))).tolist()
             for k, v in preds.items()}
    a, b = {"LeeSTS": resampling.replicates(task, preds)}, {"LeeSTS": resampling.replicates(task, noisy)}
    diff = intervals.difference_interval(a, b, ["LeeSTS"])
    assert diff.point == pytest.approx(a["LeeSTS"].point - b["LeeSTS"].point) and diff.low <= diff.point <= diff.high
    assert diff.width < 0.5 * min(a["LeeSTS"].interval().width, b["LeeSTS"].interval().width), diff
    other = {"LeeSTS": intervals.Bootstrap(b["LeeSTS"].point, b["LeeSTS"].values[:500], b["LeeSTS"].n_rows)}
    with pytest.raises(ValueError, match="same evaluate.bootstrap"):
        intervals.difference_interval(a, other, ["LeeSTS"])


# The vectorised replicate metrics against the library functions on explicitly resampled rows (with
# ties, duplicates and rows drawn zero times).

def _resamples(n: int, n_boot: int = 20, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n)


def test_weighted_ap_is_sklearns_on_resampled_pairs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.normal(size=50) + labels, 1)  # rounded: many tied scores
    idx = _resamples(50)
    fast = resampling._weighted_ap(labels, scores, resampling._counts(idx, 50))
    slow = [average_precision_score(labels[i], scores[i]) for i in idx]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_weighted_v_measure_is_sklearns_on_resampled_documents():
    rng = np.random.default_rng(1)
    classes, clusters = rng.integers(0, 4, 60), rng.integers(0, 5, 60)
    clusters[:30] = classes[:30]  # half agree, so the score is far from 0
    idx = _resamples(60)
    fast = resampling._weighted_v_measure(classes, clusters, resampling._counts(idx, 60))
    slow = [v_measure_score(classes[i], clusters[i]) for i in idx]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    one_class = resampling._weighted_v_measure(np.zeros(4, int), np.arange(4), np.ones((1, 4)))
    assert one_class[0] == pytest.approx(v_measure_score(np.zeros(4, int), np.arange(4)))


def test_resampled_spearman_is_scipys():
    rng = np.random.default_rng(2)
    gold, predicted = np.round(rng.random(40), 1), rng.random(40)  # ties in the gold scores
    idx = _resamples(40)
    from scipy.stats import rankdata

    fast = resampling._rowwise_pearson(rankdata(gold[idx], axis=1), rankdata(predicted[idx], axis=1))
    slow = [spearmanr(gold[i], predicted[i])[0] for i in idx]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_bad_arguments_are_refused():
    boot = intervals.Bootstrap(0.5, np.array([0.4, 0.5, np.nan, 0.6]), 4)
    assert boot.interval().contains(0.5)  # an undefined replicate is left out, not propagated
    with pytest.raises(ValueError, match="level"):
        boot.interval(level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        resampling.replicates(object(), {}, n_boot=0)


def test_a_score_it_cannot_resample_is_refused_by_name(scored):
    """A task whose main score has no bootstrap form (here LeeSTS asked for a made-up one) raises
    NoBootstrap; evaluation then reports the score without an interval instead of failing."""
    task, _, path = scored("LeeSTS", SMALL)
    other = tasks.build("LeeSTS", max_rows=SMALL, seed=0)
    other.metadata = other.metadata.model_copy(update={"main_score": "kendall_tau"})
    with pytest.raises(resampling.NoBootstrap, match="kendall_tau"):
        resampling.replicates(other, path)
