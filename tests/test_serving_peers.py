"""`mgh-ray benchmark --stage serving-peers` at smoke size: vLLM's own pooling server and `mgh-ray serve`
on the same weights, each answering with the encoder's vectors, and the saved table of their rows and
ratios. A module of its own (not tests/test_serving_vllm.py's): `make test` runs that module beside the
rest and this test in the foreground, to even the two lanes."""

from __future__ import annotations

import pytest

from mgh_ray import serving

PORT = 18731  # the session's Serve HTTP port (tests/test_serving.py)
pytestmark = pytest.mark.integration


def test_serving_peers_benchmark_smoke(ray_cluster, smollm2_path, tmp_path):
    """The peer benchmark at minimal size from a fresh folder of the tiny preset's length (64 tokens,
    which vLLM must be told: the export states max_seq_length 64): every server answers, with Encoder's
    vectors, and the table holds their rows and ratios. `mgh-ray serve` runs here on the torch engine,
    which starts in seconds: tests/test_serving_vllm.py serves the vLLM engine, and the benchmark deploys
    both engines through the same code."""
    import torch

    from mgh_ray.benchmarks import serving_peers
    from mgh_ray.encoder import Encoder, EncoderConfig

    folder = Encoder.from_config(EncoderConfig(max_length=64, pooling={"mode": "ata"})).save(tmp_path / "m")
    threads = torch.get_num_threads()
    bench = serving_peers.PeersConfig(clients=[2], texts_per_request=[2], num_texts=16, seconds_per_point=1,
                                      max_requests_per_client=2, threads=1,
                                      servers=["vllm-mean", "vllm-mean-tokens", "mgh-ata"],
                                      peer_enforce_eager=True)  # a smoke run: answers and parity, not speed
    table = serving_peers.run(serving.ServeConfig(port=PORT, api_key_env=None, vllm_kv_cache_mb=128), folder,
                              tmp_path / "out", bench)
    assert (table.loc[["vllm-mean", "vllm-mean-tokens", "mgh-ata"], "2x2"] > 0).all()
    assert table.loc["mgh-ata", "min cosine vs Encoder"] >= 0.9999
    # vLLM's own server reads the raw text (no input template, every token pooled): near, not equal;
    # sent the encoder's token ids it reads what the encoder reads, and pools the template's prefix too
    assert 0.9 < table.loc["vllm-mean", "min cosine vs Encoder"] < 1
    assert 0.9 < table.loc["vllm-mean-tokens", "min cosine vs Encoder"] < 1
    assert {"mgh-ata / vllm-mean", "mgh-ata / vllm-mean-tokens", "mgh-ata / in-process"} <= set(table.index)
    assert (tmp_path / "out" / "benchmark_serving_peers.md").is_file()
    assert torch.get_num_threads() == threads  # it measured at 1 thread, and gave this process its own back
