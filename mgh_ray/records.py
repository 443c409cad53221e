"""The record schema and its shards: the one place the shape of MGH data is defined.

A *record* is one seed with its graded negatives as written by the LLM (or the miner): id, query,
positive, instruction, gen_1..gen_4 (L1 coarsest .. L4 finest), the reference embedder's similarities
(SIM_COLS), and provenance. A *failure* is a seed that produced no record, with the reason. Both live
as parquet shards in a records folder (`<folder>/records/`, `<folder>/failures/`), local or on object
storage. The *gated view* that training reads (records passing the quality gate, with the training
negatives neg_1..neg_4 chosen by the gate's policy) is `quality.gated`.

Shards are written by `ShardSink` (a Ray Data Datasink: every write task writes its own shards on a
worker) with content-addressed names (`shard-<hash of its ids>.parquet`), failures before records,
each file whole or not at all (tmp + rename locally, one upload on object stores). `scan` checks a
folder before anything reads it: every shard readable and holding the schema's columns, and no id in
two shards (a copied shard); problems are errors naming the files.

    sink = ShardSink(folder); ds.write_datasink(sink); sink.totals
    ds = read(folder)                  # ray.data.Dataset of raw records (quality.gated: training rows)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import pandas as pd

from mgh_ray import storage
from mgh_ray.corpora import stable_id
from mgh_ray.layout import RunLayout

log = logging.getLogger(__name__)

LEVELS = (1, 2, 3, 4)  # 1 = coarsest (least similar to the query) ... 4 = finest
GEN_COLS = tuple(f"gen_{k}" for k in LEVELS)  # negatives as written, by requested level
NEG_COLS = tuple(f"neg_{k}" for k in LEVELS)  # negatives as used for training, after the gate's policy
SIM_COLS = ("sim_pos", *(f"sim_{k}" for k in LEVELS), *(f"simp_{k}" for k in LEVELS))

# The E5 query instruction of augment mode when a seed has none (the BBC headline -> article seeds).
DEFAULT_INSTRUCTION = "Given a news headline, retrieve the news article it refers to"

RECORD_COLS = ["id", "seed_id", "mode", "kind", "task", "query", "positive", "instruction", *GEN_COLS,
               "attempts", "retries", "gen_tokens", "prompt_version", "model", "sampling"]
FAILURE_COLS = ["id", "seed_id", "mode", "kind", "query", "positive", "stage", "reason", "detail",
                "raw_output", "attempts", "retries", "gen_tokens", "prompt_version", "model", "sampling"]
# what training needs of a gated record, in this order
TRAIN_COLS = ["id", "query", "positive", *NEG_COLS, "instruction", "kind"]
# columns a records shard must hold to be read as records
REQUIRED_RECORD_COLS = ["id", "query", "positive", "instruction", *GEN_COLS, *SIM_COLS]
REQUIRED_FAILURE_COLS = ["id", "reason"]


class RecordsError(ValueError):
    """A records folder cannot be read as records; the message names the file(s) and the fix."""


def shard_name(ids: Iterable[str]) -> str:
    """Content-addressed shard file name: the same rows give the same file."""
    return f"shard-{stable_id(*sorted(map(str, ids)))}.parquet"


def write_shard(df: pd.DataFrame, folder: str) -> str:
    """Write one shard (whole or not at all) into a folder (path or URI); returns its location."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return storage.write_bytes(storage.join(folder, shard_name(df["id"])), buf.getvalue())


# ------------------------------------------------------------------ writing, on workers


def _first(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.min()) if len(values) else None


def ShardSink(folder: str, rows_per_shard: int = 32, record_cols: list[str] | None = None):  # noqa: N802
    """Ray Data sink for synthesis/mining output: each write task splits its rows by `status` and
    writes a failures shard, then a records shard, under `folder`. Returns counts only; the driver
    reads their sum from `sink.totals` after `Dataset.write_datasink(sink)`.

    A kill between the two writes leaves each id in one table or in neither, so a resume (which
    skips ids present in either) never duplicates and never loses a row. (A factory, so that importing
    this module does not import Ray.)"""
    return _sink_class()(folder, rows_per_shard, record_cols)


@functools.cache
def _sink_class() -> type:
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class _ShardSink(Datasink):
        def __init__(self, folder: str, rows_per_shard: int, record_cols: list[str] | None) -> None:
            self.folder = storage.normalize(folder)
            self.rows_per_shard = rows_per_shard
            self.record_cols = record_cols or RECORD_COLS + list(SIM_COLS)
            self.totals: dict[str, Any] = {}

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_shard

        def get_name(self) -> str:
            return "ShardSink"

        def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, Any]:
            frames = [f for f in (BlockAccessor.for_block(b).to_pandas() for b in blocks) if len(f)]
            if not frames:
                return {"written": 0, "failed": 0, "gen_tokens": 0, "retries": 0, "t_first": None,
                        "t_last": None}
            df = pd.concat(frames, ignore_index=True)
            ok, bad = df[df["status"] == "ok"], df[df["status"] != "ok"]
            if len(bad):
                write_shard(bad.reindex(columns=FAILURE_COLS), RunLayout.failures(self.folder))
            if len(ok):
                write_shard(ok.reindex(columns=self.record_cols), RunLayout.records(self.folder))
            # the stage's progress line in a job log (no bars there): one per shard, from the worker
            from mgh_ray import logs

            logs.setup()
            logging.getLogger("mgh_ray.records").info("%s: %d rows written (%d records, %d failures)",
                                                      self.folder, len(df), len(ok), len(bad))
            return {"written": len(ok), "failed": len(bad),
                    "gen_tokens": int(df.get("gen_tokens", pd.Series(dtype=float)).fillna(0).sum()),
                    "retries": int(df.get("retries", pd.Series(dtype=float)).fillna(0).sum()),
                    "t_first": _first(df["t_start"]) if "t_start" in df else None,
                    "t_last": float(df["t_end"].max()) if "t_end" in df and df["t_end"].notna().any() else None}

        def on_write_complete(self, write_result: Any) -> None:
            returns = [r for r in write_result.write_returns if r]
            firsts = [r["t_first"] for r in returns if r["t_first"] is not None]
            lasts = [r["t_last"] for r in returns if r["t_last"] is not None]
            self.totals = {k: sum(r[k] for r in returns) for k in ("written", "failed", "gen_tokens", "retries")}
            self.totals.update(t_first=min(firsts) if firsts else None, t_last=max(lasts) if lasts else None)

    return _ShardSink


