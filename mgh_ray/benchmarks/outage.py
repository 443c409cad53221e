"""Outage benchmark: what clients of `/v1/embeddings` see when a Serve replica or the HTTP proxy dies.

For each scenario the model is deployed on loopback, `clients` closed-loop clients post one short text
at a time, and after `warmup_s` one process is killed (`ray.kill`, as a crash would: no clean-up):
- `replica`, with 1 and with 2 replicas: one replica of the app (2 replicas is the baseline's
  alternative: the same kill with a second replica to route to);
- `proxy`: Serve's HTTP proxy, which Serve's controller starts again.
Half the clients send each request once (what a naive client sees); the other half are the project's
`EmbeddingClient`, which retries a refused connection or a 5xx with a short backoff for up to
`retry_budget_s` (the retry guidance of docs/serving.md).

Per scenario: requests sent; failed requests without retry, how many of those were in flight at the
kill, the outage (from the kill to the end of the last failed request, 0 when none failed) and the
longest request (requests queued for a replacement replica wait rather than fail); with retry, the
failures left and the longest request; whether the killed process is gone (the kill took effect:
behind HAProxy a client that never retries may lose nothing, since whether a request meets the
restarted proxy before its routes is timing); how long the traffic ran after the kill (until every
client's requests of the last `settle_s` succeeded, at most `after_s`); and whether every client's last
request succeeded (the service came back). The table goes to the log and to
out_dir/benchmark_outage.{md,json}.

    mgh-ray benchmark jobs/configs/tiny.yaml --stage serving-outage
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
from pydantic import Field

from mgh_ray.benchmarks import save
from mgh_ray.config import Section
from mgh_ray.serving import ServeConfig
from mgh_ray.serving.client import RETRY_BACKOFF_S

log = logging.getLogger(__name__)


class OutageConfig(Section):
    clients: int = Field(4, ge=2)  # half send once, half retry
    warmup_s: float = Field(3.0, ge=0)  # traffic before the kill
    # traffic after the kill: until every client's requests of the last `settle_s` succeeded (the service
    # is back), at least `settle_s`, at most `after_s`
    after_s: float = Field(30.0, gt=0)
    settle_s: float = Field(5.0, gt=0)
    retry_budget_s: float = Field(60.0, gt=0)  # how long a retrying client keeps retrying one request
    scenarios: list[tuple[str, int]] = [("replica", 1), ("replica", 2), ("proxy", 2)]


@dataclass
class Request:
    client: int
    start: float
    end: float
    ok: bool
    retrying: bool


def _client(url: str, key: str | None, client: int, stop: threading.Event, out: list[Request],
            bench: OutageConfig) -> None:
    """Odd clients are the project's `EmbeddingClient` (retrying), even ones send each request once."""
    from mgh_ray.serving import EmbeddingClient

    retrying = client % 2 == 1
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn = EmbeddingClient(url, key, timeout_s=30, retry_s=bench.retry_budget_s) if retrying else \
        httpx.Client(base_url=url, headers=headers, timeout=30, trust_env=False)
    with conn:
        n = 0
        while not stop.is_set():
            text, start = f"a short sentence number {n}", time.perf_counter()
            try:
                if retrying:
                    conn.embed([text])
                    ok = True
                else:
                    ok = conn.post("/v1/embeddings", json={"input": [text]}).status_code == 200
            except (httpx.HTTPError, RuntimeError):  # refused, reset, timed out; a non-200 after retries
                ok = False
            out.append(Request(client, start, time.perf_counter(), ok, retrying))
            n += 1


def _victim(app: str, what: str):
    """A handle of the actor to kill: one replica of `app`, or the HTTP proxy (found by the names Serve
    gives them, through this driver's own connection: no dashboard lookup)."""
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX
    from ray.serve._private.constants import SERVE_NAMESPACE, SERVE_PROXY_NAME

    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{app}#" if what == "replica" else SERVE_PROXY_NAME
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix))
    if not names:
        raise RuntimeError(f"no live {what} actor of app {app!r} to kill")
    return ray.get_actor(names[0], namespace=SERVE_NAMESPACE)


