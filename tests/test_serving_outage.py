"""Outages as clients see them (the outage benchmark at test size, on MiniLM): with two replicas a
killed replica costs a retrying client nothing and the service comes back; a killed HTTP proxy is
started again by Serve and a retrying client gets every answer."""

from __future__ import annotations

import pytest

from mgh_ray import serving
from mgh_ray.benchmarks import outage

PORT = 18731  # the session's Serve HTTP port (tests/test_serving.py)


def test_the_traffic_after_a_kill_stops_once_every_client_is_answered_again():
    """The benchmark's stop after a kill (`_settled`): every client sent a request since the window began,
    and every one of those that ended succeeded."""
    def req(client: int, start: float, ok: bool = True) -> outage.Request:
        return outage.Request(client, start, start + 0.1, ok, client % 2 == 1)

    answered = [req(0, 10.0), req(1, 10.5)]
    assert outage._settled(answered, 2, since=10.0)
    assert outage._settled([req(0, 9.0, ok=False), *answered], 2, since=10.0)  # a failure before the window
    assert not outage._settled([req(0, 10.2, ok=False), *answered], 2, since=10.0)  # one inside it
    assert not outage._settled(answered[:1], 2, since=10.0)  # client 1 not answered since (still waiting)
    assert not outage._settled(answered, 2, since=10.2)  # client 0's last answer is older than the window


@pytest.mark.integration
@pytest.mark.alone  # `make test` runs it with nothing beside it
def test_a_killed_replica_or_proxy_costs_a_retrying_client_nothing(ray_cluster, minilm_dir, tmp_path):
    bench = outage.OutageConfig(clients=4, warmup_s=2, after_s=20, retry_budget_s=60,
                                scenarios=[("replica", 2), ("proxy", 2)])
    cfg = serving.ServeConfig(port=PORT, api_key_env=None, num_cpus=1, max_batch_size=4)
    table = outage.run(cfg, minilm_dir, tmp_path, bench)
    assert list(table.index) == ["replica killed, 2 replica(s)", "proxy killed, 2 replica(s)"]
    assert (table["requests"] > 0).all() and table["recovered"].all(), table
    assert table["killed process gone"].all(), table  # each kill took effect
    assert (table["failed (with retry)"] == 0).all(), table
    assert (tmp_path / "benchmark_outage.md").is_file()
