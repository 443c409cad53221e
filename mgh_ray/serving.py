"""Ray Serve application for a trained encoder folder: an OpenAI-compatible `/v1/embeddings`.

Each replica loads the folder with `Encoder.load`, so serving runs the same tokenizer, pooling (ATA
included) and normalisation as training and in-process `encode`. Requests are split into single
texts and regrouped by `@serve.batch` (size and wait from `ServeConfig`), so texts from concurrent
requests share forward passes; the model runs in a worker thread so the replica keeps accepting.

Routes (below the route prefix):
    POST /v1/embeddings   {"input": str | [str], "model"?, "encoding_format"?: "float" | "base64",
                           "dimensions"?: int, "instruction"?: str}
    GET  /v1/models       the one served model, with its revision (a fingerprint of the folder)
    GET  /health          200 when the replica is up (never needs the key)
`instruction` is our extension: texts sent with it are queries (E5 style), without it documents.
`dimensions` keeps the first d coordinates and normalises again. Bad input gets a 4xx whose message
names the problem; it never takes a replica down. Text longer than `max_chars` is rejected (413)
under truncation="error" or cut to `max_chars` under truncation="truncate" (the response header
`X-Truncated-Inputs` lists the cut items); the encoder's `max_length` cuts tokens after that.
When the env var named by `api_key_env` holds a key, `/v1/*` needs `Authorization: Bearer KEY`; the
key is hashed before it reaches the replicas. Without a key, `deploy` refuses a non-loopback host.

    serve run mgh_ray.serving:build_app model_dir=runs/tiny/train/model num_replicas=2
    python -m mgh_ray.serving runs/tiny/train/model      # deploy, check parity, stay up

In a Serve config file (`serve deploy serve.yaml`), `args` takes the same keys:

    applications:
      - name: mgh-embedder
        route_prefix: /
        import_path: mgh_ray.serving:build_app
        args: {model_dir: /abs/runs/tiny/train/model, autoscaling: {min_replicas: 1, max_replicas: 4}}
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from mgh_ray.config import ConfigError, Section, format_validation_error

log = logging.getLogger(__name__)

PARITY_INSTRUCTION = "Given a news headline, retrieve the news article it belongs to"


class AutoscalingSection(Section):
    """Serve autoscaling; when set on `ServeConfig`, it replaces `num_replicas`."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)


class ServeConfig(Section):
    """How the embedder is served. Defaults: one CPU replica on 127.0.0.1:8000."""

    app_name: str = "mgh-embedder"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str | None = None  # id in /v1/models and the `model` field; None: the folder's name
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSection | None = None
    max_ongoing_requests: int = Field(32, ge=1)  # per replica
    max_batch_size: int = Field(32, ge=1)  # texts per forward pass
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_inputs: int = Field(256, ge=1)  # texts per request
    max_chars: int = Field(8192, ge=1)  # characters per text
    truncation: Literal["error", "truncate"] = "error"
    api_key_env: str | None = "MGH_RAY_API_KEY"
    allow_public_without_key: bool = False
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)  # None: num_cpus rounded, at least 1
    deploy_timeout_s: float = Field(300.0, gt=0)

    @property
    def threads(self) -> int:
        """Torch threads of one replica: torch_threads, else num_cpus rounded down, at least 1."""
        return self.torch_threads or max(1, int(self.num_cpus))


class RequestError(ValueError):
    """A request the server refuses: HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def api_key(cfg: ServeConfig) -> str | None:
    """The API key from the env var named in `cfg` (None: no key, the endpoint is open)."""
    return (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def model_revision(model_dir: str | Path) -> str:
    """A cheap content fingerprint of an encoder folder (small files whole, large ones by size and ends)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 1 << 21:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:12]


def served_name(cfg: ServeConfig, model_dir: str | Path) -> str:
    return cfg.model_name or Path(model_dir).resolve().name


