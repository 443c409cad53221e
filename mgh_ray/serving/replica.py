"""The Serve replica: a FastAPI app (`@serve.ingress`) around one encoder folder and an inference engine.

Each replica loads the folder's text side (`Encoder.load`: tokenizer, templates, limits), so serving
reads the same tokens, pools the same set (ATA included) and normalises as training and in-process
`encode` do. The engine (`serve.engine`, engines.py) is eager PyTorch, whose texts enter `@serve.batch`
one by one, at most `max_batch_size` at a time (a large request is cut into batch-sized pieces that
interleave with other clients' texts instead of holding them behind it), or vLLM's pooling runner,
which batches on its own. Tokenising, JSON decoding of large bodies and the model all run off the
event loop: it only moves bytes. A text that fails on its own gets its own error; it never fails a
batch-mate.

Imported only inside Ray (it imports Ray Serve at the top, as `@serve.ingress` needs).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException

from mgh_ray.serving.config import ServeConfig, check_public, hash_key, is_loopback
from mgh_ray.serving.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
    RequestError,
    encode_b64,
    model_revision,
    parse_request,
    served_name,
    shorten,
)

log = logging.getLogger(__name__)

api = FastAPI(title="mgh_ray embeddings", version="1", redirect_slashes=False,
              description="OpenAI-compatible embeddings of one encoder folder (ATA pooling included).")

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                            for code in (400, 401, 403, 404, 408, 413, 500)}
_BODY_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": EmbeddingRequest.model_json_schema(ref_template="#/components/schemas/"
                                                                                    "{model}")}}}}
_LARGE_BODY = 1 << 16  # bytes: JSON bodies above this decode in a worker thread


def _render(vectors: np.ndarray, as_b64: bool, model: str, tokens: int) -> bytes:
    """The response body (large ones are rendered in a worker thread, off the event loop)."""
    data = [{"object": "embedding", "index": i, "embedding": encode_b64(v) if as_b64 else v.tolist()}
            for i, v in enumerate(vectors)]
    body = {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404/405 (routes match whole paths) in our error shape."""
    if exc.status_code == 404:
        message = f"no route {request.url.path}; use POST /v1/embeddings, GET /v1/models or GET /health"
    elif exc.status_code == 405:
        message = f"{request.url.path} does not take {request.method}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message)


