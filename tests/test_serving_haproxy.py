"""Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, the binary bundled with ray[serve]): a killed
HTTP proxy costs a retrying client nothing there too. A restarted proxy answers 404 for the app for about
half a second before its routes arrive; the client retries that 404 on a route that answered before."""

from __future__ import annotations

import psutil
import pytest

from mgh_ray import serving
from mgh_ray.benchmarks import outage

PORT = 18733  # a port of its own: no other module's Serve app can answer here
# read where Serve starts: this module's cluster (conftest's ray_cluster) gives it to its processes.
# Behind HAProxy Serve holds each replica it stops for at least 30 s (by default), so that a load balancer
# in front of HAProxy can deregister it: undeploying the test's app took 31 s instead of 1. Nothing stands
# in front of this HAProxy, and the kill the test times is the proxy's, not a replica's stop.
RAY_CLUSTER_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
pytestmark = [pytest.mark.integration, pytest.mark.alone]  # `make test` runs it with nothing beside it


def test_a_killed_proxy_behind_haproxy_costs_a_retrying_client_nothing(ray_cluster, minilm_dir, tmp_path):
    bench = outage.OutageConfig(clients=4, warmup_s=2, after_s=20, retry_budget_s=60, scenarios=[("proxy", 2)])
    cfg = serving.ServeConfig(port=PORT, api_key_env=None, num_cpus=1, max_batch_size=4)
    table = outage.run(cfg, minilm_dir, tmp_path, bench)
    assert any(p.info["name"] == "haproxy" for p in psutil.process_iter(["name"])), "no HAProxy in front"
    row = table.loc["proxy killed, 2 replica(s)"]
    assert row["requests"] > 0 and row["recovered"], table
    # the kill took effect (a client that never retries may still lose nothing here: whether one of its
    # requests meets the restarted proxy in the half second before its routes arrive is timing)
    assert row["killed process gone"], table
    assert row["failed (with retry)"] == 0, table
