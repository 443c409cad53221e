"""Building and deploying the Serve application: the typed `build_app(ServeArgs)`, `deploy`, `undeploy`.

Every way in applies the same rule, "a non-loopback host only with an API key": `deploy`/`start_app`
and `build_app` refuse before anything starts, and each replica checks Serve's HTTP host again (a
`serve run --host 0.0.0.0` or a config file's `http_options` never pass through here).

    serve run mgh_ray.serving:build_app model_dir=runs/tiny/train/model num_replicas=2
"""

# no `from __future__ import annotations`: Ray Serve reads build_app's annotation as a class to
# validate `args` into ServeArgs
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mgh_ray.config import ConfigError, format_validation_error
from mgh_ray.serving.config import ServeConfig, api_key, base_url, check_public, hash_key

log = logging.getLogger(__name__)


class ServeArgs(ServeConfig):
    """`build_app`'s arguments: the encoder folder plus any `ServeConfig` field."""

    model_dir: str


def application(cfg: ServeConfig, model_dir: str | Path, key: str | None = None) -> Any:
    """The bound Serve application for `model_dir` (what `build_app` and `deploy` run)."""
    from ray import serve

    from mgh_ray import storage
    from mgh_ray.serving.replica import Embedder

    model_dir = storage.normalize(str(model_dir))  # a path or a URI: replicas load it where they land
    if not storage.is_dir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir} does not exist (train first, or pass "
                                "model_dir=...)")
    opts: dict[str, Any] = {
        "name": "Embedder",
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": cfg.graceful_shutdown_wait_loop_s,
        "logging_config": {"enable_access_log": cfg.access_log},
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        opts["num_replicas"] = cfg.num_replicas
    key = key if key is not None else api_key(cfg)
    settings = cfg.model_dump(mode="json", include=set(ServeConfig.model_fields))
    return serve.deployment(**opts)(Embedder).bind(str(model_dir), settings, hash_key(key) if key else None)


def build_app(args: ServeArgs) -> Any:
    """Typed Serve builder: `model_dir` plus any `ServeConfig` field, e.g. from `serve run ... k=v`.

    Serve validates a config file's `args` into `ServeArgs`; a plain dict is validated here."""
    if not isinstance(args, ServeArgs):
        args = dict(args)
        if "model_dir" not in args:
            raise ValueError("build_app needs model_dir=FOLDER (an encoder folder written by Encoder.save)")
        try:
            args = ServeArgs.model_validate(args)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "build_app args")) from None
    cfg = ServeConfig.model_validate(args.model_dump(exclude={"model_dir"}))
    check_public(cfg, cfg.host, api_key(cfg))
    return application(cfg, args.model_dir)


def wait_running(name: str, timeout_s: float) -> None:
    """Block until the Serve app `name` is RUNNING; raise with Serve's own reason if it fails or stalls."""
    from ray import serve

    start = time.monotonic()
    status = None
    while time.monotonic() - start < timeout_s:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {name!r} failed to deploy: {status.message}")
        time.sleep(0.5)
    deployments = status.deployments.items() if status else []
    detail = "; ".join(f"{d}: {s.status} {s.message}" for d, s in deployments)
    raise TimeoutError(f"Serve app {name!r} not running after {timeout_s:.0f} s ({detail}). If replicas are "
                       "pending, the cluster lacks the CPUs/GPUs they ask for (num_cpus, num_gpus, "
                       "num_replicas).")


def proxy_location(cfg: ServeConfig) -> str:
    """Where Serve runs its HTTP proxies: `cfg.proxy_location`, except on the local autoscaling cluster
    (`mgh-ray cluster up --local`, Ray's fake multi-node provider: RAY_FAKE_CLUSTER=1 in the environment
    of every process it starts, job drivers included). There every node is the same host, so a proxy per
    node would bind the same port twice: the second fails ("Failed to bind to address") and the deploy
    with it, depending on which nodes are up when Serve starts. One proxy, on the head, serves them all."""
    if cfg.proxy_location == "EveryNode" and os.environ.get("RAY_FAKE_CLUSTER") == "1":
        log.info("every node of this local cluster is one host: one HTTP proxy, on the head (HeadOnly), "
                 "on port %d", cfg.port)
        return "HeadOnly"
    return cfg.proxy_location


def start_app(cfg: ServeConfig, model_dir: Path, name: str, route_prefix: str | None) -> Any:
    """Deploy `model_dir` as app `name` (HTTP at `route_prefix`, handle-only when None); its handle."""
    from ray import serve

    key = api_key(cfg)
    check_public(cfg, cfg.host, key)
    serve.start(proxy_location=proxy_location(cfg), http_options={"host": cfg.host, "port": cfg.port})
    app = application(cfg, model_dir, key)
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)],
                   wait_for_applications_running=False)
    wait_running(name, cfg.deploy_timeout_s)
    return serve.get_app_handle(name)


def deploy(cfg: ServeConfig, model_dir: Path, name: str | None = None) -> str:
    """Deploy on the running Ray cluster (starting Serve if needed), wait until healthy; the base URL."""
    from mgh_ray.serving.client import EmbeddingClient

    name = name or cfg.app_name
    start_app(cfg, model_dir, name, cfg.route_prefix)
    url = base_url(cfg)
    deadline = time.monotonic() + 60
    with EmbeddingClient(url, api_key(cfg)) as client:
        while True:  # the app is RUNNING; wait until the proxy routes to it
            try:
                client.health()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    log.info("serving %s as app %r at %s/v1/embeddings", model_dir, name, url)
    return url


def undeploy(name: str) -> None:
    from ray import serve

    serve.delete(name)
