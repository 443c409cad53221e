"""Offline MTEB tasks built from the fetched corpora (`corpora`): one per task family, none from `seeds`.

Each task is an `mteb` task subclass whose `load_data` builds its dataset from `corpora.table(...)`,
so `mteb.evaluate` scores it with mteb's own evaluator and writes mteb's own result files:

    name                        family               source        main score
    BBCHeadlineRetrieval        Retrieval            bbc_eval      ndcg_at_10   (headline -> its article)
    MovieDialogReranking        Reranking            moviedialog   map_at_1000  (statement -> reply among k)
    LeeSTS                      STS                  lee           cosine_spearman
    TRECCoarseClassification    Classification       trec          accuracy     (6 coarse classes)
    ReutersR8Clustering         Clustering           reuters_r8    v_measure
    SDGPairClassification       PairClassification   sdg           similarity_ap (text, goal name)

Sizes are small and seeded: `build(name, max_rows=200, seed=0)` subsamples every table the same way on
every machine, and the subsample size is part of the task's dataset revision, so results of a
different size never count as "already finished".

Instructions (E5 style) live in each task's `metadata.prompt`. Asymmetric tasks (retrieval,
reranking) carry `{"query": ...}`: queries get the instruction, documents none. Symmetric tasks carry
one string and every text gets it, on both sides of a pair. `instruction(metadata, prompt_type)` is
the one place that decides, for the served and the in-process encoder alike.

    tasks.build("LeeSTS", max_rows=100).load_data()
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType

from mgh_ray import corpora
from mgh_ray.records import DEFAULT_INSTRUCTION
from mgh_ray.report import TASK_NAMES

log = logging.getLogger(__name__)

DATA_VERSION = "mgh3"  # bump when a task's construction changes, so old results are not reused

_COMMON: dict[str, Any] = {
    "category": "t2t",
    "eval_splits": ["test"],
    "eval_langs": ["eng-Latn"],
    "dialect": [],
    "modalities": ["text"],
    "sample_creation": "found",
    "bibtex_citation": "",
    "license": "not specified",
}


def _meta(**kwargs: Any) -> TaskMetadata:
    kwargs["dataset"] = {"path": f"mgh_ray/{kwargs['name']}", "revision": DATA_VERSION}
    return TaskMetadata(**(_COMMON | kwargs))


def _sample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    return df.sample(n=n, random_state=seed).reset_index(drop=True)


class _Sized:
    """Mixin: a seeded row cap, recorded in the dataset revision (so a resize is a new dataset)."""

    metadata: TaskMetadata

    def __init__(self, max_rows: int | None = None, seed: int = 0, **kwargs: Any) -> None:
        self.max_rows = max_rows
        size = "all" if max_rows is None else str(max_rows)
        dataset = dict(self.metadata.dataset) | {"revision": f"{DATA_VERSION}-n{size}-s{seed}"}
        self.metadata = self.metadata.model_copy(update={"dataset": dataset})
        super().__init__(seed=seed, **kwargs)  # type: ignore[call-arg]


def _retrieval_split(ids: pd.Series, queries: pd.Series, docs: pd.Series,
                     top_ranked: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """mteb's retrieval split: query q<id> has the one relevant document d<id>."""
    return {
        "queries": Dataset.from_dict({"id": [f"q{i}" for i in ids], "text": queries.tolist()}),
        "corpus": Dataset.from_dict({"id": [f"d{i}" for i in ids], "text": docs.tolist()}),
        "relevant_docs": {f"q{i}": {f"d{i}": 1} for i in ids},
        "top_ranked": top_ranked,
    }


