"""An HTTP client for the embeddings API, and the served-vs-in-process parity check."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mgh_ray.records import DEFAULT_INSTRUCTION
from mgh_ray.serving.config import ServeConfig, api_key, base_url
from mgh_ray.serving.protocol import decode_b64

log = logging.getLogger(__name__)

PARITY_INSTRUCTION = DEFAULT_INSTRUCTION  # the training seeds' instruction: checks the query path too
# what a dying or restarting replica or proxy answers (Serve: 500 for a request on a killed replica, 503
# while overloaded or without a replica); the request has no side effects, so it is sent again
RETRY_STATUS = frozenset({500, 502, 503, 504})
RETRY_BACKOFF_S = 0.25


class EmbeddingClient:
    """A small HTTP client for this API (thread-safe; used by parity, evaluation and the benchmark).

    `embed` retries a refused or reset connection and a 5xx every 0.25 s for up to `retry_s` seconds (a
    replica or the HTTP proxy being replaced), so such an outage costs latency, not the caller's work;
    a 4xx is the caller's mistake and raises at once. One 404 is retried too: the proxy's own (plain text,
    not this API's JSON error) on a route that has answered this client before. Behind Serve's HAProxy
    ingress a restarted proxy takes traffic for about half a second before it has its routes, and
    answers 404 for an app that is there (docs/serving.md)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 retry_s: float = 60.0) -> None:
        import httpx

        self.retry_s = retry_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._routed: set[str] = set()  # URLs that have reached the app (any answer of the API's own)
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
        resp = self._check(self._post_retrying(f"{self.url}/v1/embeddings", body))
        rows = sorted(resp.json()["data"], key=lambda d: d["index"])
        return np.stack([decode_b64(r["embedding"]) for r in rows]), resp.headers.get("x-replica", "")

    def _post_retrying(self, url: str, body: dict[str, Any]) -> Any:
        import httpx

        deadline, warned = time.monotonic() + self.retry_s, False
        while True:
            try:
                resp = self.http.post(url, json=body)
                own = resp.status_code == 200 or _api_error(resp)  # the app answered, not the proxy
                lost_route = resp.status_code == 404 and not own and url in self._routed
                if resp.status_code not in RETRY_STATUS and not lost_route or time.monotonic() > deadline:
                    if own:
                        self._routed.add(url)
                    return resp
                why = f"HTTP {resp.status_code}" + (" from the proxy on a route that answered before"
                                                    if lost_route else "")
            except httpx.TransportError as e:
                if time.monotonic() > deadline:
                    raise
                why = type(e).__name__
            if not warned:
                log.warning("POST %s: %s; retrying for up to %.0f s", url, why, self.retry_s)
                warned = True
            time.sleep(RETRY_BACKOFF_S)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _api_error(resp: Any) -> bool:
    """Whether a response is this API's own error (JSON with an `error` object), not the proxy's."""
    try:
        return isinstance(resp.json().get("error"), dict)
    except Exception:
        return False


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine of two (n, dim) arrays."""
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # (n,)
    return float(cos.min())


def parity_floor(cfg: ServeConfig) -> float:
    """The least min cosine `check_parity` may find for an endpoint served with `cfg`: 0.9999 in the
    weights' dtype, 0.999 under the torch engine's bf16 autocast, where the same texts batched otherwise
    round otherwise (the tiny demo's trained model, 16 titles: 0.99994 under the same autocast, 0.99908
    against float32, which is why the in-process side computes as the replicas do)."""
    return 0.9999 if cfg.engine == "vllm" or cfg.precision == "float32" else 0.999


def check_parity(cfg: ServeConfig, model_dir: Path, texts: list[str], url: str | None = None) -> float:
    """Min cosine between served and in-process vectors of `texts`, as documents and as queries (compare
    with `parity_floor(cfg)`); the in-process side computes as the torch engine does (`cfg.precision`;
    the vLLM engine's own dtype is float32 on CPUs)."""
    from mgh_ray import devices
    from mgh_ray.encoder import Encoder

    encoder = Encoder.load(model_dir)
    precision = cfg.precision if cfg.engine == "torch" else "float32"
    worst = 1.0
    with EmbeddingClient(url or base_url(cfg), api_key(cfg)) as client:
        for instruction in (None, PARITY_INSTRUCTION):
            with devices.autocast(precision, encoder, encoder.device)[0]:
                local = encoder.encode(texts, instruction=instruction)
            served, _ = client.embed(texts, instruction=instruction)
            worst = min(worst, min_cosine(local, served))
    log.info("parity of %d texts (documents and queries): min cosine %.6f", len(texts), worst)
    return worst
