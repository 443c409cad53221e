"""A task's main score recomputed from the predictions mteb saved, and its bootstrap replicates.

`mteb.evaluate(..., prediction_folder=folder)` writes `folder/<TaskName>_predictions.json`: what the
model predicted per row (scores per query and document, similarity per pair, labels per test item,
cluster ids per document). This module recomputes the task's main score from that file and the task's
gold data (relevance judgements, scores, labels: mteb does not save them with the predictions), then
resamples the rows with replacement `n_boot` times (queries for retrieval and reranking, pairs for STS
and pair classification, test items for classification, documents for clustering), recomputes the
metric on each replicate and takes the 2.5 and 97.5 percentiles. Nothing is re-encoded or refitted:
the interval says how much the score would move on another sample of rows like these, given the
model's predictions (and, for classification and clustering, the classifiers and k-means runs mteb fitted).

    res = mteb.evaluate(adapter, task, prediction_folder=folder, ...)
    boot = replicates(task, folder / task.prediction_file_name)   # intervals.Bootstrap: point + replicates
    task_interval(task, folder / task.prediction_file_name)       # its Interval, in one call

How each main score is recomputed (the point equals `TaskResult.get_score()`; see the tests):
  Retrieval, Reranking (AbsTaskRetrieval): per-query values from pytrec_eval with mteb's measure
    (ndcg_cut.10, map_cut.1000, ...); the score is their mean, rounded to 5 decimals as mteb rounds it.
    A replicate is the (unrounded) mean over resampled queries.
  STS: scipy's spearmanr (or pearsonr) of the normalised gold scores against the saved similarities;
    a replicate ranks the resampled pairs with scipy's rankdata (ties averaged, as spearmanr does).
  PairClassification: sklearn's average_precision_score of the labels against the saved scores; a
    replicate is the same AP with each pair counted as often as it was drawn (a vectorised
    `average_precision_score(..., sample_weight=counts)`).
  Classification: sklearn's accuracy_score of each of mteb's experiments (one fitted classifier each,
    all predicting the same test items), averaged; a replicate resamples test items once and averages
    the experiments' accuracies on them.
  Clustering: mteb clusters `n_clusters` samples of the documents, drawn with replacement from the
    task's `random.Random(seed)`, and saves only the cluster ids, not which documents were drawn. The
    draws are replayed here from the task's seed (checked: a document drawn twice must get the same
    cluster id each time, or the replay is refused), so the v-measure of every run is sklearn's
    v_measure_score of the same labels and cluster ids as in mteb, and their mean is mteb's score. A
    replicate resamples the documents and weighs each run's entries by how often their document was
    drawn (a vectorised v-measure of the weighted contingency table), keeping mteb's cluster ids.
    Not exact, and corrected: a replicate's v-measure is biased upward (the documents are drawn twice
    over, and a document's copies always share a cluster), so the clustering replicates are shifted
    by their mean minus the point (the bootstrap's bias estimate) and the interval is centred on
    mteb's score. The point itself is exact.
    A task object already evaluated once before (its random state moved on) cannot be replayed:
    evaluate a freshly built task.

Replicates are seeded by (seed, task name): the tasks of a mean are resampled independently, and two
models' predictions on the same task resample the same rows, so `a.values - b.values` is a paired
bootstrap of their difference (`intervals.difference_interval`).
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr
from sklearn.metrics import accuracy_score, average_precision_score, v_measure_score

from mgh_ray.intervals import Bootstrap, Interval

log = logging.getLogger(__name__)

_PYTREC = {"ndcg_at": "ndcg_cut", "map_at": "map_cut", "recall_at": "recall", "precision_at": "P",
           "hit_rate_at": "success"}
# STS and pair classification: the similarity a main score is computed on, and whether higher
# means more similar (mteb's PairClassification negates distances before AP)
_SIMILARITY = {"cosine": ("cosine_scores", True), "manhattan": ("manhattan_distances", False),
               "euclidean": ("euclidean_distances", False), "similarity": ("similarity_scores", True),
               "dot": ("dot_scores", True)}


class NoBootstrap(ValueError):
    """`replicates` cannot resample this task or its score (a registry task of another type, metric or
    split layout): the task is scored as usual, without an interval."""


def supports(task: Any) -> bool:
    """Whether `replicates` can resample `task`: one of the five task types below, with one subset (the
    project's tasks; registry tasks of those types that are not multilingual)."""
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    kinds = (AbsTaskRetrieval, AbsTaskSTS, AbsTaskPairClassification, AbsTaskClassification, AbsTaskClustering)
    return isinstance(task, kinds) and list(getattr(task, "hf_subsets", None) or ["default"]) == ["default"]


def replicates(task: Any, predictions: Path | str | Any, n_boot: int = 1000, seed: int = 0, *,
               subset: str = "default", split: str = "test") -> Bootstrap:
    """The main score of `task` recomputed from mteb's predictions, and its `n_boot` bootstrap replicates.

    `task` is the mteb task the predictions came from (its gold data is loaded if it is not yet);
    `predictions` is the path of mteb's `<TaskName>_predictions.json` or what it holds for one
    subset and split (`json.load(f)[subset][split]`).
    """
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, not {n_boot}")
    if isinstance(predictions, (str, Path)):
        predictions = json.loads(Path(predictions).read_text())[subset][split]
    if not task.data_loaded:
        task.load_data()
    data = task.dataset[subset][split] if subset in task.dataset else task.dataset[split]
    metric = task.metadata.main_score
    name = task.metadata.name
    # one stream per (seed, task): tasks of a mean are independent, models on one task are paired
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if isinstance(task, AbsTaskRetrieval):
        return _retrieval(task, data, predictions, metric, n_boot, rng)
    if isinstance(task, AbsTaskSTS):
        gold = np.array(list(map(task._normalize, data["score"])), dtype=np.float64)  # as mteb does
        return _sts(gold, predictions, metric, n_boot, rng)
    if isinstance(task, AbsTaskPairClassification):
        return _pair_classification(np.asarray(data[task.label_column_name], dtype=np.int64), predictions,
                                    metric, n_boot, rng)
    if isinstance(task, AbsTaskClassification):
        return _classification(task, data, predictions, metric, n_boot, rng)
    if isinstance(task, AbsTaskClustering):
        return _clustering(task, data, predictions, metric, n_boot, rng)
    raise NoBootstrap(f"{name}: no bootstrap for {type(task).__name__} ({task.metadata.type})")


def task_interval(task: Any, prediction_file: Path, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> Interval:
    """The `level` bootstrap interval of `task`'s main score, from mteb's prediction file for it."""
    interval = replicates(task, prediction_file, n_boot, seed).interval(level)
    log.info("%s %s: %.4f [%.4f, %.4f] (%d rows, %d replicates)", task.metadata.name,
             task.metadata.main_score, interval.point, interval.low, interval.high, interval.n_rows, n_boot)
    return interval


def _draws(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """(n_boot, n) row indices, each row a resample of range(n) with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(n_boot, n) how often each row was drawn in each replicate, from `_draws`' (n_boot, n) indices."""
    n_boot = idx.shape[0]
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()  # (n_boot * n,) offsets per replicate
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _retrieval(task: Any, data: Mapping[str, Any], results: Mapping[str, Mapping[str, float]], metric: str,
               n_boot: int, rng: np.random.Generator) -> Bootstrap:
    import pytrec_eval

    family, _, k = metric.rpartition("_")
    if family not in _PYTREC or not k.isdigit():
        raise NoBootstrap(f"{task.metadata.name}: no per-query form of {metric!r}")
    if task.ignore_identical_ids or task.skip_first_result:
        raise NoBootstrap(f"{task.metadata.name}: ignore_identical_ids/skip_first_result")
    # mteb drops queries without a relevant document, and pytrec_eval scores only queries in both
    qrels = {q: dict(docs) for q, docs in data["relevant_docs"].items() if docs}
    measure = f"{_PYTREC[family]}.{k}"
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(dict(results))
    key = f"{_PYTREC[family]}_{k}"
    # mteb's mean: over pytrec_eval's queries in its order, rounded to 5 decimals (parse_metrics_from_scores)
    point = round(sum(s[key] for s in per_query.values()) / len(per_query), 5)
    values = np.array([per_query[q][key] for q in sorted(per_query)], dtype=np.float64)  # (n,) sorted ids
    n = values.size
    reps = _counts(_draws(rng, n_boot, n), n) @ values / n  # (n_boot,) mean over resampled queries
    return Bootstrap(point, reps, n)


def _similarity_key(metric: str, suffixes: Sequence[str]) -> tuple[str, bool, str]:
    """(prediction key, higher is more similar, suffix) of a score such as 'cosine_spearman'."""
    for suffix in suffixes:
        if metric == suffix:  # STS's bare 'spearman' / 'pearson': the model's own similarity
            return *_SIMILARITY["similarity"], suffix
        if metric.endswith(f"_{suffix}") and metric[: -len(suffix) - 1] in _SIMILARITY:
            return *_SIMILARITY[metric[: -len(suffix) - 1]], suffix
    raise NoBootstrap(f"no bootstrap for the score {metric!r}")


def _sts(gold: np.ndarray, predictions: Mapping[str, Any], metric: str, n_boot: int,
         rng: np.random.Generator) -> Bootstrap:
    key, _, corr = _similarity_key(metric, ("spearman", "pearson"))
    predicted = np.asarray(predictions[key], dtype=np.float64)  # (n,)
    if predicted.shape != gold.shape:
        raise ValueError(f"{len(predicted)} predicted similarities for {len(gold)} gold scores")
    func = spearmanr if corr == "spearman" else pearsonr
    point = float(func(gold, predicted)[0])  # mteb: float(spearmanr(normalized, scores)[0])
    idx = _draws(rng, n_boot, gold.size)  # (n_boot, n)
    x, y = gold[idx], predicted[idx]  # (n_boot, n) each
    if corr == "spearman":  # spearman is pearson on average ranks, the ranks spearmanr uses
        x, y = rankdata(x, axis=1), rankdata(y, axis=1)
    return Bootstrap(point, _rowwise_pearson(x, y), gold.size)


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n_boot,) Pearson correlation of each row of x with the same row of y, both (n_boot, n)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant resample: undefined (nan)
        return np.clip((xc * yc).sum(axis=1) / denom, -1.0, 1.0)


def _pair_classification(labels: np.ndarray, predictions: Mapping[str, Any], metric: str, n_boot: int,
                         rng: np.random.Generator) -> Bootstrap:
    key, higher_similar, _ = _similarity_key(metric, ("ap",))
    scores = np.asarray(predictions[key], dtype=np.float64) * (1 if higher_similar else -1)  # (n,)
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} predicted scores for {len(labels)} labels")
    point = float(average_precision_score(labels, scores))  # as mteb's _compute_metrics_values
    n = labels.size
    return Bootstrap(point, _weighted_ap(labels, scores, _counts(_draws(rng, n_boot, n), n)), n)


def _weighted_ap(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_boot,) sklearn's average precision of (labels, scores), both (n,), under each row of
    (n_boot, n) sample weights: sum over distinct thresholds of (recall step) x precision, where pairs
    of equal score form one threshold (sklearn's _binary_clf_curve)."""
    order = np.argsort(-scores, kind="stable")  # (n,) by score, descending
    ranked = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]  # (t,) last pair of each threshold
    w = weights[:, order]  # (n_boot, n)
    tps = np.cumsum(w * labels[order], axis=1)[:, ends]  # (n_boot, t) weighted true positives so far
    fps = np.cumsum(w * (1 - labels[order]), axis=1)[:, ends]  # (n_boot, t)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tps + fps > 0, tps / (tps + fps), 0.0)  # (n_boot, t)
        recall = tps / tps[:, -1:]  # (n_boot, t); nan when a replicate drew no positive pair
    steps = np.diff(recall, axis=1, prepend=0.0)  # (n_boot, t)
    return (steps * precision).sum(axis=1)


def _classification(task: Any, data: Any, predictions: Sequence[Sequence[Any]], metric: str, n_boot: int,
                    rng: np.random.Generator) -> Bootstrap:
    from mteb.abstasks.multilabel_classification import AbsTaskMultilabelClassification
    from mteb.abstasks.regression import AbsTaskRegression

    if metric != "accuracy" or task.is_cross_validation or isinstance(
            task, (AbsTaskMultilabelClassification, AbsTaskRegression)):
        raise NoBootstrap(f"{task.metadata.name}: only single-split accuracy is bootstrapped")
    y_test = np.asarray(data[task.label_column_name])  # (n,) the test split's labels
    if any(len(p) != len(y_test) for p in predictions):
        raise ValueError(f"predictions of {[len(p) for p in predictions]} items for {len(y_test)} test items")
    # mteb: accuracy_score per experiment, then float(np.mean(...)) over the experiments
    point = float(np.mean([accuracy_score(y_test, p) for p in predictions]))
    correct = np.array([np.asarray(p) == y_test for p in predictions], dtype=np.float64)  # (experiments, n)
    n = y_test.size
    # the mean over experiments of each one's accuracy on the resampled items = the resampled mean of
    # each item's accuracy over experiments (the experiments classify the same items)
    reps = _counts(_draws(rng, n_boot, n), n) @ correct.mean(axis=0) / n  # (n_boot,)
    return Bootstrap(point, reps, n)


def _clustering(task: Any, data: Any, predictions: Mapping[str, list[list[int]]], metric: str, n_boot: int,
                rng: np.random.Generator) -> Bootstrap:
    if metric != "v_measure":
        raise NoBootstrap(f"{task.metadata.name}: only v_measure is bootstrapped, not {metric!r}")
    labels = list(data[task.label_column_name])
    if any(isinstance(label, list) for label in labels) or list(predictions) != ["Level 0"]:
        raise NoBootstrap(f"{task.metadata.name}: hierarchical (multi-level) labels")
    runs = [np.asarray(a, dtype=np.int64) for a in predictions["Level 0"]]  # n_clusters x (cluster_size,)
    docs = _replay_clustering_draws(task, len(labels), len(runs), len(runs[0]))  # (runs, cluster_size)
    _, y = np.unique(np.asarray(labels), return_inverse=True)  # (n_docs,) class ids 0..C-1
    for r, (drawn, assigned) in enumerate(zip(docs, runs, strict=True)):
        # k-means gives identical embeddings one id; if the replayed draws are not mteb's, the same
        # document would (almost surely) show up with several ids
        if np.unique(drawn).size != np.unique(np.stack([drawn, assigned]), axis=1).shape[1]:
            raise ValueError(f"{task.metadata.name}: mteb's clustering draws could not be replayed from "
                             f"seed {task.seed} (run {r}); evaluate a freshly built task")
    # mteb: float(np.mean([v_measure_score(labels[drawn], assigned) for each run]))
    point = float(np.mean([v_measure_score(y[d], a) for d, a in zip(docs, runs, strict=True)]))
    n = len(labels)
    weights = _counts(_draws(rng, n_boot, n), n)  # (n_boot, n_docs) draws of each document
    reps = np.mean([_weighted_v_measure(y[d], a, weights[:, d]) for d, a in zip(docs, runs, strict=True)],
                   axis=0)  # (n_boot,)
    # Resampling documents that mteb's runs already drew with replacement duplicates them further, and
    # duplicates always share a cluster: v-measure on a replicate is biased upward (~ +0.04 at 60
    # documents, about one standard deviation of the replicates). Shift the replicates by that bias,
    # estimated as mean(replicates) - point, so the interval is centred on mteb's score.
    return Bootstrap(point, reps - (np.nanmean(reps) - point), n)


def _replay_clustering_draws(task: Any, n_docs: int, n_runs: int, cluster_size: int) -> np.ndarray:
    """(n_runs, cluster_size) the dataset rows mteb's clustering runs drew, replayed from the task's
    seed: AbsTask keeps `random.Random(seed)`, AbsTaskClustering first samples the documents to embed
    (only when a cap is set) and then draws `cluster_size` of them with replacement per run."""
    state = random.Random(task.seed)
    embedded = list(range(n_docs))
    if task.max_document_to_embed is not None or task.max_fraction_of_documents_to_embed is not None:
        cap = (int(task.max_fraction_of_documents_to_embed * n_docs)
               if task.max_fraction_of_documents_to_embed is not None else task.max_document_to_embed)
        embedded = state.sample(range(n_docs), k=min(n_docs, cap))
    rows = np.asarray(embedded)
    return np.stack([rows[state.choices(range(len(rows)), k=cluster_size)] for _ in range(n_runs)])


def _weighted_v_measure(classes: np.ndarray, clusters: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_boot,) sklearn's v_measure_score (beta 1) of (classes, clusters), both (m,), with entry j
    counted weights[b, j] times in replicate b; weights is (n_boot, m). V-measure depends only on the
    contingency table, so this equals v_measure_score on the entries repeated that often."""
    n_clusters = int(clusters.max()) + 1
    cells = classes * n_clusters + clusters  # (m,) contingency cell of each entry
    n_cells = (int(classes.max()) + 1) * n_clusters
    onehot = np.zeros((cells.size, n_cells))
    onehot[np.arange(cells.size), cells] = 1.0
    table = (weights @ onehot).reshape(len(weights), -1, n_clusters)  # (n_boot, classes, clusters)
    total = table.sum(axis=(1, 2))  # (n_boot,)

    def entropy(p: np.ndarray) -> np.ndarray:  # (n_boot, k) probabilities -> (n_boot,) in nats
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)

    joint = table / total[:, None, None]
    p_class, p_cluster = joint.sum(axis=2), joint.sum(axis=1)  # (n_boot, classes), (n_boot, clusters)
    h_class, h_cluster = entropy(p_class), entropy(p_cluster)
    h_joint = entropy(joint.reshape(len(joint), -1))
    mutual = np.clip(h_class + h_cluster - h_joint, 0.0, None)  # (n_boot,)
    with np.errstate(divide="ignore", invalid="ignore"):
        # sklearn: homogeneity (completeness) is 1 when the classes (clusters) carry no entropy
        homogeneity = np.where(h_class > 0, mutual / h_class, 1.0)
        completeness = np.where(h_cluster > 0, mutual / h_cluster, 1.0)
        v = np.where(homogeneity + completeness > 0,
                     2 * homogeneity * completeness / (homogeneity + completeness), 0.0)
    return v
