"""A real Ray Serve deployment of real encoder folders, answering real HTTP on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import numpy as np
import pytest

from mgh_ray import serving
from mgh_ray.config import ConfigError, load

PORT = 18731  # fixed loopback port for every Serve test in this session


@pytest.fixture(scope="module")
def served(serve_app, minilm_dir):
    cfg = serving.ServeConfig(port=PORT, app_name="test-serve", model_name="minilm", api_key_env=None,
                              max_inputs=8, max_chars=200, max_batch_size=8, batch_wait_timeout_s=0.05,
                              num_cpus=1, truncation="error", body_timeout_s=15)
    return serve_app(cfg, minilm_dir)


@pytest.fixture(scope="module")
def http(served):
    return served[2]


# ---------------------------------------------------------------- fast checks, no cluster


def test_config_defaults_are_a_loopback_cpu_preset(tmp_path):
    cfg = serving.ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.num_gpus == 0 and cfg.num_replicas == 1
    path = tmp_path / "serve.yaml"
    path.write_text("num_replicas: 2\nautoscaling: {min_replicas: 1, max_replicas: 3}\n")
    assert load(serving.ServeConfig, path).autoscaling.max_replicas == 3
    path.write_text("num_replica: 2\n")
    with pytest.raises(ConfigError, match="num_replica"):
        load(serving.ServeConfig, path)


def test_replica_threads_follow_its_cpus_unless_set():
    assert serving.ServeConfig(num_cpus=0.5).threads == 1
    assert serving.ServeConfig(num_cpus=2).threads == 2
    assert serving.ServeConfig(num_cpus=0.5, torch_threads=3).threads == 3


def test_build_app_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="model_dir"):
        serving.build_app({"num_replicas": 1})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serving.build_app({"model_dir": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="unknown key 'num_replica'"):
        serving.build_app({"model_dir": str(tmp_path), "num_replica": "2"})


def test_serve_config_file_builds_the_app(tmp_path):
    """The path `serve deploy config.yaml` takes: Serve's schema, import path and builder call."""
    import yaml
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    text = f"""
http_options: {{host: 127.0.0.1, port: {PORT}}}
applications:
  - name: embedder
    route_prefix: /
    import_path: mgh_ray.serving:build_app
    args: {{model_dir: "{tmp_path}", num_replicas: "2", max_batch_size: 16, num_cpus: 0.5}}
"""
    spec = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications[0]
    app = call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), spec.args)
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.init_args[0] == str(tmp_path.resolve())
    assert deployment.init_args[1]["max_batch_size"] == 16
    auto = serving.build_app({"model_dir": str(tmp_path), "autoscaling": {"max_replicas": 4}})
    auto = auto._bound_deployment
    assert auto._deployment_config.autoscaling_config.max_replicas == 4


def test_public_host_without_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MGH_RAY_API_KEY", raising=False)
    cfg = serving.ServeConfig(host="0.0.0.0")
    with pytest.raises(PermissionError, match="API key"):
        serving.start_app(cfg, tmp_path, "never", "/never")
    with pytest.raises(PermissionError, match="API key"):  # `serve run` / config files refuse too
        serving.build_app({"model_dir": str(tmp_path), "host": "0.0.0.0"})
    from ray.serve import Application

    monkeypatch.setenv("MGH_RAY_API_KEY", "k")  # with a key, the same public host builds an application
    assert isinstance(serving.build_app({"model_dir": str(tmp_path), "host": "0.0.0.0"}), Application)


def test_typed_builder_and_character_limit_from_tokens():
    import inspect

    assert inspect.signature(serving.build_app).parameters["args"].annotation is serving.ServeArgs
    assert serving.ServeConfig().chars_limit(128) == 128 * 32 and serving.ServeConfig(max_chars=9).chars_limit(128) == 9
    assert serving.ServeConfig().truncation == "truncate"


def test_dimensions_keep_a_prefix_and_renormalise():
    v = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cut = serving.shorten(v, 4)
    assert cut.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cut * np.linalg.norm(v[:, :4], axis=1, keepdims=True), v[:, :4], rtol=1e-5)


def test_model_revision_follows_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = serving.model_revision(tmp_path)
    assert serving.model_revision(tmp_path) == first
    (tmp_path / "a.txt").write_text("two")
    assert serving.model_revision(tmp_path) != first


# ---------------------------------------------------------------- the real deployment


