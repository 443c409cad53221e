"""The exported encoder on vLLM's pooling runner (vllm_model.py) gives `Encoder.encode`'s vectors: ATA, mean
and last pooling, causal and bidirectional, a perturbed adapter merged in, texts of 1 to 512 tokens,
documents and queries (the instruction's tokens left out of the pool through `prefix_len`)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from mgh_ray import export

pytestmark = pytest.mark.integration

INSTRUCTION = "Given a news headline, retrieve the news article it refers to"
TEXTS = ["Hi", "Kenya wins the London marathon", "Oil prices fall sharply in Asian trading " * 3,
         "The central bank raised interest rates again on Thursday, citing inflation. " * 40]  # > 512 tokens


@pytest.mark.parametrize("mode, attention", [("ata", "causal"), ("ata", "bidirectional"),
                                             ("mean", "bidirectional"), ("last", "causal")])
def test_vllm_pooling_model_equals_the_encoder(tmp_path, monkeypatch, perturbed_encoder, mode, attention):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawn
    from vllm import LLM, PoolingParams

    from mgh_ray import vllm_model

    enc = perturbed_encoder(mode, attention)
    merged = export.write(enc, tmp_path / "export") / "merged"
    assert '"architectures": [\n    "MghRayEncoder"' in (merged / "config.json").read_text()
    vllm_model.register()  # what the plugin entry point does in every vLLM process
    llm = LLM(model=str(merged), runner="pooling", dtype="float32", enforce_eager=True, max_model_len=512,
              enable_chunked_prefill=False, enable_prefix_caching=False, kv_cache_memory_bytes=512 << 20, seed=0)
    try:
        for instruction in (None, INSTRUCTION):
            prompts = enc.inputs.token_ids(TEXTS, instruction)
            assert [len(ids) for ids, _ in prompts][0] <= 20 and len(prompts[-1][0]) == 512
            outs = llm.embed([{"prompt_token_ids": ids} for ids, _ in prompts],
                             pooling_params=[PoolingParams(extra_kwargs={"prefix_len": n}) for _, n in prompts],
                             use_tqdm=False)
            got = np.array([o.outputs.embedding for o in outs], dtype=np.float32)  # (4, 576)
            want = enc.encode(TEXTS, instruction=instruction)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
            assert float((got * want).sum(-1).min()) >= 0.9999, (mode, attention, instruction)
    finally:
        del llm
        gc.collect()
