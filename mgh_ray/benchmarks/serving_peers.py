"""Peer benchmark: `mgh-ray serve` (mean and ATA) against vLLM's own pooling server, same weights.

One server at a time on this machine, loopback only, the same texts (BBC sentences of 13-64 tokens)
and the same closed-loop clients: for each of clients x texts-per-request, every client sends its next
request when the last returned, for `seconds_per_point` seconds or `max_requests_per_client`
requests. Servers:
- vLLM's OpenAI server from this venv with `--runner pooling --convert embed` and MEAN pooling on
  the merged (LoRA folded in) export of the encoder folder, float32, `threads` OMP threads, sent the
  raw text (`vllm-mean`) and, on the same server process, the token ids the encoder reads
  (`vllm-mean-tokens`: its input template included, ~10% more tokens on these texts): the second is
  the same work as `mgh-ray serve`'s, so its ratio is what the serving path costs;
- `mgh-ray serve` on the same weights with mean pooling, and with the folder's ATA pooling, one
  replica of `threads` threads, on the torch engine (`mgh-mean`, `mgh-ata`) and on the vLLM engine
  (`mgh-vllm-mean`, `mgh-vllm-ata`: serve.engine=vllm);
- in-process `Encoder.encode` (mean, `threads` threads), one call per request's texts (what the model
  alone costs at that request size: the ratio's baseline) and in batches of `max_batch_size`.
Vectors of each server are compared with in-process `Encoder` vectors (min cosine; vLLM's own server
reads the raw text, without the encoder's input template, and pools every token, so it comes near
but not to 1). The table
(texts/s, and ratios to vLLM and to in-process) goes to the log and out_dir/benchmark_serving_peers.*.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage serving-peers
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from mgh_ray.benchmarks import save
from mgh_ray.config import Section
from mgh_ray.serving import ServeConfig

log = logging.getLogger(__name__)


class PeersConfig(Section):
    clients: list[int] = [1, 4, 16]
    texts_per_request: list[int] = [1, 16]
    num_texts: int = Field(512, ge=16, le=100_000)
    min_tokens: int = Field(13, ge=1)
    max_tokens: int = Field(64, ge=1)
    seconds_per_point: float = Field(10.0, gt=0, le=600)
    max_requests_per_client: int = Field(200, ge=1)
    threads: int = Field(2, ge=1)  # compute threads of every server
    serve_threads: int | None = Field(None, ge=1)  # torch threads of the mgh replicas; None: threads
    vllm_port: int = Field(18811, ge=1, le=65535)
    serve_port: int = Field(18812, ge=1, le=65535)
    startup_timeout_s: float = Field(600.0, gt=0)
    # vLLM's own server as it ships compiles the model at start (torch.compile, ~85 s on 2 cores): the
    # benchmark's peer. True starts it eager, for a smoke run that checks answers and parity, not speed
    peer_enforce_eager: bool = False
    # mgh-mean-unpacked: mgh-mean with one forward pass per batch (no token-budget packing);
    # mgh-vllm-mean-compiled (or -ata-): the vLLM engine with serve.vllm_compile, as vLLM's server runs
    servers: list[str] = ["vllm-mean", "vllm-mean-tokens", "mgh-mean", "mgh-ata", "mgh-vllm-mean", "mgh-vllm-ata"]

PEERS = ("vllm-mean", "vllm-mean-tokens")  # vLLM's own server: one process serves both


def sentences(model_dir: Path, cfg: PeersConfig) -> list[str]:
    """`num_texts` BBC sentences whose token counts lie in [min_tokens, max_tokens] (deterministic)."""
    from mgh_ray import corpora
    from mgh_ray.encoder import Encoder

    tok = Encoder.load(model_dir).tokenizer
    out: list[str] = []
    for body in corpora.table("bbc_eval").body:
        for s in str(body).replace("\n", " ").split(". "):
            s = s.strip()
            if s and cfg.min_tokens <= len(tok(s)["input_ids"]) <= cfg.max_tokens:
                out.append(s)
                if len(out) == cfg.num_texts:
                    return out
    return out


def load(url: str, model: str | None, texts: list[str] | list[list[int]], clients: int, k: int, cfg: PeersConfig,
         api_key: str | None = None) -> dict[str, float]:
    """Closed loop over OpenAI's embeddings API (JSON floats): texts/s and latency percentiles."""
    import httpx

    lat: list[float] = []
    sent = [0] * clients
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + cfg.seconds_per_point
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(c: int) -> None:
        with httpx.Client(timeout=120, trust_env=False, headers=headers) as http:
            for r in range(cfg.max_requests_per_client):
                if time.perf_counter() > deadline:
                    break
                start = (c * 7919 + r * k) % len(texts)
                body = {"input": [texts[(start + j) % len(texts)] for j in range(k)]}
                if model:
                    body["model"] = model
                t0 = time.perf_counter()
                resp = http.post(f"{url}/v1/embeddings", json=body)
                with lock:
                    if resp.status_code != 200:
                        errors[0] += 1
                        continue
                    lat.append(time.perf_counter() - t0)
                sent[c] += k

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat or [float("nan")]) * 1000
    return {"texts_per_s": sum(sent) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": errors[0], "wall_s": wall}


def vectors(url: str, model: str | None, texts: list[str] | list[list[int]]) -> np.ndarray:
    import httpx

    body = {"input": texts, **({"model": model} if model else {})}
    resp = httpx.post(f"{url}/v1/embeddings", json=body, timeout=300, trust_env=False)
    resp.raise_for_status()
    rows = sorted(resp.json()["data"], key=lambda d: d["index"])
    return np.array([r["embedding"] for r in rows], dtype=np.float32)  # (n, dim)


def with_pooling(model_dir: Path, mode: str, out: Path) -> Path:
    """A copy of an encoder folder with another pooling mode (same weights)."""
    from mgh_ray import config as config_io
    from mgh_ray.encoder import CONFIG_FILE, EncoderConfig

    cfg = config_io.load(EncoderConfig, model_dir / CONFIG_FILE)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    config_io.save(cfg.model_copy(update={"pooling": cfg.pooling.model_copy(update={"mode": mode})}),
                   out / CONFIG_FILE)
    return out


def start_vllm(merged: Path, cfg: PeersConfig, log_path: Path, max_model_len: int) -> subprocess.Popen:
    """vLLM's OpenAI server in pooling mode (MEAN), float32, `threads` OMP threads, on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cfg.threads - 1}"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged),
           "--served-model-name", "peer", "--runner", "pooling", "--convert", "embed",
           "--pooler-config", '{"pooling_type":"MEAN"}', "--dtype", "float32", "--host", "127.0.0.1",
           "--port", str(cfg.vllm_port), "--max-model-len", str(max_model_len),
           *(["--enforce-eager"] if cfg.peer_enforce_eager else [])]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    _wait_up(f"http://127.0.0.1:{cfg.vllm_port}/health", proc, cfg.startup_timeout_s, log_path)
    return proc


def _as_llama(merged: Path) -> Path:
    """The export with vLLM's own Llama as its architecture (the export names mgh_ray's pooling model),
    so that the peer is vLLM's pooling of a plain Llama, not this project's model class."""
    import json

    config = json.loads((merged / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (merged / "config.json").write_text(json.dumps(config, indent=2))
    return merged


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited ({proc.returncode}); see {log_path}:\n"
                               f"{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vLLM not up after {timeout_s:.0f} s; see {log_path}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(serve_cfg: ServeConfig, model_dir: Path, out_dir: Path, bench: PeersConfig | None = None) -> pd.DataFrame:
    """Every server in turn under every load point; returns (and saves) the texts/s table."""
    from mgh_ray import devices, export, serving
    from mgh_ray.encoder import Encoder

    bench = bench or PeersConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(model_dir)
    texts = sentences(model_dir, bench)
    points = [(c, k) for k in bench.texts_per_request for c in bench.clients]
    results: dict[str, dict[str, float]] = {}
    parity: dict[str, float] = {}
    raw: dict[str, dict] = {}
    with devices.threads(bench.threads), tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        mean_dir = with_pooling(model_dir, "mean", tmp / "mean")
        ata_dir = with_pooling(model_dir, "ata", tmp / "ata")
        mean_enc = Encoder.load(mean_dir)
        token_texts = [ids for ids, _ in mean_enc.inputs.token_ids(texts)]  # what the encoder reads
        ref = {"mean": mean_enc.encode(texts[:64]), "ata": Encoder.load(ata_dir).encode(texts[:64])}
        mean_enc.encode(texts[:32], batch_size=serve_cfg.max_batch_size)  # warm-up
        # in-process, one call per request's worth of texts: what a server adds on top of the model
        in_process: dict[int, float] = {}
        for k in bench.texts_per_request:
            part = texts[: max(64, 8 * k)]
            t0 = time.perf_counter()
            for start in range(0, len(part), k):
                mean_enc.encode(part[start:start + k], batch_size=k)
            in_process[k] = len(part) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        mean_enc.encode(texts, batch_size=serve_cfg.max_batch_size)
        in_process_batched = len(texts) / (time.perf_counter() - t0)
        merged = _as_llama(export.write(mean_enc, tmp / "export") / "merged")
        max_model_len = mean_enc.max_tokens  # what the export's sentence_bert_config.json allows
        del mean_enc
        proc = None
        try:
            for server in bench.servers:
                log.info("serving-peers: %s", server)
                if server in PEERS:
                    if proc is None:
                        proc = start_vllm(merged, bench, out_dir / "vllm_server.log", max_model_len)
                    url, model, pool, cfg = f"http://127.0.0.1:{bench.vllm_port}", "peer", "mean", None
                else:
                    engine = "vllm" if server.startswith("mgh-vllm-") else "torch"
                    pool = server.removeprefix("mgh-").removeprefix("vllm-").split("-")[0]
                    packing = {"max_batch_tokens": 1 << 30} if server.endswith("-unpacked") else {}
                    cfg = serve_cfg.model_copy(update={**packing, "engine": engine,
                        "vllm_compile": server.endswith("-compiled"),
                        "app_name": f"peers-{server}", "route_prefix": f"/peers-{server}", "num_replicas": 1,
                        "autoscaling": None, "num_cpus": float(bench.threads),
                        "torch_threads": bench.serve_threads or bench.threads,
                        "max_inputs": max(256, max(bench.texts_per_request))})
                    url = serving.deploy(cfg, mean_dir if pool == "mean" else ata_dir)
                    model = None
                inputs = token_texts if server == "vllm-mean-tokens" else texts
                try:
                    got = vectors(url, model, inputs[:64])
                    parity[server] = float(np.min(np.sum(got * ref[pool], axis=1) /
                                                  np.linalg.norm(got, axis=1) / np.linalg.norm(ref[pool], axis=1)))
                    load(url, model, inputs[:32], 4, 4, bench.model_copy(update={"seconds_per_point": 2}))  # warm
                    for c, k in points:
                        r = load(url, model, inputs, c, k, bench, serving.api_key(serve_cfg) if cfg is not None else None)
                        results.setdefault(server, {})[f"{c}x{k}"] = r["texts_per_s"]
                        raw[f"{server} {c}x{k}"] = r
                        log.info("%s %d clients x %d texts: %.1f texts/s (p50 %.0f ms, errors %d)", server, c, k,
                                 r["texts_per_s"], r["p50_ms"], r["errors"])
                finally:
                    if cfg is not None:
                        serving.undeploy(cfg.app_name)
                if proc is not None and not any(s in PEERS for s in bench.servers[bench.servers.index(server) + 1:]):
                    _stop(proc)  # before `mgh-ray serve` deploys: one server at a time
                    proc = None
        finally:
            if proc is not None:
                _stop(proc)
    cols = [f"{c}x{k}" for c, k in points]
    table = pd.DataFrame(results).T[cols]
    table["min cosine vs Encoder"] = pd.Series(parity)
    rows = {}
    for peer in (p for p in PEERS if p in table.index):
        for server in table.index.drop(list(PEERS), errors="ignore"):
            rows[f"{server} / {peer}"] = table.loc[server, cols] / table.loc[peer, cols]
    for ata, mean in (("mgh-ata", "mgh-mean"), ("mgh-vllm-ata", "mgh-vllm-mean")):
        if {ata, mean} <= set(table.index):  # the goal: ATA within 10% of mean
            rows[f"{ata} / {mean}"] = table.loc[ata, cols] / table.loc[mean, cols]
    if {"mgh-vllm-mean", "mgh-mean"} <= set(table.index):
        rows["mgh-vllm-mean / mgh-mean"] = table.loc["mgh-vllm-mean", cols] / table.loc["mgh-mean", cols]
    local = pd.Series({f"{c}x{k}": in_process[k] for c, k in points})
    for server in table.index:
        rows[f"{server} / in-process"] = table.loc[server, cols] / local
    ratios = pd.DataFrame(rows).T
    table.loc["in-process Encoder.encode (mean, one call per request)", cols] = local
    table.loc[f"in-process Encoder.encode (mean, batch {serve_cfg.max_batch_size})", cols] = in_process_batched
    _save(table, ratios, out_dir, {"bench": bench.model_dump(), "serve": serve_cfg.model_dump(mode="json"),
                                   "model_dir": str(model_dir), "cpus": os.cpu_count(), "raw": raw})
    return pd.concat([table, ratios])


def _markdown(df: pd.DataFrame) -> str:
    """Rates with 2 decimals, cosines with 7 (0.9999999 and 0.99 must not both print as 1.00)."""
    def cell(col: str, v: float) -> str:
        return "" if pd.isna(v) else f"{v:.7f}" if "cosine" in col else f"{v:.2f}"

    lines = ["| server | " + " | ".join(df.columns) + " |", "|---|" + "---:|" * len(df.columns)]
    lines += [f"| {i} | " + " | ".join(cell(c, r[c]) for c in df.columns) + " |" for i, r in df.iterrows()]
    return "\n".join(lines)


def _save(table: pd.DataFrame, ratios: pd.DataFrame, out_dir: Path, meta: dict) -> None:
    md = ("texts/s (clients x texts per request)\n\n" + _markdown(table)
          + "\n\nratios\n\n" + _markdown(ratios))
    save(out_dir, "serving_peers", "# Serving peers benchmark\n\n" + md + "\n",
         {"table": table.reset_index().to_dict(orient="records"),
          "ratios": ratios.reset_index().to_dict(orient="records"), **meta})