def parse_request(body: Any, cfg: ServeConfig, model: str, dim: int) -> dict[str, Any]:
    """Validate an embeddings request body; returns texts, instruction, format, dimensions, truncated."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if "input" not in body:
        raise RequestError(400, "'input' is required: a string or a list of strings", "input")
    raw = body["input"]
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise RequestError(400, f"'input' must be a string or a list of strings, not {type(raw).__name__}",
                           "input")
    if not items:
        raise RequestError(400, "'input' is empty: send at least one text", "input")
    if len(items) > cfg.max_inputs:
        raise RequestError(400, f"'input' has {len(items)} items; at most {cfg.max_inputs} per request",
                           "input")
    truncated = []
    texts = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            ids = isinstance(item, list) or all(isinstance(x, int) and not isinstance(x, bool) for x in items)
            kind = "token ids (not supported: send text)" if ids else f"a {type(item).__name__}"
            raise RequestError(400, f"input[{i}] is {kind}; every item must be a string", "input")
        if not item.strip():
            raise RequestError(400, f"input[{i}] is an empty string", "input")
        if len(item) > cfg.max_chars:
            if cfg.truncation == "error":
                raise RequestError(413, f"input[{i}] has {len(item)} characters; the limit is "
                                        f"{cfg.max_chars} (truncation policy 'error': shorten it)", "input")
            item = item[: cfg.max_chars]
            truncated.append(i)
        texts.append(item)
    name = body.get("model")
    if name is not None and name != model:
        raise RequestError(404, f"model {name!r} is not served here; available: {model!r}", "model")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}",
                           "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= dim):
        raise RequestError(400, f"'dimensions' must be an integer in 1..{dim}, not {dims!r}", "dimensions")
    instruction = body.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise RequestError(400, "'instruction' must be a non-empty string when given", "instruction")
    return {"texts": texts, "instruction": instruction, "format": fmt, "dimensions": dims,
            "truncated": truncated}


def shorten(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """Keep the first `dims` coordinates and normalise again (OpenAI `dimensions`)."""
    if dims is None or dims == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dims]  # (n, dims)
    return (cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _encode_b64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def decode_b64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


class Embedder:
    """The Serve replica: loads the encoder folder once; HTTP via `__call__`, handles via `embed`."""

    def __init__(self, model_dir: str, settings: dict[str, Any], key_hash: str | None) -> None:
        import torch
        from ray import serve

        from mgh_ray.encoder import Encoder

        self.cfg = ServeConfig.model_validate(settings)
        torch.set_num_threads(self.cfg.threads)
        self.encoder = Encoder.load(model_dir)
        self.name = served_name(self.cfg, model_dir)
        self.revision = model_revision(model_dir)
        self.key_hash = key_hash
        self.replica = serve.get_replica_context().replica_id.unique_id
        pooling = getattr(getattr(self.encoder.config, "pooling", None), "mode", None)
        self.pooling = str(pooling or "unknown")
        self.batches, self.recent_batches = 0, deque(maxlen=256)  # sizes of the last forward passes
        # dynamic batching of single texts across concurrent requests (sizes from the config)
        self._batched = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                    batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(self._run_batch)
        log.info("replica %s serves %s (rev %s, dim %d, pooling %s)", self.replica, self.name,
                 self.revision, self.encoder.dim, self.pooling)

    def _encode_groups(self, items: list[tuple[str, str | None]]) -> list[np.ndarray]:
        self.batches += 1
        self.recent_batches.append(len(items))
        out: list[np.ndarray | None] = [None] * len(items)
        for instruction in dict.fromkeys(i for _, i in items):  # one forward pass per instruction
            idx = [k for k, (_, i) in enumerate(items) if i == instruction]
            texts = [items[k][0] for k in idx]
            vecs = self.encoder.encode(texts, instruction=instruction, batch_size=len(idx))
            for k, v in zip(idx, vecs):
                out[k] = v
        return out  # type: ignore[return-value]

    async def _run_batch(self, items: list[tuple[str, str | None]]) -> list[np.ndarray]:
        return await asyncio.to_thread(self._encode_groups, items)

    async def _encode(self, texts: Sequence[str], instruction: str | None) -> np.ndarray:
        rows = await asyncio.gather(*(self._batched((t, instruction)) for t in texts))
        return np.stack(rows).astype(np.float32)  # (n, dim)

    async def embed(self, texts: list[str], instruction: str | None = None) -> dict[str, Any]:
        """In-cluster entry (DeploymentHandle): same limits as HTTP, float32 vectors back."""
        body = {"input": texts, "instruction": instruction}
        req = parse_request(body, self.cfg, self.name, self.encoder.dim)
        return {"vectors": await self._encode(req["texts"], req["instruction"]), "replica": self.replica}

    def info(self) -> dict[str, Any]:
        """What this replica serves, its torch threads and its batching (forward passes so far, sizes of
        the last 256)."""
        import torch

        return {"model": self.name, "revision": self.revision, "dim": self.encoder.dim,
                "pooling": self.pooling, "replica": self.replica, "torch_threads": torch.get_num_threads(),
                "batches": self.batches, "recent_batches": list(self.recent_batches)}

    def _count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts` (documents, after `max_length`), for the `usage` field."""
        tokenizer = getattr(self.encoder, "tokenizer", None)
        cap = getattr(self.encoder.config, "max_length", None)
        if tokenizer is None:
            return sum(len(t) for t in texts) // 4  # a rough estimate, never reached with our Encoder
        return sum(min(len(ids), cap or len(ids)) for ids in tokenizer(texts)["input_ids"])

    def _authorized(self, request: Any) -> bool:
        if self.key_hash is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_hash_key(token.strip()), self.key_hash)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        headers = {"X-Replica": self.replica, "X-Pooling": self.pooling}
        try:
            path = request.url.path.rstrip("/")
            if path.endswith("/health"):
                return JSONResponse({"status": "ok", "model": self.name}, headers=headers)
            if not path.endswith(("/v1/models", "/v1/embeddings")):
                raise RequestError(404, f"no route {request.url.path}; use POST /v1/embeddings, "
                                        "GET /v1/models or GET /health")
            if not self._authorized(request):
                raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
            if path.endswith("/v1/models"):
                if request.method != "GET":
                    raise RequestError(405, f"/v1/models takes GET, not {request.method}")
                card = {"id": self.name, "object": "model", "owned_by": "mgh_ray", "created": 0,
                        **self.info()}
                return JSONResponse({"object": "list", "data": [card]}, headers=headers)
            if request.method != "POST":
                raise RequestError(405, f"/v1/embeddings takes POST, not {request.method}")
            try:
                body = await request.json()
            except Exception:  # any parse failure is the client's
                raise RequestError(400, "the request body is not valid JSON") from None
            req = parse_request(body, self.cfg, self.name, self.encoder.dim)
            vectors = shorten(await self._encode(req["texts"], req["instruction"]), req["dimensions"])
            as_b64 = req["format"] == "base64"
            data = [{"object": "embedding", "index": i, "embedding": _encode_b64(v) if as_b64 else v.tolist()}
                    for i, v in enumerate(vectors)]
            if req["truncated"]:
                headers["X-Truncated-Inputs"] = ",".join(map(str, req["truncated"]))
            tokens = self._count_tokens(req["texts"])
            return JSONResponse({"object": "list", "data": data, "model": self.name,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=headers)
        except RequestError as exc:
            err = {"message": exc.message, "type": "invalid_request_error", "param": exc.param,
                   "code": exc.status}
            return JSONResponse({"error": err}, status_code=exc.status, headers=headers)
        except Exception as exc:  # a bug or a model failure: answer 500, keep the replica
            log.exception("embedding request failed")
            err = {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                   "param": None, "code": 500}
            return JSONResponse({"error": err}, status_code=500, headers=headers)


def application(cfg: ServeConfig, model_dir: str | Path, key: str | None = None) -> Any:
    """The bound Serve application for `model_dir` (what `build_app` and `deploy` run)."""
    from ray import serve

    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist (train first, or pass "
                                "model_dir=...)")
    opts: dict[str, Any] = {
        "name": "Embedder",
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        opts["num_replicas"] = cfg.num_replicas
    key = key if key is not None else api_key(cfg)
    return serve.deployment(**opts)(Embedder).bind(str(model_dir), cfg.model_dump(mode="json"),
                                                   _hash_key(key) if key else None)


def build_app(args: dict[str, Any]) -> Any:
    """Typed Serve builder: `model_dir` plus any `ServeConfig` field, e.g. from `serve run ... k=v`."""
    args = dict(args)
    if "model_dir" not in args:
        raise ValueError("build_app needs model_dir=FOLDER (an encoder folder written by Encoder.save)")
    model_dir = args.pop("model_dir")
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "build_app args")) from None
    if api_key(cfg) is None and not _is_loopback(cfg.host):
        log.warning("no API key (env %s) and host %s is not loopback: the endpoint is open", cfg.api_key_env,
                    cfg.host)
    return application(cfg, model_dir)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def start_app(cfg: ServeConfig, model_dir: Path, name: str, route_prefix: str | None) -> Any:
    """Deploy `model_dir` as app `name` (HTTP at `route_prefix`, handle-only when None); its handle."""
    from ray import serve

    key = api_key(cfg)
    if key is None and not _is_loopback(cfg.host) and not cfg.allow_public_without_key:
        raise PermissionError(f"refusing to serve on {cfg.host} without an API key: set the env var "
                              f"{cfg.api_key_env}, use host=127.0.0.1, or set allow_public_without_key=true")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    app = application(cfg, model_dir, key)
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)],
                   wait_for_applications_running=False)
    wait_running(name, cfg.deploy_timeout_s)
    return serve.get_app_handle(name)