class BBCHeadlineRetrieval(_Sized, AbsTaskRetrieval):
    """Headline -> article over held-out BBC articles. The document is the body only (no title)."""

    metadata = _meta(
        name="BBCHeadlineRetrieval", type="Retrieval", main_score="ndcg_at_10",
        description="Find the BBC News article (body only) that a headline belongs to; BBC articles held "
                    "out from the training seeds, deduplicated.",
        reference="http://mlg.ucd.ie/datasets/bbc.html", date=("2004-01-01", "2005-12-31"),
        domains=["News", "Written"], annotations_creators="derived",
        prompt={"query": DEFAULT_INSTRUCTION},  # the instruction of its training seeds
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        df = _sample(corpora.table("bbc_eval"), self.max_rows, self.seed)
        self.dataset = {"default": {"test": _retrieval_split(df.id, df.title, df.body)}}
        self.data_loaded = True


class MovieDialogReranking(_Sized, AbsTaskRetrieval):
    """Rank the true reply to a movie line among `n_candidates - 1` replies sampled from other lines."""

    n_candidates = 10
    metadata = _meta(
        name="MovieDialogReranking", type="Reranking", main_score="map_at_1000",
        description="Given a line from a film dialogue, rank its true reply above replies to other lines "
                    "(Cornell movie-dialog pairs).",
        reference="https://www.cs.cornell.edu/~cristian/Cornell_Movie-Dialogs_Corpus.html",
        date=("1927-01-01", "2010-12-31"), domains=["Fiction", "Spoken"], annotations_creators="derived",
        prompt={"query": corpora.MOVIE_INSTRUCTION},  # the instruction of its training seeds
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        movies = corpora.table("moviedialog")
        df = _sample(movies[movies.split == "eval"].reset_index(drop=True), self.max_rows, self.seed)
        df = df.drop_duplicates("reply").reset_index(drop=True)
        rng = pd.Series(range(len(df))).sample(frac=1.0, random_state=self.seed + 1).tolist()
        k = min(self.n_candidates, len(df))
        top_ranked = {}
        for i, row in df.iterrows():
            # distractors: the next k-1 rows of one seeded permutation, skipping this row
            others = [j for j in (rng[(i + s) % len(df)] for s in range(1, k + 1)) if j != i][: k - 1]
            top_ranked[f"q{row.id}"] = [f"d{row.id}"] + [f"d{df.id[j]}" for j in others]
        self.dataset = {"default": {"test": _retrieval_split(df.id, df.statement, df.reply, top_ranked)}}
        self.data_loaded = True


class LeeSTS(_Sized, AbsTaskSTS):
    """Document-level similarity of news articles (Lee, Pincombe & Welsh 2005), human scores in 0-1."""

    min_score = 0
    max_score = 1
    metadata = _meta(
        name="LeeSTS", type="STS", main_score="cosine_spearman",
        description="Mean human similarity judgements of pairs of 50 short news documents.",
        reference="https://hdl.handle.net/2440/28910", date=("2005-01-01", "2005-12-31"),
        domains=["News", "Written"], annotations_creators="human-annotated",
        prompt="Retrieve semantically similar text",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        df = _sample(corpora.table("lee"), self.max_rows, self.seed)
        test = Dataset.from_dict({"sentence1": df.text1.tolist(), "sentence2": df.text2.tolist(),
                                  "score": df.score.astype(float).tolist()})
        self.dataset = DatasetDict({"test": test})
        self.data_loaded = True


class TRECCoarseClassification(_Sized, AbsTaskClassification):
    """TREC questions -> 6 coarse answer types; logistic regression on a seeded train/test split.

    The train table gets `train_factor` x max_rows rows (questions are short): with as few training
    rows as test rows, mteb's logistic regression only ever predicts the majority class.
    """

    samples_per_label = 16
    n_experiments = 5
    train_factor = 4
    metadata = _meta(
        name="TRECCoarseClassification", type="Classification", main_score="accuracy",
        eval_splits=["test"],
        description="Classify a question by the coarse type of its answer (TREC QC, Li & Roth 2002).",
        reference="https://cogcomp.seas.upenn.edu/Data/QA/QC/", date=("2002-01-01", "2002-12-31"),
        domains=["Written"], annotations_creators="expert-annotated",
        prompt="Classify the given question by the type of its answer: abbreviation, entity, description, "
               "person, location or number",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        df = corpora.table("trec")
        splits = {}
        for name in ("train", "test"):
            n = self.max_rows * (self.train_factor if name == "train" else 1) if self.max_rows else None
            part = _sample(df[df.split == name], n, self.seed)
            splits[name] = Dataset.from_dict({"text": part.text.tolist(), "label": part.coarse.tolist()})
        self.dataset = DatasetDict(splits)
        self.data_loaded = True


class ReutersR8Clustering(_Sized, AbsTaskClustering):
    """Reuters R8 test documents clustered by topic; every sampled document is embedded."""

    max_fraction_of_documents_to_embed = None  # mteb's default embeds only 4% of the documents
    metadata = _meta(
        name="ReutersR8Clustering", type="Clustering", main_score="v_measure",
        description="Cluster Reuters-21578 newswire documents (R8 subset, test part) by their topic.",
        reference="https://ana.cachopo.org/datasets-for-single-label-text-categorization",
        date=("1987-01-01", "1987-12-31"), domains=["News", "Written"],
        annotations_creators="expert-annotated",
        prompt="Identify the topic or theme of the given news article",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        df = _sample(corpora.table("reuters_r8"), self.max_rows, self.seed)
        # each bootstrap draw resamples as many documents as there are (mteb's default is 16,384)
        self.max_documents_per_cluster = len(df)
        test = Dataset.from_dict({"sentences": df.text.tolist(), "labels": df.label.tolist()})
        self.dataset = DatasetDict({"test": test})
        self.data_loaded = True


class SDGPairClassification(_Sized, AbsTaskPairClassification):
    """Is a text relevant to a UN sustainable development goal (pair = text, goal name)?"""

    metadata = _meta(
        name="SDGPairClassification", type="PairClassification", main_score="similarity_ap",
        description="Expert labels of whether a text addresses a UN Sustainable Development Goal, given as "
                    "(text, goal name) pairs.",
        reference="https://pypi.org/project/sdgclassification-benchmark/", date=("2015-01-01", "2023-12-31"),
        domains=["Government", "Written"], annotations_creators="expert-annotated",
        prompt="Decide whether the text addresses the given sustainable development goal",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        df = _sample(corpora.table("sdg"), self.max_rows, self.seed)
        test = Dataset.from_dict({"sentence1": df.text.tolist(), "sentence2": df.goal.tolist(),
                                  "labels": df.label.astype(int).tolist()})
        self.dataset = DatasetDict({"test": test})
        self.data_loaded = True


TASKS: dict[str, type] = {cls.metadata.name: cls for cls in (
    BBCHeadlineRetrieval, MovieDialogReranking, LeeSTS, TRECCoarseClassification, ReutersR8Clustering,
    SDGPairClassification)}
NAMES = TASK_NAMES
if tuple(TASKS) != NAMES:
    raise ImportError(f"tasks.TASKS {tuple(TASKS)} and report.TASK_NAMES {NAMES} must name the same tasks")
SOURCES = {"BBCHeadlineRetrieval": "bbc_eval", "MovieDialogReranking": "moviedialog", "LeeSTS": "lee",
           "TRECCoarseClassification": "trec", "ReutersR8Clustering": "reuters_r8",
           "SDGPairClassification": "sdg"}


def like_seeds(task_names: list[str], seed_sources: list[str]) -> list[str]:
    """The tasks built on a corpus the seeds were split from ("shaped like the seeds"); the rest test
    whether training carries over to data unlike its seeds."""
    held_out = corpora.held_out_tables(seed_sources)
    return [t for t in task_names if SOURCES.get(t) in held_out]


def register() -> None:
    """Put the project's tasks into mteb's task registry, so that mteb's own lookup finds them by name
    (`mteb.get_task("LeeSTS")`: whole tables, seed 0). mteb has no public call for this: its registry
    is the dict `get_task` reads."""
    import importlib

    registry = importlib.import_module("mteb.get_tasks")  # the module (`mteb.get_tasks` is also a function)
    for name, cls in TASKS.items():
        registry._TASKS_REGISTRY.setdefault(name, cls)


class DataUnavailable(RuntimeError):
    """A registry task's dataset is neither in the local Hugging Face cache nor reachable on the hub."""


def build(name: str, *, max_rows: int | None = None, seed: int = 0) -> Any:
    """A fresh task instance (an `mteb` AbsTask) by name: one of the project's tasks, capped at `max_rows`
    seeded rows per table, or any task of mteb's registry (`STS12`, ...), as mteb defines it (its own
    size and splits; `max_rows` and `seed` do not apply)."""
    if name in TASKS:
        return TASKS[name](max_rows=max_rows, seed=seed)
    import mteb

    try:
        return mteb.get_task(name)
    except KeyError as exc:
        raise KeyError(f"unknown task {name!r}: neither one of the project's ({', '.join(NAMES)}) nor in "
                       f"mteb's registry ({exc.args[0] if exc.args else ''})") from None


def benchmark_tasks(benchmark: str) -> list[str]:
    """The task names of an mteb benchmark (`mteb.get_benchmark`, e.g. "MTEB(eng, v2)")."""
    import mteb

    try:
        bench = mteb.get_benchmark(benchmark)
    except KeyError as exc:
        raise ValueError(f"unknown mteb benchmark {benchmark!r}: {exc.args[0] if exc.args else ''}") from None
    return [t.metadata.name for t in bench.tasks]


def check_available(names: list[str]) -> None:
    """Load the data of every registry task among `names` here, before any replica starts: a dataset that
    is neither cached nor reachable fails now, naming it and the fix, instead of inside an evaluation.
    (The project's tasks are built from the fetched corpora and need no check.)"""
    for name in names:
        if name in TASKS:
            continue
        task = build(name)
        ds = task.metadata.dataset
        try:
            task.load_data()
        except (ConnectionError, OSError) as exc:
            raise DataUnavailable(
                f"mteb task {name}: its dataset {ds.get('path')} (revision {ds.get('revision')}) is not in the "
                f"local Hugging Face cache and the hub cannot be reached ({type(exc).__name__}: {exc}). Fill the "
                "cache on every node of the cluster once, where the hub is reachable (python -c \"import mteb; "
                f"mteb.get_task('{name}').load_data()\"), or set HF_HOME (or HF_DATASETS_CACHE) to a cache "
                "that holds it.") from exc


def instruction(metadata: TaskMetadata, prompt_type: PromptType | str | None) -> str | None:
    """The instruction an encoder gets for these texts: None means "documents, no instruction"."""
    prompt = metadata.prompt
    if isinstance(prompt, dict):  # asymmetric: only the query side is instructed
        kind = prompt_type.value if isinstance(prompt_type, PromptType) else prompt_type
        return prompt.get(kind) if kind else None
    return prompt or None  # symmetric: the same instruction on every text


register()  # on import: mteb's lookup (`mteb.get_task`) finds the project's tasks by name from here on
