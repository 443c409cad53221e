"""`mgh-ray serve` stops within seconds of SIGTERM or Ctrl-C (SIGINT) and leaves no process it started.

Each case starts the real command on its own new local Ray cluster (loopback, its own Serve port),
waits until it serves, signals it, and checks its exit and every process it had spawned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.alone  # it times the stop: `make test` runs it with nothing beside it
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_on_signal_and_leaves_nothing(tmp_path, minilm_path, sig):
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    model = Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean"))).save(
        tmp_path / "minilm")
    port = 18741
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "mgh_ray.cli", "serve", str(ROOT / "jobs/configs/tiny.yaml"), "--model", str(model),
           f"run_dir={tmp_path / 'run'}", "ray.address=local", "ray.num_cpus=2", "ray.include_dashboard=false",
           f"serve.port={port}", "serve.app_name=shutdown-test"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        spawned = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in spawned if p.is_running())
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        took = time.monotonic() - t0
        out = proc.stdout.read()
        assert took < 20, f"took {took:.1f} s to stop\n{out[-3000:]}"  # was ~40 s after Ctrl-C
        assert "stopped in" in out  # the clean-up ran (not a kill)
        gone, alive = psutil.wait_procs(spawned, timeout=15)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name()) for p in alive]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
