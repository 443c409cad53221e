"""The torch engine's forward step (serving/engines.py) without a cluster: token-budget packing keeps in-process vectors, and one
text that fails never fails its batch-mates."""

from __future__ import annotations

import numpy as np
import pytest

from mgh_ray import serving


@pytest.fixture(scope="module")
def encoder(minilm_path):
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    return Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean"))).eval()


def _forward(encoder, items, **cfg):
    """The torch engine's forward step on its own: no Serve context, no HTTP; in float32, serve.precision's
    default (the engine's autocast for another precision is tested over HTTP in tests/test_serving.py)."""
    import contextlib
    from types import SimpleNamespace

    from mgh_ray.serving.engines import TorchEngine

    engine = SimpleNamespace(encoder=encoder, cfg=serving.ServeConfig(**cfg),
                             _autocast=contextlib.nullcontext)
    return TorchEngine._forward(engine, items)


def _items(encoder, texts, instruction=None):
    lengths = [len(ids) for ids in encoder.tokenizer(encoder.format(texts, instruction))["input_ids"]]
    return [(t, instruction, n) for t, n in zip(texts, lengths)]


def test_packed_passes_match_in_process_encode(encoder):
    texts = ["short", "a medium length sentence about football", "x " * 60, "tea", "rates rise again today"]
    items = _items(encoder, texts) + _items(encoder, texts[:2], "Find the topic")
    calls = []
    real = encoder.encode

    def counting(batch, **kw):
        calls.append(len(batch))
        return real(batch, **kw)

    encoder.encode = counting
    try:
        out = _forward(encoder, items, max_batch_tokens=64)
    finally:
        del encoder.encode
    assert len(calls) > 2 and max(calls) < len(texts)  # the 64-token budget split the batch into passes
    local = np.concatenate([encoder.encode(texts), encoder.encode(texts[:2], instruction="Find the topic")])
    np.testing.assert_allclose(np.stack(out), local, atol=1e-5)


def test_a_failing_text_fails_alone(encoder):
    """A test double for the failure branch (real inputs that break the model are refused earlier, by
    validation; tests/test_serving_hostile.py sends one over HTTP)."""
    real = encoder.encode

    def flaky(batch, **kw):
        if any("poison" in t for t in batch):
            if len(batch) == 1:
                raise RuntimeError("tokenizer failure")
            raise RuntimeError("batch failure")
        return real(batch, **kw)

    texts = ["good one", "poison", "good two"]
    encoder.encode = flaky
    try:
        out = _forward(encoder, _items(encoder, texts))
    finally:
        del encoder.encode
    assert isinstance(out[1], RuntimeError)
    np.testing.assert_allclose(np.stack([out[0], out[2]]), real(["good one", "good two"]), atol=1e-5)


def test_replicas_on_one_node_claim_different_cores(tmp_path):
    """The vLLM engine binds its threads to cores no other replica on the node holds: each claim takes
    free cores, a claim that cannot be met takes none (the engine then runs unbound), and closing a
    claim's lock files (the replica's end) frees its cores."""
    import os

    from mgh_ray.serving.engines import claim_cores

    allowed = sorted(os.sched_getaffinity(0))
    first, fds = claim_cores(1, tmp_path)
    assert first == allowed[:1] and len(fds) == 1
    rest, rest_fds = claim_cores(len(allowed) - 1, tmp_path) if len(allowed) > 1 else ([], [])
    assert rest == allowed[1:]
    assert claim_cores(1, tmp_path) == ([], [])  # every core held
    for fd in fds:
        os.close(fd)
    again, again_fds = claim_cores(1, tmp_path)
    assert again == allowed[:1]
    for fd in rest_fds + again_fds:
        os.close(fd)
