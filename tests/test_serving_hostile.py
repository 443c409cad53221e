"""Hostile and unlucky clients against a real deployment on 127.0.0.1 (bounded in count and time):
a poisoned text beside good requests, stalled bodies beside a normal client, a small request behind a
large one, bodies over the limit, exact routes, the OpenAPI schema and Ray Serve metrics."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from mgh_ray import serving

PORT = 18731  # the session's Serve HTTP port (tests/test_serving.py)
pytestmark = [pytest.mark.integration, pytest.mark.alone]  # `make test` runs it with nothing beside it


@pytest.fixture(scope="module")
def hostile(serve_app, minilm_dir):
    cfg = serving.ServeConfig(port=PORT, app_name="test-hostile", route_prefix="/hostile", api_key_env=None,
                              max_inputs=96, max_batch_size=4, batch_wait_timeout_s=0.02, num_cpus=1,
                              max_body_bytes=65536, body_timeout_s=8, max_ongoing_requests=64)
    return serve_app(cfg, minilm_dir)


@pytest.fixture(scope="module")
def http(hostile):
    return hostile[2]


def _post_raw(http: httpx.Client, raw: bytes) -> httpx.Response:
    return http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})


def test_a_lone_surrogate_fails_only_its_own_request(http):
    good = [f"an innocent sentence number {i}" for i in range(12)]
    poisoned = b'{"input": ["fine", "bad \\ud800 text"]}'  # valid JSON, invalid Unicode
    with cf.ThreadPoolExecutor(13) as pool:
        bad = pool.submit(_post_raw, http, poisoned)
        oks = list(pool.map(lambda t: http.post("/v1/embeddings", json={"input": [t, t + "!"]}), good))
    assert bad.result().status_code == 400
    assert "input[1] is not valid Unicode" in bad.result().json()["error"]["message"]
    assert [r.status_code for r in oks] == [200] * len(good)
    assert _post_raw(http, b'{"input": "x", "instruction": "\\udfff"}').status_code == 400


def _stall(url_port: int, path: str) -> socket.socket:
    """A client that announces a 60 kB body, sends 10 bytes of it, and stops."""
    sock = socket.create_connection(("127.0.0.1", url_port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 60000\r\n\r\n".encode() + b'{"input": ')
    return sock


def test_stalled_bodies_do_not_block_others_and_time_out(http, hostile):
    stalled = [_stall(PORT, "/hostile/v1/embeddings") for _ in range(8)]
    try:
        time.sleep(0.5)  # the stalled requests have reached the replica
        resp = http.post("/v1/embeddings", json={"input": "a normal request"})
        assert resp.status_code == 200
        for sock in stalled:  # the normal request came back while every stalled one still waits
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1024)
            sock.setblocking(True)
        for sock in stalled:  # then each stalled body is given up (body_timeout_s), bounded here
            sock.settimeout(60)
            head = sock.recv(4096).decode(errors="replace")
            assert head.startswith("HTTP/1.1 408"), head[:200]
    finally:
        for sock in stalled:
            sock.close()
    assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_a_small_request_is_not_held_behind_a_large_one(http):
    big = [f"a rather long sentence about markets and football, number {i} " * 6 for i in range(96)]
    done: list[str] = []
    lock = threading.Lock()

    def post(name: str, texts: list[str]) -> int:
        code = http.post("/v1/embeddings", json={"input": texts}).status_code
        with lock:
            done.append(name)
        return code

    from ray import serve

    handle = serve.get_app_handle("test-hostile")
    before = handle.info.remote().result()["batches"]
    with cf.ThreadPoolExecutor(2) as pool:
        large = pool.submit(post, "large", big)
        deadline = time.monotonic() + 60
        while handle.info.remote().result()["batches"] == before and not large.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)  # wait until the large request's first forward pass (of 24) has started
        small = pool.submit(post, "small", ["a small request"])
        assert small.result() == 200 and large.result() == 200
    assert done == ["small", "large"]  # the small one rode in one of the large one's early batches


def test_body_over_the_limit_gets_413_and_the_replica_answers_the_same(http, hostile):
    before = http.post("/v1/embeddings", json={"input": "reference text"}).json()["data"][0]["embedding"]
    limit = hostile[0].max_body_bytes
    over = b'{"input": "' + b"x" * (limit - 12) + b'"}'  # one byte over
    assert len(over) == limit + 1
    resp = _post_raw(http, over)
    assert resp.status_code == 413 and f"limit is {limit}" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"input": "'
        for _ in range(limit // 512 + 1):
            yield b"y" * 512
        yield b'"}'

    resp = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and f"passed {limit} bytes" in resp.json()["error"]["message"]
    after = http.post("/v1/embeddings", json={"input": "reference text"}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.array(before), np.array(after))


@pytest.mark.parametrize("fmt", [0, False, {}, [], "FLOAT"])
def test_encoding_format_must_be_named(http, fmt):
    resp = http.post("/v1/embeddings", json={"input": "hello", "encoding_format": fmt})
    assert resp.status_code == 400 and "encoding_format" in resp.json()["error"]["message"]


@pytest.mark.parametrize("depth", [2_000, 20_000])  # 20,000 deep: 40 kB, within the body limit
def test_deeply_nested_json_is_a_400_not_a_500(http, depth):
    resp = _post_raw(http, b"[" * depth + b"]" * depth)
    assert resp.status_code == 400 and "nests too deeply" in resp.json()["error"]["message"]
    nested = b'{"input": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
    assert _post_raw(http, nested).status_code == 400
    assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_the_route_answers_with_or_without_a_trailing_slash(http):
    plain = http.post("/v1/embeddings", json={"input": "x"})
    slashed = http.post("/v1/embeddings/", json={"input": "x"})  # used to be a 307 redirect
    assert plain.status_code == slashed.status_code == 200
    assert slashed.json()["data"][0]["embedding"] == plain.json()["data"][0]["embedding"]
    assert http.get("/health/").status_code == 404  # other paths match whole, without redirects


def test_routes_match_whole_paths(http):
    assert http.post("/anything/v1/embeddings", json={"input": "x"}).status_code == 404
    assert http.get("/x/health").status_code == 404
    resp = http.post("/v1/embeddings/extra", json={"input": "x"})
    assert resp.status_code == 404 and "no route" in resp.json()["error"]["message"]
    assert http.put("/v1/embeddings", json={"input": "x"}).status_code == 405


def test_openapi_schema_declares_the_openai_models(http):
    schema = http.get("/openapi.json").json()
    post = schema["paths"]["/v1/embeddings"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"input", "model", "encoding_format", "dimensions", "instruction"} <= set(body["properties"])
    assert "EmbeddingResponse" in str(post["responses"]["200"])
    assert http.get("/docs").status_code == 200 and "swagger" in http.get("/docs").text.lower()


def test_metrics_reach_rays_prometheus_export(http, ray_cluster):
    import ray

    for _ in range(3):
        assert http.post("/v1/embeddings", json={"input": ["one", "two"]}).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ("ray_mgh_embed_requests", "ray_mgh_embed_request_latency_ms_bucket", "ray_mgh_embed_batch_size")
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    line = next(ln for ln in text.splitlines() if ln.startswith("ray_mgh_embed_requests") and 'status="200"' in ln)
    assert float(line.rsplit(" ", 1)[1]) >= 3
