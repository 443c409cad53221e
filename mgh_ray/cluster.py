"""The local autoscaling cluster on this machine (the check that a config fits a cluster: placement.py).

The local cluster is Ray's own autoscaler driving its fake multi-node provider (the one Ray's
autoscaler tests use): a head with `CPU: 0` and worker node types with `min_workers: 0`, started and
stopped as processes on this machine, shaped like cluster.yaml (CPU workers, and GPU workers stood in
for by a custom resource since there is no GPU here). Ray 2.60's wheel lacks the example.yaml that
`ray.cluster_utils.AutoscalingCluster` reads, so the provider config is written here.

    mgh-ray cluster up --local        # head on 127.0.0.1:6379, dashboard and Jobs API on 127.0.0.1:8265
    mgh-ray cluster down
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from mgh_ray.config import Section
from mgh_ray.serving.config import apply_cluster_env

log = logging.getLogger(__name__)

GPU_STAND_IN = "gpu_stand_in"  # the custom resource of the local cluster's GPU-worker stand-ins
CONFIG_ENV = "MGH_RAY_AUTOSCALING_CONFIG"  # set for every process of a local cluster: its node types
BOOTSTRAP_CONFIG = Path.home() / "ray_bootstrap_config.yaml"  # where `ray up` leaves it on the head


class LocalClusterConfig(Section):
    """Shape of the local autoscaling cluster (cluster.yaml's node types, scaled to one machine)."""

    # GCS port the fake worker nodes dial; another cluster on this machine needs other ports (outside
    # Ray's worker port range 10002-19999). port + 1 is its Ray Client port, dashboard_port + 1 its agent's.
    port: int = Field(6379, ge=1, le=65534, strict=True)
    dashboard_port: int = Field(8265, ge=1, le=65534, strict=True)  # dashboard and Jobs API (loopback)
    temp_dir: str = "/tmp/mgh-ray"  # short: Ray's unix socket paths live under it
    cpu_workers: int = Field(2, ge=0, strict=True)  # max_workers of cpu_worker
    cpus_per_worker: int = Field(2, ge=1, strict=True)
    gpu_workers: int = Field(1, ge=0, strict=True)  # max_workers of gpu_worker (stand-ins)
    cpus_per_gpu_worker: int = Field(1, ge=0, strict=True)
    # An idle worker node goes away after this. Not much shorter: a node removed while Ray Data spreads
    # an actor onto it fails that read (the pipeline reruns such a stage, see ray.node_loss_retries).
    idle_timeout_minutes: float = Field(1.0, gt=0)
    auth: Literal["token", "disabled"] = "token"  # token: every client needs the token (RAY_AUTH_MODE)
    token_path: str | None = None  # None: Ray's default ~/.ray/auth_token (generated if missing)


@dataclass
class LocalCluster:
    """A running local cluster: where to reach it and how to authenticate."""

    address: str  # GCS address, for ray.init
    dashboard_url: str  # for JobSubmissionClient / `ray job submit --address`
    temp_dir: str
    config_path: str
    token: str | None  # bearer token of the Jobs API (None: auth disabled)

    def headers(self) -> dict[str, str]:
        """HTTP headers for the Jobs API (JobSubmissionClient(..., headers=...))."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def provider_config(lc: LocalClusterConfig) -> dict[str, Any]:
    """The autoscaler config of the fake multi-node provider, node types mirroring cluster.yaml."""
    workers: dict[str, Any] = {}
    if lc.cpu_workers:
        workers["cpu_worker"] = {"resources": {"CPU": lc.cpus_per_worker}, "node_config": {},
                                 "min_workers": 0, "max_workers": lc.cpu_workers}
    if lc.gpu_workers:
        workers["gpu_worker"] = {"resources": {"CPU": lc.cpus_per_gpu_worker, GPU_STAND_IN: 1},
                                 "node_config": {}, "min_workers": 0, "max_workers": lc.gpu_workers}
    return {
        "cluster_name": "mgh-ray-local",
        "max_workers": lc.cpu_workers + lc.gpu_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": lc.idle_timeout_minutes,
        # the worker nodes dial gcs_address (without it: port 6379 on this host, whatever `port` is)
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{lc.port}"},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {},
                                                      "max_workers": 0}, **workers},
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def local_working_dir(repo: str | Path) -> str:
    """The `working_dir` of a job on the local cluster: the repo in place (`local://`), not uploaded.

    Every node of the local cluster shares one session folder, and each node's runtime-env agent
    unpacks an uploaded working_dir there with overwrite: the first task on a new worker node deletes
    and re-creates the folder the driver runs in ("FileNotFoundError" from os.getcwd, seen in the
    serve stage). On a real cluster each node has its own disk and the upload is right."""
    return f"local://{Path(repo).resolve()}"


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _token(lc: LocalClusterConfig, env: dict[str, str]) -> str | None:
    """The token clients must send; made if missing (Ray's `ray get-auth-token --generate` for the default
    path, which is the only one it writes)."""
    if lc.auth == "disabled":
        return None
    if lc.token_path is None:
        subprocess.run([_ray_cli(), "get-auth-token", "--generate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return (Path.home() / ".ray" / "auth_token").read_text().strip()
    path = Path(lc.token_path).expanduser()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def up(lc: LocalClusterConfig | None = None) -> LocalCluster:
    """Start the head (CPU: 0) with Ray's autoscaler on the fake provider; workers come on demand."""
    lc = lc or LocalClusterConfig()
    temp = Path(lc.temp_dir)
    if _pids(temp):
        raise RuntimeError(f"a local cluster already runs in {temp}: `mgh-ray cluster down` first "
                           "(or give it another temp_dir and ports)")
    temp.mkdir(parents=True, exist_ok=True)
    config_path = temp / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(provider_config(lc), sort_keys=False))
    env = apply_cluster_env(dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                                 RAY_AUTH_MODE=lc.auth))
    env[CONFIG_ENV] = str(config_path)
    # job drivers, workers and the worker nodes the autoscaler starts inherit this environment: `python`
    # in a `ray job submit` entrypoint is this interpreter (the venv's), however the CLI was called
    venv = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv, *(p for p in env.get("PATH", "").split(os.pathsep) if p != venv)])
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    if lc.token_path:
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(lc.token_path).expanduser())
    # every process of the cluster (Ray's own actors included) finds it by this address: without it, what
    # calls Ray's state API with no address (Ray Train's PlacementGroupCleaner) scans the host's processes,
    # finds the head's GCS under this host's IP and the worker nodes' under 127.0.0.1, refuses with
    # "Found multiple active Ray instances", and its monitor thread dies with a traceback in the job's log
    env["RAY_ADDRESS"] = f"127.0.0.1:{lc.port}"
    token = _token(lc, env)
    cmd = [_ray_cli(), "start", "--head", f"--port={lc.port}", "--num-cpus=0", f"--temp-dir={temp}",
           f"--autoscaling-config={config_path}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={lc.dashboard_port}", f"--dashboard-agent-listen-port={lc.dashboard_port + 1}",
           f"--ray-client-server-port={lc.port + 1}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        down(lc)
        raise RuntimeError(f"`ray start --head` failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    cluster = LocalCluster(address=f"127.0.0.1:{lc.port}", dashboard_url=f"http://127.0.0.1:{lc.dashboard_port}",
                           temp_dir=str(temp), config_path=str(config_path), token=token)
    log.info("local autoscaling cluster up: GCS %s, Jobs API %s, auth %s", cluster.address,
             cluster.dashboard_url, lc.auth)
    return cluster


def _pids(temp_dir: Path) -> list[int]:
    """Processes of the cluster in `temp_dir` and their descendants: every Ray process has its temp or
    session dir on its command line (the dashboard's forked modules are its children), so this never
    touches another cluster (`ray stop` would stop all of them)."""
    needle = str(temp_dir.resolve())
    own = os.getpid()
    found: set[int] = set()
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == own:
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ppid = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(proc.name))
        if any(arg == needle or needle + "/" in arg or arg.endswith("=" + needle) for arg in args):
            found.add(int(proc.name))
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != own:
                found.add(child)
                todo.append(child)
    return sorted(found)


