"""The HTTP protocol of the embedder: OpenAI-style request/response models and their validation.

`EmbeddingRequest` mirrors OpenAI's `POST /v1/embeddings` body (`input`, `model`, `encoding_format`,
`dimensions`, `user`) plus our `instruction` (texts sent with it are queries, E5 style). Validation
is pydantic's, with limits from the `ServeConfig` passed as context, and every message names the
problem and the fix; `RequestError` carries the HTTP status an error maps to.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from mgh_ray.serving.config import ServeConfig


class RequestError(ValueError):
    """A request the server refuses: HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _cfg(info: ValidationInfo) -> ServeConfig:
    return (info.context or {}).get("cfg") or ServeConfig()


class EmbeddingRequest(BaseModel):
    """Body of `POST /v1/embeddings` (OpenAI's fields, plus `instruction`)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send fields we do not use

    input: str | list[str] = Field(description="a text or a list of texts (token ids are not supported)")
    model: str | None = Field(None, description="the served model's id (GET /v1/models); optional")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': JSON numbers; 'base64': little-endian float32 bytes")
    dimensions: int | None = Field(None, description="keep the first d coordinates, renormalised")
    user: str | None = Field(None, description="accepted for OpenAI compatibility; unused")
    instruction: str | None = Field(None, description="makes the texts queries (E5 style); documents "
                                                      "when absent")

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, raw: Any, info: ValidationInfo) -> list[str]:
        cfg = _cfg(info)
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise ValueError(f"'input' must be a string or a list of strings, not {type(raw).__name__}")
        if not items:
            raise ValueError("'input' is empty: send at least one text")
        if len(items) > cfg.max_inputs:
            raise ValueError(f"'input' has {len(items)} items; at most {cfg.max_inputs} per request")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                ids = isinstance(item, list) or all(isinstance(x, int) and not isinstance(x, bool)
                                                    for x in items)
                kind = "token ids (not supported: send text)" if ids else f"a {type(item).__name__}"
                raise ValueError(f"input[{i}] is {kind}; every item must be a string")
            if not item.strip():
                raise ValueError(f"input[{i}] is an empty string")
            _check_unicode(item, f"input[{i}]")
        return items

    @field_validator("encoding_format", mode="before")
    @classmethod
    def _format(cls, fmt: Any) -> str:
        if fmt is None:
            return "float"
        if fmt not in ("float", "base64") or not isinstance(fmt, str):  # 0, False, {} are not "float"
            raise ValueError(f"'encoding_format' must be 'float' or 'base64', not {fmt!r}")
        return fmt

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dimensions(cls, dims: Any) -> int | None:
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
            raise ValueError(f"'dimensions' must be a positive integer, not {dims!r}")
        return dims

    @field_validator("model", "user", mode="before")
    @classmethod
    def _strings(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"'{info.field_name}' must be a string, not {type(value).__name__}")
        return value

    @field_validator("instruction", mode="before")
    @classmethod
    def _instruction(cls, inst: Any, info: ValidationInfo) -> str | None:
        if inst is None:
            return None
        if not isinstance(inst, str) or not inst.strip():
            raise ValueError("'instruction' must be a non-empty string when given")
        limit = _cfg(info).max_instruction_chars
        if len(inst) > limit:
            raise ValueError(f"'instruction' has {len(inst)} characters; at most {limit}")
        _check_unicode(inst, "'instruction'")
        return inst


def _check_unicode(text: str, what: str) -> None:
    """JSON may carry lone surrogates ("\\ud800") that no tokenizer accepts: refuse them here, per text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at character {exc.start}): "
                         "send UTF-8 text") from None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 when encoding_format="base64"


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`, with what a replica runs."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    owned_by: str = "mgh_ray"
    created: int = 0
    revision: str
    dim: int
    pooling: str
    attention: str  # causal, or bidirectional (an LLM2Vec-style encoder)
    engine: str  # torch (eager) or vllm (vLLM's pooling runner)
    device: str
    dtype: str
    torch_threads: int  # the engine's threads (OMP threads of vLLM's engine)
    max_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


def parse_request(body: Any, cfg: ServeConfig, model: str, dim: int) -> EmbeddingRequest:
    """Validate a decoded JSON body against `cfg`'s limits and the served model; RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if "input" not in body:
        raise RequestError(400, "'input' is required: a string or a list of strings", "input")
    try:
        req = EmbeddingRequest.model_validate(body, context={"cfg": cfg})
    except RecursionError:  # a value nested thousands deep inside an object
        raise RequestError(400, "the request body nests too deeply to be a request") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error":
            message = f"'{field}': {message}"
        raise RequestError(400, message, field) from None
    if req.model is not None and req.model != model:
        raise RequestError(404, f"model {req.model!r} is not served here; available: {model!r}", "model")
    if req.dimensions is not None and req.dimensions > dim:
        raise RequestError(400, f"'dimensions' must be an integer in 1..{dim}, not {req.dimensions}",
                           "dimensions")
    return req


def shorten(vectors: np.ndarray, dims: int | None) -> np.ndarray:
    """Keep the first `dims` coordinates and normalise again (OpenAI `dimensions`)."""
    if dims is None or dims == vectors.shape[1]:
        return vectors
    cut = vectors[:, :dims]  # (n, dims)
    return (cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def encode_b64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def decode_b64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def model_revision(model_dir: str | Path) -> str:
    """A cheap content fingerprint of an encoder folder (small files whole, large ones by size and ends);
    for a folder on object storage, the hash of its content manifest (storage.upload_dir writes it)."""
    from mgh_ray import storage

    if storage.is_uri(str(model_dir)):
        return hashlib.sha256(storage.read_bytes(storage.join(str(model_dir), storage.MANIFEST))).hexdigest()[:12]
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
    from mgh_ray import storage

    return cfg.model_name or storage.normalize(str(model_dir)).rsplit("/", 1)[-1]
