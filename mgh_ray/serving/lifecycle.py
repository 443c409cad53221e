"""Keeping a deployment up until Ctrl-C or SIGTERM, then leaving nothing behind.

`serving_until_signal` turns SIGTERM and SIGINT into KeyboardInterrupt, and on the way out
deletes the app when the cluster is someone else's (it outlives us there) and disconnects; a local
cluster this process started is shut down with every process it spawned, so no raylet, GCS or
replica outlives `mgh-ray serve`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _started_here() -> bool:
    """Whether this driver started the local Ray processes (ray.shutdown then stops them)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and getattr(node, "all_processes", None))


@contextlib.contextmanager
def serving_until_signal(app_name: str) -> Iterator[None]:
    """Run the body; on Ctrl-C/SIGTERM (or when it ends) remove what it started, within seconds."""
    # SIGINT too: a process started in the background inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt on it
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        log.info("stopping: interrupted")
    finally:
        for sig in previous:  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        t0 = time.monotonic()
        try:
            import ray

            if ray.is_initialized():
                if not _started_here():
                    from mgh_ray.serving.app import undeploy

                    with contextlib.suppress(Exception):
                        undeploy(app_name)
                ray.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("stopped in %.1f s", time.monotonic() - t0)


def block() -> None:
    """Sleep until interrupted (the signal handler raises KeyboardInterrupt in this thread)."""
    while True:
        time.sleep(1.0)