def down(lc: LocalClusterConfig | None = None, timeout_s: float = 5.0) -> int:
    """Stop every process of the local cluster (SIGTERM, then SIGKILL after `timeout_s`); returns how
    many there were. 5 s, not `ray stop`'s 16: the workers, raylets and agents are gone within 10 s of
    SIGTERM, but the GCS server and the autoscaler's monitor were still up after 10 (every `down` took
    the whole 20 s it then waited), and this cluster keeps no state that a kill could lose (its GCS is
    in memory; runs write to run_dir, whose stages resume)."""
    lc = lc or LocalClusterConfig()
    temp = Path(lc.temp_dir)
    pids = _pids(temp)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout_s
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.2)
    log.info("local cluster in %s: stopped %d processes", temp, len(pids))
    return len(pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def nodes(dashboard_url: str, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every node the cluster has had (dead ones too), from its State API; no ray.init needed.

    Each: node_id, alive, head, kind (head / cpu_worker / gpu_worker), start_s and end_s (epoch s)."""
    import urllib.request

    req = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=true", headers=headers or {})
    with urllib.request.urlopen(req, timeout=20) as resp:
        rows = json.load(resp)["data"]["result"]["result"]
    out = []
    for row in rows:
        res = row.get("resources_total") or {}
        kind = "head" if row.get("is_head_node") else "gpu_worker" if GPU_STAND_IN in res else "cpu_worker"
        out.append({"node_id": row["node_id"], "alive": row.get("state") == "ALIVE", "head": kind == "head",
                    "kind": kind, "start_s": (row.get("start_time_ms") or 0) / 1000,
                    "end_s": (row.get("end_time_ms") or 0) / 1000 or None})
    return out