@serve.ingress(api)
class Embedder:
    """One replica: HTTP routes below, and `embed`/`info` for DeploymentHandle callers."""

    def __init__(self, model_dir: str, settings: dict[str, Any], key_hash: str | None) -> None:
        from mgh_ray.serving import engines

        self.cfg = ServeConfig.model_validate(settings)
        self.key_hash = key_hash
        self._check_http_host()
        self.m_requests = Counter("mgh_embed_requests", description="embedding requests by HTTP status",
                                  tag_keys=("status",))
        self.m_texts = Counter("mgh_embed_texts", description="texts embedded")
        self.m_latency = Histogram("mgh_embed_request_latency_ms", description="request latency (ms)",
                                   boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000])
        self.m_batch = Histogram("mgh_embed_batch_size", description="texts per forward pass (torch engine)",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
        self.revision = model_revision(model_dir)
        self.engine = engines.create(model_dir, self.cfg, self.revision, self.m_batch.observe)
        self.inputs = self.engine.inputs
        self.name = served_name(self.cfg, model_dir)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pooling = str(self.engine.config.pooling.mode)
        self.max_length = int(self.engine.config.max_length)
        self.max_chars = self.cfg.chars_limit(self.max_length)
        log.info("replica %s serves %s (rev %s, dim %d, pooling %s, %s engine, %s %s, computing in %s, "
                 "%d threads)", self.replica, self.name, self.revision, self.engine.dim, self.pooling,
                 self.engine.kind, self.engine.device, self.engine.dtype, self.engine.compute,
                 self.engine.threads())

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def _check_http_host(self) -> None:
        """`serve run --host 0.0.0.0` or a config file's http_options bypass `deploy`: check here too."""
        self.http_host = None
        try:
            from ray.serve.context import _get_global_client

            self.http_host = _get_global_client().http_config.host
        except Exception:  # no controller to ask: the per-request client check below still holds
            log.warning("could not read Serve's HTTP host; non-loopback clients need the key")
        if self.http_host is not None:
            check_public(self.cfg, self.http_host, self.key_hash)

    # ------------------------------------------------------------ encoding

    async def _encode(self, texts: list[str], instruction: str | None, tokens: list[int]) -> np.ndarray:
        """(n, dim) float32, from the engine; one text's failure fails the request, naming the text."""
        rows = await self.engine.encode([(t, instruction, n) for t, n in zip(texts, tokens)])
        for i, row in enumerate(rows):
            if isinstance(row, BaseException):
                raise RuntimeError(f"input[{i}] could not be embedded") from row
        self.m_texts.inc(len(texts))
        return np.stack(rows).astype(np.float32)  # (n, dim)

    # ------------------------------------------------------------ limits

    def _prepare(self, req: EmbeddingRequest) -> tuple[list[str], list[int], list[int]]:
        """Apply the character and token limits (worker thread: it tokenises). Texts (cut where the policy
        is truncate), tokens each will use, and the indices that were cut."""
        texts, cut = list(req.input), []
        for i, text in enumerate(texts):
            if len(text) > self.max_chars:
                if self.cfg.truncation == "error":
                    raise RequestError(413, f"input[{i}] has {len(text)} characters; the limit is "
                                            f"{self.max_chars} (truncation policy 'error': shorten it)", "input")
                texts[i] = text[: self.max_chars]
                cut.append(i)
        lengths = self.inputs.token_counts(texts, req.instruction)
        for i, n in enumerate(lengths):
            if n > self.max_length:
                if self.cfg.truncation == "error":
                    raise RequestError(413, f"input[{i}] has {n} tokens; the model reads at most {self.max_length}"
                                            " (truncation policy 'error': shorten it)", "input")
                if i not in cut:
                    cut.append(i)
        return texts, [min(n, self.max_length) for n in lengths], sorted(cut)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused past `max_body_bytes` (before reading it when Content-Length says so) or when
        it takes longer than `body_timeout_s` to arrive."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise RequestError(413, f"the request body has {declared} bytes; the limit is {limit} "
                                    "(send fewer or shorter texts per request)")
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"the request body passed {limit} bytes, the limit "
                                            "(send fewer or shorter texts per request)")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.cfg.body_timeout_s:g} s"
                               ) from None
        return b"".join(chunks)

    def _authorize(self, request: Request) -> None:
        if self.key_hash is None:
            client = request.client.host if request.client else None
            public = client is not None and not is_loopback(client)
            if public and not self.cfg.allow_public_without_key:
                raise RequestError(403, "this endpoint has no API key and answers loopback clients only: "
                                        f"set {self.cfg.api_key_env} on the server to open it")
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(hash_key(token.strip()), self.key_hash)):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    # ------------------------------------------------------------ routes

    def _headers(self) -> dict[str, str]:
        return {"X-Replica": self.replica, "X-Pooling": self.pooling}

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 when the replica is up (never needs the key)."""
        return JSONResponse({"status": "ok", "model": self.name}, headers=self._headers())

    @api.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(self, request: Request) -> JSONResponse:
        """The served model: revision (a fingerprint of the folder), pooling, device, dtype, threads."""
        self._authorize(request)
        card = {"id": self.name, "object": "model", "owned_by": "mgh_ray", "created": 0, **self.info()}
        return JSONResponse({"object": "list", "data": [card]}, headers=self._headers())

    # with or without the trailing slash: a redirect (307) would make clients send the body twice
    @api.post("/v1/embeddings/", include_in_schema=False)
    @api.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS, openapi_extra=_BODY_SCHEMA)
    async def embeddings(self, request: Request) -> Response:
        """Embed `input` (OpenAI's embeddings API, plus `instruction` for queries)."""
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await self._embeddings(request)
            status = resp.status_code
            return resp
        except RequestError as exc:
            status = exc.status
            return _error(exc.status, exc.message, exc.param, self._headers())
        except Exception:  # a bug or a model failure: 500 without internals, the replica stays up
            ref = uuid.uuid4().hex[:12]
            log.exception("embedding request %s failed", ref)
            return _error(500, f"internal error (reference {ref} in the replica log)", None, self._headers())
        finally:
            self.m_requests.inc(tags={"status": str(status)})
            self.m_latency.observe((time.perf_counter() - t0) * 1000)

    async def _embeddings(self, request: Request) -> Response:
        self._authorize(request)
        raw = await self._read_body(request)
        try:
            body = await asyncio.to_thread(json.loads, raw) if len(raw) > _LARGE_BODY else json.loads(raw)
        except ValueError:  # JSON syntax or undecodable bytes: the client's
            raise RequestError(400, "the request body is not valid JSON") from None
        except RecursionError:  # [[[[...]]]] thousands deep: the decoder's stack, not the server's fault
            raise RequestError(400, "the request body nests too deeply to be a request") from None
        req = parse_request(body, self.cfg, self.name, self.engine.dim)
        texts, tokens, cut = await asyncio.to_thread(self._prepare, req)
        vectors = shorten(await self._encode(texts, req.instruction, tokens), req.dimensions)
        headers = self._headers()
        if cut:
            headers["X-Truncated-Inputs"] = ",".join(map(str, cut))
        args = (vectors, req.encoding_format == "base64", self.name, sum(tokens))
        body = await asyncio.to_thread(_render, *args) if len(vectors) > 16 else _render(*args)
        return Response(body, media_type="application/json", headers=headers)

    # ------------------------------------------------------------ handle callers

    async def embed(self, texts: list[str], instruction: str | None = None) -> dict[str, Any]:
        """In-cluster entry (DeploymentHandle): same limits as HTTP, float32 vectors back."""
        req = parse_request({"input": texts, "instruction": instruction}, self.cfg, self.name,
                            self.engine.dim)
        texts, tokens, _ = await asyncio.to_thread(self._prepare, req)
        return {"vectors": await self._encode(texts, req.instruction, tokens), "replica": self.replica}

    def info(self) -> dict[str, Any]:
        """What this replica serves and how, and its batching (forward passes so far, last 256 sizes)."""
        return {"model": self.name, "revision": self.revision, "dim": self.engine.dim,
                "pooling": self.pooling, "attention": self.engine.config.attention,
                "engine": self.engine.kind, "device": self.engine.device, "dtype": self.engine.dtype,
                "compute": self.engine.compute,
                "max_length": self.max_length, "replica": self.replica,
                "torch_threads": self.engine.threads(), **self.engine.stats()}