def scenario(serve_cfg: ServeConfig, model_dir: Path, what: str, replicas: int, bench: OutageConfig) -> dict:
    """Deploy, load, kill, measure; the app is deleted afterwards."""
    import ray

    from mgh_ray import serving

    app = f"outage-{what}-r{replicas}"
    cfg = serve_cfg.model_copy(update={"app_name": app, "route_prefix": f"/{app}", "num_replicas": replicas,
                                       "autoscaling": None})
    url = serving.deploy(cfg, model_dir)
    key = serving.api_key(cfg)
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=_client, args=(url, key, c, stop, out, bench), daemon=True)
               for c in range(bench.clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(bench.warmup_s)
        victim = _victim(app, what)
        pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        killed = time.perf_counter()
        ray.kill(victim, no_restart=False)
        log.info("%s: killed one %s at t=%.1f s", app, what, bench.warmup_s)
        while (now := time.perf_counter()) < killed + bench.after_s:
            if now >= killed + bench.settle_s and _settled(out, bench.clients, now - bench.settle_s):
                break
            time.sleep(0.25)
        after = time.perf_counter() - killed
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=bench.retry_budget_s + 60)
        serving.undeploy(app)
    naive = [r for r in out if not r.retrying]
    failed = [r for r in naive if not r.ok]
    retried = [r for r in out if r.retrying]
    last = {r.client: r for r in sorted(out, key=lambda r: r.start)}  # each client's last request
    return {"scenario": f"{what} killed, {replicas} replica(s)", "requests": len(out),
            "failed (no retry)": len(failed),
            "failed, in flight at the kill": sum(r.start <= killed for r in failed),
            "outage s (no retry)": max((r.end - killed for r in failed), default=0.0),
            # requests that wait for a replacement instead of failing: the outage as latency
            "longest request s (no retry)": max((r.end - r.start for r in naive), default=0.0),
            "failed (with retry)": sum(not r.ok for r in retried),
            "longest request s (with retry)": max((r.end - r.start for r in retried), default=0.0),
            "traffic after the kill s": after,
            "killed process gone": not _alive(pid),
            "recovered": all(r.ok for r in last.values())}  # every client's last request succeeded


def _settled(out: list[Request], clients: int, since: float) -> bool:
    """Whether every client sent a request since `since` and all of those it finished succeeded."""
    recent = [r for r in list(out) if r.start >= since]
    return all(any(r.client == c for r in recent) for c in range(clients)) and all(r.ok for r in recent)


def _alive(pid: int) -> bool:
    """Whether a process of this host has that pid (the benchmark's cluster is local: loopback only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid
        return True
    return True


def run(serve_cfg: ServeConfig, model_dir: Path, out_dir: Path,
        bench: OutageConfig | None = None) -> pd.DataFrame:
    """Every scenario of `bench` on the running cluster, one after another; returns (and saves) the table."""
    bench = bench or OutageConfig()
    rows = [scenario(serve_cfg, Path(model_dir), what, n, bench) for what, n in bench.scenarios]
    table = pd.DataFrame(rows).set_index("scenario")
    md = "\n".join(["# Outage benchmark", "",
                    f"{bench.clients} closed-loop clients of one text each (half retry a refused connection "
                    f"or a 5xx every {RETRY_BACKOFF_S} s for up to {bench.retry_budget_s} s), "
                    f"{bench.warmup_s} s before the kill and after it until every client's requests of the last "
                    f"{bench.settle_s} s succeeded (at most {bench.after_s} s); health check every "
                    f"{serve_cfg.health_check_period_s} s.", "", table.to_markdown(floatfmt=".2f"), ""])
    save(out_dir, "outage", md, {"config": bench.model_dump(), "rows": rows})
    return table
