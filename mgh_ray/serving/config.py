"""How the embedder is served: `ServeConfig` (limits, batching, replicas, recovery) and the key rule.

Limits a hostile or unlucky client meets, all per request unless said otherwise:
- `max_body_bytes` bytes of body, checked from Content-Length and again while reading (413);
- `body_timeout_s` seconds to send that body (408), so stalled uploads free their slot;
- `max_inputs` texts, `max_instruction_chars` characters of instruction (400);
- per text: `max_chars` characters (derived from the model's token limit when None) and the model's
  `max_length` tokens; past either, `truncation="truncate"` cuts the text, `"error"` answers 413.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Literal

from pydantic import Field, model_validator

from mgh_ray.config import MAX_COUNT, Precision, Section

# A token of the tiny models' BPE/WordPiece vocabularies spans at most a few dozen characters; cutting
# at this many characters per allowed token never removes a token the model would have read.
CHARS_PER_TOKEN = 32


class AutoscalingSection(Section):
    """Serve autoscaling; when set on `ServeConfig`, it replaces `num_replicas`."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)  # the window Serve averages ongoing requests over


class ServeConfig(Section):
    """How the embedder is served. Defaults: one CPU replica on 127.0.0.1:8000."""

    app_name: str = "mgh-embedder"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str | None = None  # id in /v1/models and the `model` field; None: the folder's name
    num_replicas: int = Field(1, ge=1, le=MAX_COUNT)
    autoscaling: AutoscalingSection | None = None
    # Serve's HTTP proxies: one per node (Ray's default; a load balancer in front spreads clients), or
    # on the head only, for nodes that share one host (the local autoscaling cluster: each proxy there
    # would bind the same host:port)
    proxy_location: Literal["EveryNode", "HeadOnly"] = "EveryNode"
    # in-flight requests per replica: cheap (texts wait in the batch queue), and a high bound keeps a few
    # clients that stall mid-body from occupying every slot
    max_ongoing_requests: int = Field(128, ge=1, le=10_000)
    max_batch_size: int = Field(32, ge=1, le=4096)  # texts per forward pass
    # a lone client pays this wait on every request; under load texts gather while a pass runs anyway
    batch_wait_timeout_s: float = Field(0.003, ge=0, le=10)
    # forward passes are split further so each holds at most this many tokens (padding included):
    # texts are sorted by length first, so short texts do not pay for long ones' padding
    max_batch_tokens: int = Field(1024, ge=16)
    max_inputs: int = Field(256, ge=1, le=100_000)  # texts per request
    max_chars: int | None = Field(None, ge=1)  # characters per text; None: max_length * CHARS_PER_TOKEN
    max_instruction_chars: int = Field(1024, ge=1)
    truncation: Literal["error", "truncate"] = "truncate"  # texts past max_chars or max_length tokens
    max_body_bytes: int = Field(8 << 20, ge=1024)  # request body, checked before parsing
    body_timeout_s: float = Field(10.0, gt=0, le=600)  # to receive a request body
    api_key_env: str | None = "MGH_RAY_API_KEY"
    allow_public_without_key: bool = False
    # the replica's inference engine: eager PyTorch (`Encoder.encode`) or vLLM's pooling runner on the
    # folder's merged export (vllm_model.py; same tokens, same pooling, same vectors)
    engine: Literal["torch", "vllm"] = "torch"
    vllm_kv_cache_mb: int = Field(512, ge=16)  # the vLLM engine's KV cache per replica
    # torch.compile the vLLM engine's model, as vLLM's own server does: ~1.1x texts/s under load on this
    # CPU, for ~90 s more at a node's first start (vLLM caches the compiled graph); off for the
    # pipeline's short deployments, on for an endpoint that stays up
    vllm_compile: bool = False
    # how the torch engine computes: float32 (served vectors equal `Encoder.encode`'s, which the pipeline's
    # parity check asks of an endpoint), or under bfloat16 autocast with float32 weights: "bfloat16", or
    # "auto" where the device does bf16 natively (this CPU: about half the time a text, cosine >= 0.9998
    # to float32). Evaluation's replicas take `evaluate.precision`. The vLLM engine has its own dtype
    # (float32 on CPUs, bfloat16 on GPUs), which "auto" and "float32" leave to it
    precision: Precision = "float32"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # None: num_cpus rounded, at least 1
    # Serve's defaults are a 10 s period and 30 s timeout: a dead replica is noticed in seconds here
    health_check_period_s: float = Field(2.0, gt=0)
    health_check_timeout_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)
    # how often a stopping replica checks for requests still in flight. Serve's 2 s default means a
    # replica always waits 2 s before its first check, even idle: every undeploy took 3.0 s (0.2 s: 1.0
    # s), once per model an evaluation or ablation scores; requests in flight are still waited for
    graceful_shutdown_wait_loop_s: float = Field(0.2, gt=0)
    deploy_timeout_s: float = Field(300.0, gt=0)
    access_log: bool = False  # Serve's per-request log line in each replica (costs CPU on every request)

    @model_validator(mode="after")
    def _engine_precision(self) -> ServeConfig:
        if self.engine == "vllm" and self.precision == "bfloat16":
            raise ValueError("precision=bfloat16 is the torch engine's autocast; the vLLM engine computes in "
                             "its own dtype (float32 on CPUs, bfloat16 on GPUs): use engine=torch for "
                             "bfloat16 on a CPU, or precision=auto")
        return self

    @property
    def threads(self) -> int:
        """Torch threads of one replica: torch_threads, else num_cpus rounded down, at least 1."""
        return self.torch_threads or max(1, int(self.num_cpus))

    def chars_limit(self, max_length: int) -> int:
        """Characters per text: `max_chars`, else derived from the encoder's token limit."""
        return self.max_chars or max_length * CHARS_PER_TOKEN


# Settings of Serve's controller, read from its environment when it starts, so they go into the
# environment of every Ray cluster the project starts (a new local one, `mgh-ray cluster up`, cluster.yaml's
# head). Serve checks each HTTP proxy every 10 s and replaces it after 3 failed checks: a killed proxy
# refused connections for ~25 s (outage benchmark). Checked every second, it is back in a few.
CLUSTER_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "1"}


def apply_cluster_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`CLUSTER_ENV` into `env` (default: this process's environment, which a local cluster started by
    `ray.init` inherits), keeping any value already set; returns `env`."""
    env = os.environ if env is None else env
    for k, v in CLUSTER_ENV.items():
        env.setdefault(k, v)
    return env


def api_key(cfg: ServeConfig) -> str | None:
    """The API key from the env var named in `cfg` (None: no key, the endpoint is open)."""
    return (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_public(cfg: ServeConfig, host: str, key: str | None) -> None:
    """The rule every way of deploying follows: a non-loopback host needs a key (or an explicit opt-out)."""
    if key is None and not is_loopback(host) and not cfg.allow_public_without_key:
        raise PermissionError(f"refusing to serve on {host} without an API key: set the env var "
                              f"{cfg.api_key_env}, use host=127.0.0.1, or set allow_public_without_key=true")


def base_url(cfg: ServeConfig) -> str:
    """Where the app answers over HTTP, as a client on this machine reaches it."""
    host = cfg.host
    try:  # a Serve already running on this cluster keeps its own HTTP options
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host or host, http.port
    except Exception:  # Serve not started from here: trust the config
        port = cfg.port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}{cfg.route_prefix.rstrip('/')}"
