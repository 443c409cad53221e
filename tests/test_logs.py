"""Logging setup: one root configuration, and Ray Train's per-step chatter kept out of job logs."""

from __future__ import annotations

import io
import logging
import threading

from mgh_ray import logs


def test_ray_trains_path_named_loggers_are_quiet_below_warning(monkeypatch):
    """Ray Train v2 names some loggers after their file (`getLogger(__file__)`): its "Reporting training
    result" line, once per step from every worker, escapes the "ray.train" level. The handlers that
    `setup` finds drop those records below WARNING and keep everything else."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(root, "handlers", [handler])  # as Ray Train's worker dictConfig leaves the root
    monkeypatch.setattr(root, "level", logging.INFO)
    logs.setup()
    logs.setup()  # idempotent: one filter per handler
    assert handler.filters.count(logs._not_library_info) == 1

    train_file = "/venv/lib/python3.11/site-packages/ray/train/v2/_internal/execution/context.py"
    path_named = logging.getLogger(train_file)
    for level, msg in ((logging.INFO, "Reporting training result 3"), (logging.WARNING, "worker lagging")):
        path_named.handle(path_named.makeRecord(train_file, level, train_file, 1, msg, None, None))
    logging.getLogger("mgh_ray.training").info("step 5/40 loss 1.2")
    out = stream.getvalue()
    assert "Reporting training result" not in out
    assert "worker lagging" in out and "step 5/40" in out


def _listing_race(capsys) -> str:
    """Ray Data's own completion thread of its parquet listing, with the consumer shutting the pool down
    as soon as it has the end marker (the order the race takes in a job); what the thread printed."""
    from ray.data._internal import dynamic_work_queue as dwq

    pool = dwq._WorkerPool()
    put = pool.output_queue.put

    def put_then_shut_down(item, *args, **kwargs):
        put(item, *args, **kwargs)
        pool.shutdown()

    pool.output_queue.put = put_then_shut_down
    pool.start_thread(target=dwq._signal_completion, args=(pool, 2), name="completion-signaler").join()
    return capsys.readouterr().err


def test_worker_setup_drops_ray_datas_listing_race_and_nothing_else(capsys, monkeypatch):
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    printed = _listing_race(capsys)
    assert "Traceback" in printed and "InterruptedError" in printed  # Ray Data as pinned prints it
    logs.worker_setup()
    logs.worker_setup()  # idempotent: one wrapper
    assert _listing_race(capsys) == ""

    def elsewhere():
        raise InterruptedError("another thread's error")

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert "another thread's error" in capsys.readouterr().err
