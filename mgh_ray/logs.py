"""Logging: one setup for every entry point and worker, rank-aware, and how progress shows.

`setup()` configures the root logger once (time, level, logger name): the `mgh-ray` CLI and its jobs
call it, and so do Ray Train workers, with their rank: only rank 0 logs at INFO, the others at WARNING,
so a job log holds each step line once. Ray Train's own per-step lines ("Reporting training result",
"Checkpoint successfully created", from every worker) are left at WARNING, those of its loggers named
after their file too (a filter on the root's handlers): the stage logs its steps itself.

Ray workers: the project's Ray jobs (`pipeline.init_ray`) give every worker process the setup hook
`worker_setup` (`RUNTIME_ENV`), which drops one traceback Ray Data prints in error (`_known_race`).

Progress: bars in a terminal; in a job log, a pipe or a file (no TTY) Ray Data's progress, which is
redrawn as text every 10 seconds there, is off (`data_progress`), and the stages log one line per step
instead (synthesis: one per shard written; training: every `log_every` steps; evaluation: one per task).

    from mgh_ray import logs
    logs.setup()                 # once per process, before the first log line
"""

from __future__ import annotations

import logging
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("ray.train", "ray.tune", "filelock", "urllib3", "httpx")  # INFO chatter of libraries


def interactive() -> bool:
    """Whether a person watches this process's output in a terminal."""
    return sys.stderr.isatty()


def _not_library_info(record: logging.LogRecord) -> bool:
    """False for INFO-or-below records of Ray Train/Tune's modules whose loggers are named after their
    file's path (`getLogger(__file__)`, e.g. Ray Train's "Reporting training result" line per step),
    which setting the level of "ray.train" does not reach."""
    path = record.pathname.replace("\\", "/")
    return record.levelno >= logging.WARNING or not any(f"/ray/{lib}/" in path for lib in ("train", "tune"))


def setup(level: int = logging.INFO, rank: int | None = None) -> None:
    """Configure the root logger once for this process (`rank`: a Ray Train worker's world rank)."""
    root = logging.getLogger()
    chosen = level if not rank else max(level, logging.WARNING)
    if not root.handlers:
        logging.basicConfig(level=chosen, format=FORMAT, datefmt="%H:%M:%S")
    root.setLevel(chosen)
    for handler in root.handlers:
        if _not_library_info not in handler.filters:
            handler.addFilter(_not_library_info)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(chosen, logging.WARNING))


def _known_race(args: threading.ExceptHookArgs) -> bool:
    """Ray Data 2.60's parquet file listing (DataSourceV2's ListFiles, `dynamic_work_queue`): once the
    work is done, its completion thread hands the consumer the end marker, then posts a stop marker per
    worker thread. The consumer shuts the pool down as soon as it has the end marker, so the thread can
    find the pool interrupted mid-way and die with InterruptedError. The listing had finished and lost
    nothing, yet Python prints the thread's traceback into the job log. Seen in green ablation jobs
    on the local cluster."""
    if args.exc_type is not InterruptedError:
        return False
    tb, files = args.exc_traceback, []
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    return any(f.endswith("ray/data/_internal/dynamic_work_queue.py") for f in files)


def worker_setup() -> None:
    """Ray's `worker_process_setup_hook` for the project's jobs: keep `_known_race`'s traceback out of
    the worker's output; every other thread error prints as before."""
    previous = threading.excepthook
    if getattr(previous, "_drops_known_race", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not _known_race(args):
            previous(args)

    hook._drops_known_race = True  # type: ignore[attr-defined]
    threading.excepthook = hook


# the runtime env the project's jobs run their Ray workers with (merged with a submitted job's own)
RUNTIME_ENV = {"worker_process_setup_hook": "mgh_ray.logs.worker_setup"}


def data_progress() -> None:
    """Ray Data progress bars where a person watches a terminal, none in logs (see the module doc)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = interactive()
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = interactive()
