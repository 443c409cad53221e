"""Seeds: the (query, positive) pairs synthesis and mining start from, read as a Ray Data stream.

A seed file is parquet or JSON lines (a local path or a URI) with columns `query` and `positive`
(optional: `id`, `instruction`, `kind`); None means the BBC training seeds of `corpora`.

Policy. File-level problems fail fast, before any engine starts, with the file, the problem and the
fix named (`SeedError`: missing file, unknown format, missing columns, bytes that are not UTF-8,
unreadable JSON lines, a column of bytes). `validate` checks this in one streaming pass on a worker
(the driver never holds the rows). Row-level problems (empty or non-text query/positive) become
failures with reason `bad_seed` downstream, never LLM calls. Row ids are the `id` column, else a hash
of (query, positive), so a rerun derives the same ids.

    seeds.validate("s3://bucket/seeds.jsonl")               # SeedError, or the columns found
    ds = seeds.dataset("s3://bucket/seeds.jsonl", num_seeds=1000)   # seed_id, query, positive, ...
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from mgh_ray import storage
from mgh_ray.records import read_parquet, stable_id

log = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
REQUIRED = ("query", "positive")
SEED_COLS = ["seed_id", "query", "positive", "instruction", "kind", "problem"]


class SeedError(ValueError):
    """The seed file cannot be used at all; the message names the file, the problem and the fix."""


def default_location(sources: list[str] | tuple[str, ...] = ("bbc",)) -> str:
    """The fetched training seeds of `sources` (default: BBC), built once into the node's cache
    (single-node runs; a pipeline publishes them into its run folder so every node reads one file)."""
    from mgh_ray import corpora

    return str(corpora.seeds_path(list(sources)))


def _format(loc: str) -> str:
    for suffix, fmt in FORMATS.items():
        if loc.endswith(suffix):
            return fmt
    raise SeedError(f"{loc}: unknown seed format; use .parquet or .jsonl (JSON lines)")


def _lines(f: Any, chunk: int = 1 << 20):
    """Byte lines of a pyarrow stream (which has no readline), one chunk in memory at a time."""
    rest = b""
    while data := f.read(chunk):
        *whole, rest = (rest + data).split(b"\n")
        yield from whole
    if rest:
        yield rest


def _check_file(loc: str) -> list[str]:
    """Columns of a seed file after a full check; raises SeedError. Streams: one line at a time."""
    import pyarrow.parquet as pq

    if not storage.exists(loc):
        raise SeedError(f"seed file {loc} does not exist; check the path or URI")
    fmt = _format(loc)
    fs, path = storage.resolve(loc)
    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            schema = pf.schema_arrow
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise SeedError(f"{loc}: cannot read as parquet: {exc}") from None
        for col in REQUIRED:
            if col in schema.names and str(schema.field(col).type) in ("binary", "large_binary"):
                raise SeedError(f"{loc}: column {col!r} holds bytes, not text; store it as UTF-8 strings")
        return list(schema.names)
    columns: dict[str, None] = {}
    with fs.open_input_stream(path) as f:
        for n, line in enumerate(_lines(f), start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SeedError(f"{loc}: line {n} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SeedError(f"{loc}: line {n} is not a JSON object ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise SeedError(f"{loc}: line {n} is not a JSON object (got {type(obj).__name__})")
            columns.update(dict.fromkeys(obj))
    return list(columns)


def _checked(loc: str) -> tuple[list[str], str]:
    """(columns, "") or ([], the SeedError's message): an error that crosses a Ray task as data."""
    try:
        return _check_file(loc), ""
    except (SeedError, storage.StorageError) as exc:
        return [], str(exc)


def validate(loc: str | None) -> list[str]:
    """Check a seed file as a whole; returns its columns or raises SeedError (see module docstring).

    Runs as a Ray task when Ray is up, so a large file is streamed on a worker, not the driver."""
    loc = storage.normalize(loc) if loc is not None else default_location()
    import ray

    run = ray.remote(num_cpus=0.25, max_retries=0)(_checked).remote if ray.is_initialized() else _checked
    columns, error = ray.get(run(loc)) if ray.is_initialized() else run(loc)
    if error:
        raise SeedError(error)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SeedError(f"seed file {loc} lacks column(s) {missing}; it has {columns}. Seeds need 'query' "
                        "and 'positive' (optional: id, instruction, kind)")
    return columns


def _problem(q: Any, p: Any) -> str:
    for col, v in (("query", q), ("positive", p)):
        if v is None or (isinstance(v, float) and v != v):
            return f"{col} is missing"
        if not isinstance(v, str):
            return f"{col} is {type(v).__name__}, not text"
        if not v.strip():
            return f"{col} is empty"
    return ""


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return v if isinstance(v, str) else repr(v)


def normalize_rows(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Seed rows (any types) -> SEED_COLS, all text; `problem` says why a row cannot be used."""
    out = []
    for r in rows:
        q, p = r.get("query"), r.get("positive")
        sid = r.get("id")
        sid = str(sid) if sid is not None and not (isinstance(sid, float) and sid != sid) else \
            stable_id("seed", str(q), str(p))
        instr = r.get("instruction")
        kind = r.get("kind")
        out.append({"seed_id": sid, "query": _text(q), "positive": _text(p),
                    "instruction": instr if isinstance(instr, str) and instr else "",
                    "kind": kind if isinstance(kind, str) and kind else "", "problem": _problem(q, p)})
    return pd.DataFrame(out, columns=SEED_COLS)


def _parse_parquet_batch(batch: pd.DataFrame) -> pd.DataFrame:
    return normalize_rows(batch.to_dict("records"))


def _parse_jsonl_batch(batch: pd.DataFrame) -> pd.DataFrame:
    rows = [json.loads(t) for t in batch["text"] if t.strip()]
    return normalize_rows(rows)


def dataset(loc: str | None, num_seeds: int | None = None, check: bool = True):
    """A ray.data.Dataset of seeds with SEED_COLS (the first `num_seeds` of the file if given)."""
    import ray.data

    if check:
        validate(loc)
    loc = storage.normalize(loc) if loc is not None else default_location()
    if _format(loc) == "parquet":
        ds = read_parquet(loc)
        parse = _parse_parquet_batch
    else:
        ds = ray.data.read_text(loc, drop_empty_lines=True)
        parse = _parse_jsonl_batch
    if num_seeds is not None:
        ds = ds.limit(num_seeds)
    return ds.map_batches(parse, batch_format="pandas", batch_size=1024)


def read_seeds(loc: str | None, num_seeds: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(good, bad, duplicates dropped) as pandas, for small files on the caller (tests, baselines)."""
    validate(loc)
    loc = storage.normalize(loc) if loc is not None else default_location()
    if _format(loc) == "parquet":
        fs, path = storage.resolve(loc)
        import pyarrow.parquet as pq

        rows = pq.read_table(fs.open_input_file(path)).to_pandas().to_dict("records")
    else:
        rows = [json.loads(t) for t in storage.read_text(loc).splitlines() if t.strip()]
    df = normalize_rows(rows[:num_seeds] if num_seeds is not None else rows)
    n = len(df)
    df = df.drop_duplicates("seed_id").reset_index(drop=True)
    bad = df[df["problem"] != ""].rename(columns={"problem": "detail"}).reset_index(drop=True)
    good = df[df["problem"] == ""].drop(columns="problem").reset_index(drop=True)
    return good, bad, n - len(df)
