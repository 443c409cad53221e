"""Logging: one setup for every entry point and worker, rank-aware, and how progress shows.

`setup()` configures the root logger once (time, level, logger name): the `mgh-ray` CLI and its jobs
call it, and so do Ray Train workers, with their rank: only rank 0 logs at INFO, the others at WARNING,
so a job log holds each step line once. Ray Train's own per-step lines ("Reporting training result",
"Checkpoint successfully created", from every worker) are left at WARNING, those of its loggers named
after their file too (a filter on the root's handlers): the stage logs its steps itself.

Progress: bars in a terminal; in a job log, a pipe or a file (no TTY) Ray Data's progress, which is
redrawn as text every 10 seconds there, is off (`data_progress`), and the stages log one line per step
instead (synthesis: one per shard written; training: every `log_every` steps; evaluation: one per task).

    from mgh_ray import logs
    logs.setup()                 # once per process, before the first log line
"""

from __future__ import annotations

import logging
import sys

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


def data_progress() -> None:
    """Ray Data progress bars where a person watches a terminal, none in logs (see the module doc)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = interactive()
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = interactive()