# ------------------------------------------------------------------ reading and checking


def shard_files(folder: str, table: str = "records") -> list[str]:
    sub = RunLayout.records(folder) if table == "records" else RunLayout.failures(folder)
    return storage.list_files(sub, suffix=".parquet")


def _scan(files: list[str], required: list[str]) -> dict[str, Any]:
    """Open every shard (ids only); return problems by file and ids seen in more than one file."""
    import pyarrow.parquet as pq

    seen: dict[str, str] = {}
    problems: list[str] = []
    dupes: dict[tuple[str, str], int] = {}
    rows = 0
    for loc in files:
        fs, path = storage.resolve(loc)
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            names = set(pf.schema_arrow.names)
            missing = [c for c in required if c not in names]
            if missing:
                problems.append(f"{loc}: lacks column(s) {missing} (not a shard of this schema: move it out "
                                "of the folder)")
                continue
            ids = pf.read(columns=["id"]).column("id").to_pylist()
        except Exception as exc:  # truncated, corrupt, not parquet
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{loc}: cannot be read as parquet ({first}); it is corrupt or truncated: delete "
                            "it and rerun the stage (the rows it held are redone)")
            continue
        rows += len(ids)
        for i in ids:
            other = seen.setdefault(i, loc)
            if other != loc:
                dupes[(other, loc)] = dupes.get((other, loc), 0) + 1
    dup_text = [f"{b} repeats {n} id(s) of {a} (a copied shard? delete one of them)" for (a, b), n in dupes.items()]
    return {"files": len(files), "rows": rows, "unique": len(seen), "problems": problems, "duplicates": dup_text}


def scan(folder: str, table: str = "records") -> dict[str, Any]:
    """Check a records (or failures) table before reading it; raises RecordsError naming every bad
    file. Runs as a Ray task when Ray is up, so the driver holds the result, never the ids."""
    files = shard_files(folder, table)
    required = REQUIRED_RECORD_COLS if table == "records" else REQUIRED_FAILURE_COLS
    import ray

    if ray.is_initialized():
        result = ray.get(ray.remote(num_cpus=0.25)(_scan).remote(files, required))
    else:
        result = _scan(files, required)
    bad = result["problems"] + result["duplicates"]
    if bad:
        raise RecordsError(f"{table} in {folder} cannot be used as they are:\n  - " + "\n  - ".join(bad))
    return result


def read_parquet(paths: str | list[str], columns: list[str] | None = None):
    """`ray.data.read_parquet` through Ray Data's first parquet reader (`DataContext.use_datasource_v2`
    off for this call). Ray 2.60 reads parquet through DataSourceV2 by default, which lists the files in a
    task of its own first: on this project's shards that task took 3.5 s of wall for 56 ms of CPU, and a
    read of two small local shards 3-5 s against 0.1-0.7 s on the first reader. Every stage, resume and
    report reads small shards, so that latency added up (docs/development.md)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, columns=columns)
    finally:
        ctx.use_datasource_v2 = before


def read(folder: str, table: str = "records", columns: list[str] | None = None, check: bool = True):
    """The shards of a records/failures table as a ray.data.Dataset (None when there are none)."""
    files = shard_files(folder, table)
    if not files:
        return None
    if check:
        scan(folder, table)
    return read_parquet(files, columns=columns)


def to_pandas(folder: str, table: str = "records") -> pd.DataFrame:
    """A whole table on the caller, for small folders only (tests, reports of tiny runs); the gated
    view of one is `quality.gated_frame`."""
    ds = read(folder, table)
    if ds is None:
        cols = RECORD_COLS + list(SIM_COLS) if table == "records" else FAILURE_COLS
        return pd.DataFrame(columns=cols)
    return ds.to_pandas()


def ids(folder: str) -> set[str]:
    """Ids in the records and failures of a folder (id column only); for workers, not the driver."""
    import pyarrow.parquet as pq

    out: set[str] = set()
    for table in ("records", "failures"):
        for loc in shard_files(folder, table):
            fs, path = storage.resolve(loc)
            try:
                out.update(pq.read_table(fs.open_input_file(path), columns=["id"]).column("id").to_pylist())
            except Exception as exc:
                raise RecordsError(f"{loc}: cannot be read as parquet ({exc}); delete it and rerun") from None
    return out
