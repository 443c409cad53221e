"""One Ray Train run, as contrastive training (`training`) and MNTP adaptation (`adapt`) both start it.

`fit` builds the `TorchTrainer` (N workers, gloo on CPU and nccl on GPU unless named, storage under
`storage_path/name`, restarts from the latest checkpoint up to `max_failures`) and runs it with the
controller polling its workers every `POLL_INTERVAL_S`.

Why the poll interval. A worker's `ray.train.report` puts its result into a queue of one that Ray
Train's controller empties once per poll of the worker group, every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`
(2 s by default). So a report made while the previous one is still queued waits for the next poll,
and the controller sees the last checkpoint and the end of the training function up to one interval
late each. The loops report only their checkpoints for the same reason: a report per step held
every step shorter than the interval. A one-worker tiny run of 16 steps (about 1.2 s each) on the
2-core CI machine, call to return (the training benchmark's `poll_cost`, 2026-12-05): reporting every
step, 48.4 s at a 2 s poll and 34.3 s at 0.25 s; reporting checkpoints only, 33.8 s and 30.4 s. A
missed poll costs nothing: Ray marks a worker dead only after its health check has hung for 10
minutes. A user who sets the variable keeps their value (Ray propagates it from the driver to the
controller and the workers, which is why it is set here, around `fit`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.25


def poll_interval_s() -> float:
    """The interval Ray Train's controller polls at in this process (the user's setting, else Ray's 2 s)."""
    return float(os.environ.get(POLL_ENV, 2.0))


@contextlib.contextmanager
def polling() -> Iterator[None]:
    """RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=POLL_INTERVAL_S for the runs started inside, unless already set."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = str(POLL_INTERVAL_S)
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def resolve_backend(name: str, use_gpu: bool) -> str:
    """The torch.distributed backend: `name`, or for "auto" nccl with GPUs and gloo without."""
    return name if name != "auto" else ("nccl" if use_gpu else "gloo")


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, name: str, storage_path: str,
        num_workers: int, use_gpu: bool, cpus_per_worker: float, max_failures: int, keep_checkpoints: int,
        backend: str = "auto", datasets: dict[str, Any] | None = None):
    """Run `loop` on `num_workers` Ray Train workers; returns Ray Train's `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        torch_config=TorchConfig(backend=resolve_backend(backend, use_gpu)),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets,
    )
    with polling():
        return trainer.fit()
