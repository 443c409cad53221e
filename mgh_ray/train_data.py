"""The training input: which rows a training reads, checked before any worker starts, and how a worker
streams its shard.

`training_dataset` turns a records folder (its gated view, `quality.gated`), a ray.data.Dataset or a
small DataFrame into the Dataset that Ray Train splits across workers. `check_dataset` reads it once on
the workers (columns, rows, instructions: the export's query prompts need the last) and names what is
missing. `batch_stream` is a worker's endless, seeded stream of full batches over its streaming-split
shard, kept in memory after the first pass when the shard is small.

    ds = training_dataset("runs/tiny/synthesize")
    counts = check_dataset(ds, levels=4, num_workers=2, batch_size=4)  # {instruction: rows}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mgh_ray import quality
from mgh_ray.records import NEG_COLS


def _block_survey(b: pd.DataFrame) -> pd.DataFrame:
    """One block's rows per instruction (None: no instruction), each row naming the block's columns."""
    if "instruction" in b.columns:
        per = b["instruction"].value_counts(dropna=False)
    else:
        per = pd.Series([len(b)], index=pd.Index([None], dtype=object))
    out = per.rename("n").rename_axis("instruction").reset_index()
    out["columns"] = [list(map(str, b.columns))] * len(out)
    return out


def _survey(ds: Any) -> pd.DataFrame:
    # per-block value counts summed here: a few rows per block, where a Ray Data groupby would start a
    # hash shuffle (seconds of actor start-up for what is usually one instruction)
    return ds.map_batches(_block_survey, batch_format="pandas", batch_size=None).to_pandas()


def _instruction_sums(survey: pd.DataFrame) -> dict[str | None, int]:
    if not len(survey):
        return {}
    sums = survey.groupby("instruction", dropna=False)["n"].sum()
    return {(None if pd.isna(k) else str(k)): int(v) for k, v in sums.items()}


def training_dataset(records: Any) -> Any:
    """A records folder (path/URI) -> its gated view; a Dataset as is; a DataFrame (small, tests) ->
    a Dataset."""
    import ray.data

    if isinstance(records, pd.DataFrame):
        return ray.data.from_pandas(records)
    if isinstance(records, (str, Path)):
        return quality.gated(str(records))
    return records


def required_columns(levels: int) -> list[str]:
    """What a training row needs: the curriculum's first `levels` negatives (the records' `NEG_COLS`)."""
    return ["id", "query", "positive", "instruction", *NEG_COLS[:levels]]


def check_dataset(ds: Any, levels: int, num_workers: int, batch_size: int) -> dict[str | None, int]:
    """{instruction: rows} of the training dataset (counted on workers; None: rows without one), with a
    clear error for missing columns or too few rows for one global batch. One pass over the records
    gives the columns, the row count and the instructions the export's query prompts need (a gated
    view's schema alone would cost a pass of its own)."""
    survey = _survey(ds)
    names = set.intersection(*(set(c) for c in survey["columns"])) if len(survey) else set()
    missing = [c for c in required_columns(levels) if c not in names]
    if missing:
        raise ValueError(f"records lack columns {missing}; expected {required_columns(levels)} "
                         "(the gated view of a synthesis or mining folder)")
    counts = _instruction_sums(survey)
    n = sum(counts.values())
    if n < num_workers * batch_size:
        raise ValueError(f"{n} training records cannot fill one step of {num_workers} workers x "
                         f"batch_size {batch_size}; synthesize more, or lower train.batch_size")
    return counts


def batch_stream(shard: Any, batch_size: int, seed: int, rank: int, start: int, keep_rows: int = 0):
    """Endless batches of this worker's shard: pass after pass, rows shuffled with a seed of (seed, rank,
    resume step, pass); only full batches (the rest of a pass is left out, different rows each pass).

    A shard of at most `keep_rows` rows is read once: the first pass streams it (shuffled within a
    buffer) and keeps its rows, and every later pass shuffles those rows in memory. Each pass of the
    stream re-runs the read (list files, read parquet, gate: seconds on a small machine, however few
    the rows), so re-reading a small shard costs more than the steps it feeds. A larger shard is
    streamed every pass and never held: the worker holds at most the shuffle buffer and one batch.
    Either way every pass visits each of the shard's rows at most once, all but fewer than a batch."""
    epoch, kept = 0, []
    while True:
        got = 0
        pass_seed = hash((seed, rank, start, epoch)) % (2**31)
        if epoch and kept is not None:  # the shard is in memory: a new order each pass
            rows = pd.concat(kept, ignore_index=True)
            order = np.random.default_rng(pass_seed).permutation(len(rows))
            for i in range(0, len(rows) - batch_size + 1, batch_size):
                got += 1
                yield rows.iloc[order[i:i + batch_size]].reset_index(drop=True)
        else:
            n = 0
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="pandas",
                                            local_shuffle_buffer_size=max(4 * batch_size, 64),
                                            local_shuffle_seed=pass_seed):
                n += len(batch)
                if kept is not None:  # the short last batch too: later passes leave out other rows
                    if n <= keep_rows:
                        kept.append(batch)
                    else:
                        kept = None  # too large to hold: stream every pass
                if len(batch) == batch_size:
                    got += 1
                    yield batch
        if not got:
            raise RuntimeError(f"worker {rank}'s shard yielded no full batch of {batch_size}")
        epoch += 1