@pytest.mark.integration
def test_embeddings_over_http(http, served):
    one = http.post("/v1/embeddings", json={"input": "A cup of tea", "model": "minilm"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert body["usage"]["prompt_tokens"] == 6  # [CLS] a cup of tea [SEP]
    assert [d["index"] for d in body["data"]] == [0] and len(body["data"][0]["embedding"]) == 384
    assert one.headers["x-pooling"] == "mean"
    texts = ["A cup of tea", "The striker scored twice", "Interest rates rise"]
    floats = http.post("/v1/embeddings", json={"input": texts}).json()
    b64 = http.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    a = np.array([d["embedding"] for d in floats["data"]], dtype=np.float32)
    b = np.stack([serving.decode_b64(d["embedding"]) for d in b64["data"]])
    np.testing.assert_array_equal(a, b)  # base64 carries the same float32 bits
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a[0], np.array(body["data"][0]["embedding"]), atol=1e-6)
    short = http.post("/v1/embeddings", json={"input": texts, "dimensions": 64}).json()
    cut = np.array([d["embedding"] for d in short["data"]])
    np.testing.assert_allclose(cut, serving.shorten(a, 64), atol=1e-6)
    query = http.post("/v1/embeddings", json={"input": texts, "instruction": "Find the topic"}).json()
    assert not np.allclose(np.array([d["embedding"] for d in query["data"]]), a)  # queries differ


@pytest.mark.integration
def test_models_and_health(http):
    assert http.get("/health").json()["status"] == "ok"
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["minilm"] and models[0]["dim"] == 384 and models[0]["revision"]
    card = models[0]
    assert (card["pooling"], card["device"], card["dtype"], card["torch_threads"]) == ("mean", "cpu", "float32", 1)


@pytest.mark.integration
def test_replicas_run_with_the_configs_health_and_shutdown_timing(served, ray_cluster):
    """What Serve itself runs (its REST API on the dashboard, through Ray's client, which sends the token): the health checks and the graceful-shutdown
    timing of ServeConfig, whose wait loop of 0.2 s (Serve's default: 2 s) lets an idle replica stop
    in about a second."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    cfg = served[0]
    apps = ServeSubmissionClient(f"http://{ray_cluster.dashboard_url}").get_serve_details()["applications"]
    run = apps[cfg.app_name]["deployments"]["Embedder"]["deployment_config"]
    assert run["graceful_shutdown_wait_loop_s"] == cfg.graceful_shutdown_wait_loop_s == 0.2
    assert run["graceful_shutdown_timeout_s"] == cfg.graceful_shutdown_timeout_s
    assert (run["health_check_period_s"], run["health_check_timeout_s"]) == (cfg.health_check_period_s,
                                                                           cfg.health_check_timeout_s)


BAD = [
    ({"input": []}, 400, "empty"),
    ({"input": ""}, 400, "empty string"),
    ({"input": ["ok", "   "]}, 400, "input[1] is an empty string"),
    ({"input": ["t"] * 9}, 400, "9 items; at most 8"),
    ({"input": ["ok", 3.5]}, 400, "input[1] is a float"),
    ({"input": [101, 2023, 102]}, 400, "token ids"),
    ({"input": {"text": "x"}}, 400, "string or a list of strings"),
    ({"model": "minilm"}, 400, "'input' is required"),
    ({"input": "x" * 201}, 413, "201 characters; the limit is 200"),
    ({"input": "hello", "model": "text-embedding-3-small"}, 404, "not served here"),
    ({"input": "hello", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "hello", "encoding_format": 0}, 400, "not 0"),
    ({"input": "hello", "encoding_format": False}, 400, "not False"),
    ({"input": "hello", "encoding_format": {}}, 400, "not {}"),
    ({"input": "a," * 99}, 413, "tokens; the model reads at most 128"),
    ({"input": "hello", "instruction": "x" * 1025}, 400, "at most 1024"),
    ({"input": "hello", "dimensions": 385}, 400, "1..384"),
    ({"input": "hello", "dimensions": True}, 400, "dimensions"),
    ({"input": "hello", "instruction": ""}, 400, "instruction"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("body", "status", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_input_gets_a_4xx_that_names_the_problem(http, body, status, message):
    resp = http.post("/v1/embeddings", json=body)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert message in err["message"] and err["code"] == status


@pytest.mark.integration
def test_bad_requests_never_take_the_replica_down(http):
    before = http.get("/v1/models").json()["data"][0]["replica"]
    assert http.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
                     ).status_code == 400
    assert http.get("/v1/embeddings").status_code == 405
    assert http.get("/v2/nothing").status_code == 404
    for body, _, _ in BAD:
        http.post("/v1/embeddings", json=body)
    assert http.post("/v1/embeddings", json={"input": "still alive"}).status_code == 200
    assert http.get("/v1/models").json()["data"][0]["replica"] == before  # same replica, not restarted


@pytest.mark.integration
def test_parity_and_handle_path(served, minilm_dir):
    from ray import serve

    from mgh_ray.encoder import Encoder

    texts = ["Kenya wins the marathon", "Oil prices fall", "a", "The government announced new taxes " * 5]
    assert serving.check_parity(served[0], minilm_dir, texts) >= 0.9999
    local = Encoder.load(minilm_dir).encode(texts, instruction="Find the topic")
    out = serve.get_app_handle("test-serve").embed.remote(texts, "Find the topic").result()
    cos = np.sum(local * out["vectors"], axis=1)
    assert cos.min() >= 0.9999 and out["replica"]
    with pytest.raises(Exception, match="at most 8"):  # the handle path keeps the same limits
        serve.get_app_handle("test-serve").embed.remote(["t"] * 9).result()


@pytest.mark.integration
def test_concurrent_requests_share_forward_passes(served, http):
    from ray import serve

    handle = serve.get_app_handle("test-serve")
    before = handle.info.remote().result()["batches"]
    texts = [f"sentence number {i} about a topic" for i in range(24)]
    with cf.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda t: http.post("/v1/embeddings", json={"input": t}).status_code, texts))
    assert codes == [200] * len(texts)
    info = handle.info.remote().result()
    passes = info["batches"] - before
    sizes = info["recent_batches"][-passes:]
    assert sum(sizes) == len(texts) and passes < len(texts)
    assert max(sizes) > 1  # every request held one text: @serve.batch merged texts of different requests
    assert info["torch_threads"] == served[0].threads == 1  # num_cpus=1: one thread, as the benchmark assumes


@pytest.mark.integration
def test_api_key_and_truncation_policy(served, minilm_dir, monkeypatch):
    monkeypatch.setenv("MGH_TEST_SERVE_KEY", "s3cret-key")
    cfg = served[0].model_copy(update={
        "app_name": "test-guarded", "route_prefix": "/guarded", "api_key_env": "MGH_TEST_SERVE_KEY",
        "truncation": "truncate", "max_chars": 20, "num_cpus": 0.5,
        "autoscaling": serving.AutoscalingSection(min_replicas=1, max_replicas=2)})
    url = serving.deploy(cfg, minilm_dir)
    try:
        assert url.endswith("/guarded")
        with httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
            assert client.get("/health").status_code == 200  # probes need no key
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
                resp = client.post("/v1/embeddings", json={"input": "hi"}, headers=headers)
                assert resp.status_code == 401 and "API key" in resp.json()["error"]["message"]
            assert client.get("/v1/models").status_code == 401
            ok = {"Authorization": "Bearer s3cret-key"}
            long = "word " * 30
            resp = client.post("/v1/embeddings", json={"input": ["short", long]}, headers=ok)
            assert resp.status_code == 200 and resp.headers["x-truncated-inputs"] == "1"
            cut = client.post("/v1/embeddings", json={"input": long[:20]}, headers=ok).json()
            np.testing.assert_allclose(resp.json()["data"][1]["embedding"], cut["data"][0]["embedding"],
                                       atol=1e-6)
        assert serving.check_parity(cfg, minilm_dir, ["short text"]) >= 0.9999  # the client sends the key
    finally:
        serving.undeploy("test-guarded")


def _perturbed_smollm2(folder, mode: str, attention: str = "causal"):
    """A SmolLM2 encoder whose LoRA B matrices are not zero, so the adapter changes every vector."""
    import torch

    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    enc = Encoder.from_config(EncoderConfig(backbone="smollm2", max_length=32, pooling=PoolingConfig(mode=mode),
                                            attention=attention))
    plain = enc.encode(["Kenya wins the marathon"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert float(np.sum(plain * enc.encode(["Kenya wins the marathon"]))) < 0.999  # the adapter matters
    return enc.save(folder)


@pytest.mark.integration
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("mode", ["ata"])  # the project's own pooling; mean pooling is MiniLM's, served above
def test_smollm2_parity_with_a_perturbed_adapter(served, tmp_path_factory, smollm2_path, mode, attention):
    from mgh_ray.encoder import Encoder

    folder = _perturbed_smollm2(tmp_path_factory.mktemp("serve") / f"smollm2-{mode}", mode, attention)
    cfg = served[0].model_copy(update={"app_name": f"test-{mode}", "route_prefix": f"/{mode}",
                                       "model_name": None, "truncation": "truncate", "max_chars": None,
                                       "max_inputs": 8})
    url = serving.deploy(cfg, folder)
    try:
        resp = httpx.post(f"{url}/v1/embeddings", json={"input": "hello"}, timeout=120, trust_env=False)
        assert resp.headers["x-pooling"] == mode and resp.json()["model"] == f"smollm2-{mode}"
        card = httpx.get(f"{url}/v1/models", timeout=60, trust_env=False).json()["data"][0]
        assert (card["pooling"], card["dtype"], card["device"], card["max_length"]) == (mode, "float32", "cpu", 32)
        assert card["attention"] == attention
        long = "The central bank raised interest rates again on Thursday, citing inflation. " * 6
        texts = ["Kenya wins the marathon", "Oil prices fall sharply in Asian trading", "Short", long]
        assert serving.check_parity(cfg, folder, texts) >= 0.9999
        # past max_length tokens the text is cut, as in-process encode cuts it, and the header says so
        resp = httpx.post(f"{url}/v1/embeddings", json={"input": ["Short", long], "encoding_format": "base64"},
                          timeout=120, trust_env=False)
        assert resp.status_code == 200 and resp.headers["x-truncated-inputs"] == "1"
        assert resp.json()["usage"]["prompt_tokens"] <= 32 + 32
        served_vec = serving.decode_b64(resp.json()["data"][1]["embedding"])
        local = Encoder.load(folder).encode([long])[0]
        assert float(served_vec @ local) >= 0.9999
    finally:
        serving.undeploy(f"test-{mode}")
    if attention == "causal":  # serve.precision=bfloat16 (evaluation's "auto" on this CPU): another number
        bf16 = cfg.model_copy(update={"app_name": "test-bf16", "route_prefix": "/bf16",
                                      "precision": "bfloat16"})
        url = serving.deploy(bf16, folder)
        try:
            card = httpx.get(f"{url}/v1/models", timeout=60, trust_env=False).json()["data"][0]
            assert (card["dtype"], card["compute"]) == ("float32", "bfloat16 autocast")
            served_vec = serving.decode_b64(httpx.post(
                f"{url}/v1/embeddings", json={"input": texts, "encoding_format": "base64"}, timeout=120,
                trust_env=False).json()["data"][1]["embedding"])
            f32 = Encoder.load(folder).encode(texts)[1]
            # bf16 arithmetic: close to float32's vector, not equal to it
            assert serving.parity_floor(bf16) <= float(served_vec @ f32) < 1 - 1e-7
            assert np.abs(served_vec - f32).max() > 1e-4
            assert serving.check_parity(bf16, folder, texts) >= serving.parity_floor(bf16)  # the serve stage's gate
        finally:
            serving.undeploy("test-bf16")


@pytest.mark.integration
def test_serving_benchmark_smoke(ray_cluster, minilm_dir, tmp_path):
    """The serving benchmark at minimal size: its table holds the HTTP, in-process and evaluation rows."""
    from mgh_ray.benchmarks import serving as bench_serving
    from mgh_ray.evaluation import EvalConfig

    bench = bench_serving.ServingBenchmarkConfig(clients=2, requests_per_client=2, texts_per_request=2,
                                                 eval_replicas=[1], eval_engines=["torch"])
    table = bench_serving.run(serving.ServeConfig(port=PORT, api_key_env=None),
                              EvalConfig(tasks=["LeeSTS"], max_rows=16), minilm_dir, tmp_path, bench)
    values = table["value"]
    assert values.filter(like="HTTP texts/s").iloc[0] > 0
    assert values.filter(like="evaluation wall time (deployed), torch engine, 1 replica").iloc[0] > 0
    assert (tmp_path / "benchmark_serving.md").is_file()


def test_the_local_cluster_gets_one_http_proxy(monkeypatch):
    """On Ray's fake multi-node cluster every node is one host: a proxy per node would bind one port twice."""
    from mgh_ray.serving.app import proxy_location

    monkeypatch.delenv("RAY_FAKE_CLUSTER", raising=False)
    assert proxy_location(serving.ServeConfig()) == "EveryNode"
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    assert proxy_location(serving.ServeConfig()) == "HeadOnly"
    assert proxy_location(serving.ServeConfig(proxy_location="HeadOnly")) == "HeadOnly"
