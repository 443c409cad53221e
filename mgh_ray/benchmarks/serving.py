"""Serving benchmark: HTTP under concurrent clients vs in-process `encode`; evaluation on 1 vs 2 replicas.

One run, one machine, baselines measured in the same run:
(a) N client threads post `texts_per_request` texts each to `/v1/embeddings` on loopback until each has
    sent `requests_per_client` requests or `max_seconds` pass: texts/s, p50 and p99 request latency;
(b) the same texts through in-process `Encoder.encode` (batch = the server's max_batch_size): texts/s,
    once with a replica's torch threads (the like-for-like baseline of the HTTP/in-process ratio) and
    once with this process's own threads where those differ;
(c) wall time of `evaluation.evaluate_model` on the eval config's tasks with 1 and with 2 replicas, on
    each engine of `eval_engines` (torch: eager; vllm: vLLM's pooling runner) (fresh result folders, so
    nothing is skipped), with the deployment's start-up timed apart; the vLLM/torch ratio at the same
    replicas.
The table goes to the log and to out_dir/benchmark_serving.{md,json}.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage serving
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from mgh_ray.benchmarks import save
from mgh_ray.config import Section
from mgh_ray.evaluation import EvalConfig
from mgh_ray.serving import ServeConfig

log = logging.getLogger(__name__)


class ServingBenchmarkConfig(Section):
    clients: int = Field(8, ge=1)
    requests_per_client: int = Field(8, ge=1)
    texts_per_request: int = Field(4, ge=1)
    max_seconds: float = Field(120.0, gt=0)  # a client stops early once this much time has passed
    replicas: int = Field(1, ge=1)  # replicas behind the HTTP load test
    eval_replicas: list[int] = [1, 2]
    eval_engines: list[Literal["torch", "vllm"]] = ["torch", "vllm"]


def _texts(n: int) -> list[str]:
    from mgh_ray import corpora

    df = corpora.table("bbc_eval")
    pool = [f"{t}. {b[:200]}" for t, b in zip(df.title, df.body)]
    return [pool[i % len(pool)] for i in range(n)]


def http_load(url: str, api_key: str | None, texts: list[str],
              bench: ServingBenchmarkConfig) -> dict[str, float]:
    """Closed-loop load: each client sends its next request when the last one returned."""
    from mgh_ray.serving import EmbeddingClient

    k = bench.texts_per_request
    latencies: list[float] = []
    sent = [0] * bench.clients
    lock = threading.Lock()
    deadline = time.perf_counter() + bench.max_seconds

    def client(c: int) -> None:
        with EmbeddingClient(url, api_key) as http:
            for r in range(bench.requests_per_client):
                if time.perf_counter() > deadline:
                    break
                start = (c * bench.requests_per_client + r) * k
                batch = [texts[(start + j) % len(texts)] for j in range(k)]
                t0 = time.perf_counter()
                http.embed(batch)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                sent[c] += k

    threads = [threading.Thread(target=client, args=(c,)) for c in range(bench.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"texts": float(sum(sent)), "wall_s": wall, "texts_per_s": sum(sent) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def run(serve_cfg: ServeConfig, eval_cfg: EvalConfig, model_dir: Path, out_dir: Path,
        bench: ServingBenchmarkConfig | None = None) -> pd.DataFrame:
    """All three measurements on the running cluster; returns (and saves) the table."""
    import torch

    from mgh_ray import devices, evaluation, serving
    from mgh_ray.encoder import Encoder

    bench = bench or ServingBenchmarkConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir)
    n = bench.clients * bench.requests_per_client * bench.texts_per_request
    texts = _texts(n)
    cfg = serve_cfg.model_copy(update={"app_name": "bench", "route_prefix": "/bench",
                                       "num_replicas": bench.replicas, "autoscaling": None})
    url = serving.deploy(cfg, model_dir)
    try:
        with serving.EmbeddingClient(url, serving.api_key(cfg)) as warm:
            warm.embed(texts[:2])
        http = http_load(url, serving.api_key(cfg), texts, bench)
    finally:
        serving.undeploy("bench")

    encoder = Encoder.load(model_dir)
    encoder.encode(texts[:2])  # warm-up
    own_threads = torch.get_num_threads()
    replica_threads = serve_cfg.threads
    local_tps = {}
    for threads in dict.fromkeys([replica_threads, own_threads]):
        with devices.threads(threads):
            t0 = time.perf_counter()
            encoder.encode(texts[: int(http["texts"])], batch_size=serve_cfg.max_batch_size)
            local_tps[threads] = http["texts"] / (time.perf_counter() - t0)
    del encoder

    rows = [
        (f"HTTP texts/s ({bench.clients} clients, {bench.texts_per_request} texts/request, "
         f"{bench.replicas} replica(s) of {replica_threads} torch thread(s))", http["texts_per_s"],
         "texts/s"),
        ("HTTP request latency p50", http["p50_ms"], "ms"),
        ("HTTP request latency p99", http["p99_ms"], "ms"),
    ]
    # the baseline: in-process encode with one replica's torch threads, so that with the default single
    # replica the ratio is what HTTP, Serve and batching cost, not a difference in threads
    for threads, tps in local_tps.items():
        rows.append((f"in-process encode texts/s (batch {serve_cfg.max_batch_size}, torch threads {threads})",
                     tps, "texts/s"))
    rows.append((f"HTTP / in-process throughput, same torch threads ({replica_threads})",
                 http["texts_per_s"] / local_tps[replica_threads], "ratio"))
    walls: dict[tuple[str, int], float] = {}
    for engine in bench.eval_engines:
        for replicas in bench.eval_replicas:
            ecfg = eval_cfg.model_copy(update={"num_replicas": replicas, "overwrite": True, "engine": engine})
            app = f"bench-eval-{engine}-r{replicas}"
            t0 = time.perf_counter()
            serving.start_app(evaluation.eval_serve_config(ecfg, serve_cfg), model_dir, app, route_prefix=None)
            t1 = time.perf_counter()
            try:
                with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                    evaluation.evaluate_model(ecfg, app, model_dir, Path(tmp), serve_cfg, app=app)
            finally:
                serving.undeploy(app)
            walls[engine, replicas] = time.perf_counter() - t1
            precision = ecfg.precision if engine == "torch" else "the vLLM engine's dtype"
            what = (f"{engine} engine, {replicas} replica(s), {len(eval_cfg.tasks)} tasks, "
                    f"max_rows={eval_cfg.max_rows}, precision {precision}")
            rows += [(f"deploy time, {engine} engine, {replicas} replica(s)", t1 - t0, "s"),
                     (f"evaluation wall time (deployed), {what}", walls[engine, replicas], "s")]
    for engine in bench.eval_engines:
        counts = sorted(r for e, r in walls if e == engine)
        if len(counts) >= 2:
            lo, hi = counts[0], counts[-1]
            rows.append((f"evaluation speed-up, {engine} engine, {hi} vs {lo} replica(s)",
                         walls[engine, lo] / walls[engine, hi], "ratio"))
    for replicas in bench.eval_replicas:
        if ("torch", replicas) in walls and ("vllm", replicas) in walls:
            rows.append((f"evaluation speed-up, vllm vs torch engine, {replicas} replica(s)",
                         walls["torch", replicas] / walls["vllm", replicas], "ratio"))
    table = pd.DataFrame(rows, columns=["measure", "value", "unit"]).set_index("measure")
    _save(table, out_dir, {"serve": serve_cfg.model_dump(mode="json"),
                           "eval": eval_cfg.model_dump(mode="json"), "bench": bench.model_dump(mode="json"),
                           "model_dir": str(model_dir),
                           "cpus": os.cpu_count(), "http": http,
                           "eval_wall_s": {f"{e} r{r}": w for (e, r), w in walls.items()}})
    return table


def _save(table: pd.DataFrame, out_dir: Path, meta: dict) -> None:
    md = table.to_markdown(floatfmt=".3f", colalign=("left", "right", "left"))
    save(out_dir, "serving", "# Serving benchmark\n\n" + md + "\n",
         {"table": table.reset_index().to_dict(orient="records"), **meta})