def deploy(cfg: ServeConfig, model_dir: Path, name: str | None = None) -> str:
    """Deploy on the running Ray cluster (starting Serve if needed), wait until healthy; the base URL."""
    name = name or cfg.app_name
    start_app(cfg, Path(model_dir), name, cfg.route_prefix)
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


class EmbeddingClient:
    """A small HTTP client for this API (thread-safe; used by parity, evaluation and the benchmark)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(headers=headers, timeout=timeout_s, trust_env=False,
                                 limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    def _check(self, resp: Any) -> Any:
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except Exception:
                message = resp.text[:300]
            raise RuntimeError(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {message}")
        return resp

    def health(self) -> dict[str, Any]:
        return self._check(self.http.get(f"{self.url}/health")).json()

    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get(f"{self.url}/v1/models")).json()["data"]

    def embed(self, texts: list[str], instruction: str | None = None,
              dimensions: int | None = None) -> tuple[np.ndarray, str]:
        """Vectors (float32, exact via base64) for `texts`, and the replica that answered."""
        body: dict[str, Any] = {"input": texts, "encoding_format": "base64"}
        if instruction is not None:
            body["instruction"] = instruction
        if dimensions is not None:
            body["dimensions"] = dimensions
        resp = self._check(self.http.post(f"{self.url}/v1/embeddings", json=body))
        rows = sorted(resp.json()["data"], key=lambda d: d["index"])
        return np.stack([decode_b64(r["embedding"]) for r in rows]), resp.headers.get("x-replica", "")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_parity(cfg: ServeConfig, model_dir: Path, texts: list[str]) -> float:
    """Min cosine between served and in-process vectors of `texts`, as documents and as queries."""
    from mgh_ray.encoder import Encoder

    encoder = Encoder.load(model_dir)
    worst = 1.0
    with EmbeddingClient(base_url(cfg), api_key(cfg)) as client:
        for instruction in (None, PARITY_INSTRUCTION):
            local = encoder.encode(texts, instruction=instruction)
            served, _ = client.embed(texts, instruction=instruction)
            norms = np.linalg.norm(local, axis=1) * np.linalg.norm(served, axis=1)
            cos = np.sum(local * served, axis=1) / norms  # (n,)
            worst = min(worst, float(cos.min()))
    log.info("parity of %d texts (documents and queries): min cosine %.6f", len(texts), worst)
    return worst


def main(argv: list[str] | None = None) -> None:
    """python -m mgh_ray.serving MODEL_DIR [KEY=VALUE ...]: deploy, check parity, stay up until Ctrl-C."""
    from mgh_ray import config, corpora

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m mgh_ray.serving MODEL_DIR [KEY=VALUE ...]")
    cfg = config.override(ServeConfig(), argv[1:])
    url = deploy(cfg, Path(argv[0]))
    cos = check_parity(cfg, Path(argv[0]), corpora.table("bbc_eval").title.head(16).tolist())
    log.info("ready at %s/v1/embeddings (parity min cosine %.6f); Ctrl-C to stop", url, cos)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
