"""Our encoders under mteb's encoder protocol (`mteb.models.abs_encoder.AbsEncoder`): what `mteb.evaluate` calls.

`MtebAdapter` turns mteb's `encode(inputs, task_metadata, prompt_type)` into `embed(texts, instruction)`
with the project's instruction per task (`tasks.instruction`), each distinct text encoded once.
`ServedEncoder` embeds through a Serve app (a DeploymentHandle inside the cluster) or an endpoint URL
(HTTP), several requests in flight so they spread over the replicas; `LocalEncoder` wraps an in-process
encoder (parity checks, baselines, tests).

    from mgh_ray.mteb_adapters import LocalEncoder
    mteb.evaluate(LocalEncoder(Encoder.load("runs/tiny/train/model")), task)
"""

from __future__ import annotations

import abc
import inspect
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder


class MtebAdapter(AbsEncoder):
    """mteb's encoder protocol over `embed(texts, instruction)`; instructions from `tasks.instruction`,
    cosine similarity from the model meta (mteb's own `AbsEncoder.similarity`)."""

    mteb_model_meta: Any

    @abc.abstractmethod
    def embed(self, texts: list[str], instruction: str | None) -> np.ndarray:
        """(len(texts), dim) unit vectors; `instruction` prefixes each text when not None."""

    @property
    def dim(self) -> int:
        return int(self.mteb_model_meta.embed_dim)

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
        from mgh_ray.tasks import instruction

        texts = [t for batch in inputs for t in batch["text"]]
        # each distinct text once: STS and pair tasks repeat their texts (Lee STS: 2,450 sides of 1,225
        # pairs over 50 documents; SDG: one goal name per pair)
        unique, where = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        vectors = self.embed(list(unique), instruction(task_metadata, prompt_type))  # (distinct, dim)
        return vectors[where.reshape(-1)] if len(texts) else vectors


class ServedEncoder(MtebAdapter):
    """The served model: `app` (a DeploymentHandle, inside the cluster) or `url` (HTTP, from anywhere).

    Texts go out in `batch_size` requests with at most `concurrency` in flight, so they spread over
    the replicas; `replicas` counts which replica answered. Picklable, so it travels to Ray tasks.
    """

    def __init__(self, name: str, revision: str, dim: int, *, app: str | None = None, url: str | None = None,
                 api_key: str | None = None, batch_size: int = 32, concurrency: int = 4) -> None:
        if (app is None) == (url is None):
            raise ValueError("ServedEncoder needs exactly one of app= (Serve app name) or url= (endpoint)")
        self.app, self.url, self.api_key = app, url, api_key
        self.batch_size, self.concurrency = batch_size, concurrency
        self.mteb_model_meta = model_meta(name, revision, dim)
        self.replicas: Counter[str] = Counter()
        self._conn: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_conn": None}  # handles and HTTP clients are made where they are used

    def embed(self, texts: list[str], instruction: str | None) -> np.ndarray:
        chunks = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        if self.app is not None:
            from ray import serve

            self._conn = self._conn or serve.get_app_handle(self.app)
            outs, pending = [], deque()
            for chunk in chunks:  # at most `concurrency` requests in flight, results kept in order
                if len(pending) >= self.concurrency:
                    outs.append(pending.popleft().result())
                pending.append(self._conn.embed.remote(chunk, instruction))
            outs += [p.result() for p in pending]
            parts = [(o["vectors"], o["replica"]) for o in outs]
        else:
            from mgh_ray.serving import EmbeddingClient

            self._conn = self._conn or EmbeddingClient(self.url, self.api_key)
            with ThreadPoolExecutor(self.concurrency) as pool:
                parts = list(pool.map(lambda c: self._conn.embed(c, instruction), chunks))
        self.replicas.update(r for _, r in parts)
        return np.concatenate([v for v, _ in parts]) if parts else np.zeros((0, self.dim), np.float32)


class LocalEncoder(MtebAdapter):
    """An in-process object with `encode(texts, *, instruction, batch_size)` (an Encoder, or a stand-in)."""

    def __init__(self, encoder: Any, name: str = "local", revision: str = "local",
                 batch_size: int = 32, truncation: str = "truncate") -> None:
        self.encoder, self.batch_size, self.truncation = encoder, batch_size, truncation
        self.mteb_model_meta = model_meta(name, revision, int(encoder.dim))
        self.replicas: Counter[str] = Counter()

    def embed(self, texts: list[str], instruction: str | None) -> np.ndarray:
        kwargs = {"instruction": instruction, "batch_size": self.batch_size}
        if "truncation" in inspect.signature(self.encoder.encode).parameters:  # an Encoder; stand-ins may not
            kwargs["truncation"] = self.truncation
        return np.asarray(self.encoder.encode(texts, **kwargs), dtype=np.float32)


def model_meta(name: str, revision: str, dim: int) -> Any:
    """mteb's ModelMeta for one of our models (names become 'mgh-ray/<name>' folders in the results)."""
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta.create_empty(overwrites={
        "name": f"mgh-ray/{name}", "revision": revision, "embed_dim": dim,
        "similarity_fn_name": ScoringFunction.COSINE,
        "use_instructions": True, "modalities": ["text"], "framework": ["PyTorch"]})
