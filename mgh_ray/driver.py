"""The driver's contract: it holds configs, counts and locations, never a model or the rows.

On a cluster the driver runs on a small CPU head (cluster.yaml: `CPU: 0`); a 7B model loaded there is
an out-of-memory crash. Every place that loads a model calls `check_model_load`, which raises in a
process that has declared itself a driver that must not load models (`forbid_model_loads()`, or the
env var MGH_RAY_NO_MODELS_IN_PID set to its pid, which Ray workers inherit but do not match).
`mgh-ray pipeline` and `mgh-ray ablate` (and so their `ray job submit` entrypoints) turn it on for
their whole run, as do the pipeline tests, so a model load that slips back into the driver fails
loudly instead of passing on a laptop.
"""

from __future__ import annotations

import os

ENV = "MGH_RAY_NO_MODELS_IN_PID"


class ModelInDriverError(RuntimeError):
    """A model was about to load in a driver process that must not hold one."""


def forbid_model_loads() -> None:
    os.environ[ENV] = str(os.getpid())


def allow_model_loads() -> None:
    os.environ.pop(ENV, None)


def check_model_load(what: str) -> None:
    if os.environ.get(ENV) == str(os.getpid()):
        raise ModelInDriverError(f"{what} was about to load in the driver process (pid {os.getpid()}); "
                                 "models load in Ray tasks and actors with their own resources")
