"""Benchmark of the data plane: does the driver stay flat as rows grow 10x and 100x?

For each size (default 1k, 10k, 100k seed rows) it writes a seed file (the fetched BBC seeds repeated
under new ids, written by a Ray task, so the driver never holds it), then times two paths:

- mining: `mining.mine` over all rows (Ray Data reader -> MiniLM `Embedder` actors -> `Miner` ->
  `records.ShardSink`), the real scoring path of the ablation's mined baseline;
- training reader: the gated view of those records (`quality.gated`), split across two consumers
  with `streaming_split(equal=True)` and read batch by batch with a local shuffle buffer, one full
  pass, as `train_data.batch_stream` reads a Ray Train worker's shard on its first pass;
- records read: those records' shards materialised by Ray's default parquet reader (DataSourceV2 in
  Ray 2.60) and by `records.read_parquet` (Ray Data's first reader, what the project reads with), each
  once untimed first, so that both find warm workers; `default_reader_s_over_this` is the default's
  seconds over the first reader's.

A thread samples the driver's resident memory (RSS) every 50 ms; the table gives each path's
seconds, rows/s and the driver's peak RSS, with ratios against the smallest size of the same run.
Repeated texts are embedded once per actor, so the mining rows measure the plumbing, not MiniLM.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage dataplane
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from mgh_ray import storage
from mgh_ray.benchmarks import save

log = logging.getLogger(__name__)

SIZES = (1_000, 10_000, 100_000)
READ_DEFAULT = "records read, Ray's default parquet reader"
READ_FIRST = "records read, records.read_parquet"


def _write_seeds(n: int, loc: str) -> int:
    """A seed file of `n` rows: the BBC seeds repeated under new ids (runs as a Ray task)."""
    import io

    from mgh_ray import corpora

    base = corpora.table("seeds")[["id", "query", "positive"]]
    reps = -(-n // len(base))
    df = pd.concat([base.assign(id=base["id"] + f"-r{r}") for r in range(reps)], ignore_index=True).head(n)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(loc, buf.getvalue())
    return len(df)


def _consume(shard: Any, batch_size: int) -> int:
    """One pass of training's reader over a streaming-split shard; returns rows seen."""
    rows = 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pandas", drop_last=True,
                                    local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=0):
        rows += len(batch)
    return rows


class PeakRSS:
    """The driver's peak resident memory while a block runs (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _timed(fn: Callable[[], int]) -> dict[str, float]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        rows = fn()
        seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "driver_peak_rss_mb": round(mem.peak / 2**20, 1)}


def run(out_dir: Path, sizes: tuple[int, ...] = SIZES, root: str | None = None,
        batch_size: int = 64) -> pd.DataFrame:
    """Time both paths at every size; log and save the table (benchmark_dataplane.{md,json})."""
    import ray

    from mgh_ray import mining, quality, records
    from mgh_ray.mining import MiningConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = storage.normalize(root or out_dir / "dataplane")
    if not ray.is_initialized():
        ray.init(num_cpus=4)  # the tiny preset's logical CPUs (ray.num_cpus in tiny.yaml)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    for n in sizes:
        seeds_loc = storage.join(root, f"seeds-{n}.parquet")
        ray.get(ray.remote(num_cpus=0.5)(_write_seeds).remote(n, seeds_loc))
        mined = storage.join(root, f"mined-{n}")
        cfg = MiningConfig(seeds=seeds_loc, num_seeds=None)
        def mine() -> int:
            report = mining.mine(cfg, mined)
            return report["written"] + report["failed"]

        rows.append({"path": "mining (MiniLM, Ray Data)", "size": n, **_timed(mine)})

        def read() -> int:
            shards = quality.gated(mined, policy="keep").streaming_split(2, equal=True)
            consume = ray.remote(num_cpus=0.5)(_consume)
            return sum(ray.get([consume.remote(s, batch_size) for s in shards]))

        rows.append({"path": "training reader (gated view, 2 shards)", "size": n, **_timed(read)})
        files = records.shard_files(mined, "records")
        readers = {READ_DEFAULT: lambda: ray.data.read_parquet(files).materialize().count(),
                   READ_FIRST: lambda: records.read_parquet(files).materialize().count()}
        for path, read_with in readers.items():
            read_with()
            rows.append({"path": path, "size": n, **_timed(read_with)})
        rows[-1]["default_reader_s_over_this"] = round(rows[-2]["seconds"] / max(rows[-1]["seconds"], 1e-3), 2)
        log.info("dataplane %d rows: %s", n, rows[-4:])
    table = pd.DataFrame(rows)
    for path, group in table.groupby("path"):
        first = group.iloc[0]
        table.loc[group.index, "rows_per_s_vs_smallest"] = (group["rows_per_s"] / first["rows_per_s"]).round(2)
        table.loc[group.index, "peak_rss_vs_smallest"] = (group["driver_peak_rss_mb"]
                                                          / first["driver_peak_rss_mb"]).round(3)
    save(out_dir, "dataplane", "# Data plane benchmark\n\n" + table.to_markdown(index=False) + "\n",
         table.to_dict("records"))
    return table
