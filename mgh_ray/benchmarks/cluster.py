"""Cluster benchmark: the tiny pipeline as a job on the local autoscaling cluster vs on plain local Ray.

Both runs use the same config (tiny.yaml cut to CI size by `MICRO`, plus any overrides) in one
invocation. Plain: `python -m jobs.pipeline` in a subprocess that starts its own local Ray
(`ray.address=local`, tiny.yaml's 4 logical CPUs), timed from process start to exit. Autoscaling:
`mgh-ray cluster up --local` shape (a `CPU: 0` head, CPU workers from zero), the same command
submitted through the Jobs API, timed from submission to SUCCEEDED. For every stage the table gives
when it started (seconds after submission, from the job's log) and how long after its start the
first worker node came up (0 when one was already up, from the cluster's State API); the last rows
give the two wall times and their ratio (autoscaling / plain).

    mgh-ray benchmark jobs/configs/tiny.yaml --stage cluster
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from mgh_ray import cluster
from mgh_ray.benchmarks import save

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# tiny.yaml cut to CI size (the sizes of tests/test_pipeline.py::micro, one evaluation task)
MICRO = ["synthesis.num_seeds=12", "synthesis.rows_per_shard=4", "synthesis.quality.policy=keep",
         "train.steps=4", "train.batch_size=2", "train.checkpoint_every=4", "train.warmup=1", "train.export=false",
         "train.encoder.max_length=32", "train.encoder.lora.top_layers=2", "evaluate.tasks=[LeeSTS]",
         "evaluate.max_rows=16", "evaluate.num_replicas=1"]
STAGE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) \w+ mgh_ray\.pipeline: stage (\w+): running into", re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("MGH_RAY_CACHE", str(Path.home() / ".cache" / "mgh_ray"))
    return env


def run_plain(config_path: str, overrides: list[str], run_dir: str, timeout_s: float = 1800) -> float:
    """Wall seconds of the pipeline in a process that starts its own local Ray."""
    cmd = [sys.executable, "-m", "jobs.pipeline", str(config_path), f"run_dir={run_dir}", "ray.address=local",
           *overrides]
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"plain-Ray pipeline failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return time.time() - start


def run_on_cluster(lc: cluster.LocalClusterConfig, config_path: str, overrides: list[str], run_dir: str,
                   timeout_s: float = 1800) -> dict:
    """Submit the pipeline to a fresh local autoscaling cluster; its timeline. Stops the cluster."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    c = cluster.up(lc)
    try:
        client = JobSubmissionClient(c.dashboard_url, headers=c.headers())
        submitted = time.time()
        job = client.submit_job(
            entrypoint=" ".join([sys.executable, "-m", "jobs.pipeline", str(config_path), f"run_dir={run_dir}",
                                 *overrides]),
            runtime_env={"working_dir": cluster.local_working_dir(ROOT),
                         "env_vars": {"MGH_RAY_CACHE": _env()["MGH_RAY_CACHE"]}})
        while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
            if time.time() - submitted > timeout_s:
                client.stop_job(job)
                raise TimeoutError(f"job {job} still {status} after {timeout_s:.0f} s")
            time.sleep(1)
        wall = time.time() - submitted
        logs = client.get_job_logs(job)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job} {status}:\n{logs[-3000:]}")
        nodes = [n for n in cluster.nodes(c.dashboard_url, c.headers()) if not n["head"]]
    finally:
        cluster.down(lc)
        shutil.rmtree(lc.temp_dir, ignore_errors=True)
    day = dt.datetime.fromtimestamp(submitted).date()
    stages = {}
    for hms, name in STAGE_LINE.findall(logs):
        at = dt.datetime.combine(day, dt.time.fromisoformat(hms)).timestamp()
        stages.setdefault(name, at)
    return {"submitted": submitted, "wall_s": wall, "stages": stages, "nodes": nodes}


def stage_rows(timeline: dict) -> list[dict]:
    """Per stage: start after submission, and the wait from its start to the first worker node up."""
    rows, t0, nodes = [], timeline["submitted"], timeline["nodes"]
    for name, start in timeline["stages"].items():
        # log times have whole seconds: a node that came up within that second counts as already up
        up_before = [n for n in nodes if n["start_s"] <= start + 1 and (n["end_s"] is None or n["end_s"] > start)]
        after = sorted(n["start_s"] for n in nodes if n["start_s"] > start + 1)
        wait = 0.0 if up_before else (after[0] - start if after else float("nan"))
        rows.append({"stage": name, "start_after_submit_s": start - t0, "first_node_up_after_stage_start_s": wait,
                     "worker_nodes_launched_so_far": sum(n["start_s"] <= start + 1 + max(wait, 0) for n in nodes)})
    return rows


def run(config_path: str | Path, overrides: list[str], out_dir: Path,
        lc: cluster.LocalClusterConfig | None = None) -> pd.DataFrame:
    """Both runs, the table (printed by the CLI, saved as benchmark_cluster.md/.json in out_dir)."""
    lc = lc or cluster.LocalClusterConfig(port=6393, dashboard_port=8293, temp_dir="/tmp/mgr-bench",
                                          idle_timeout_minutes=0.5)
    overrides = [*MICRO, *overrides]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mgh-bench-") as tmp:
        lc = lc.model_copy(update={"token_path": lc.token_path or f"{tmp}/auth_token"})
        timeline = run_on_cluster(lc, str(config_path), overrides, f"{tmp}/autoscaling")
        plain = run_plain(str(config_path), overrides, f"{tmp}/plain")
    rows = stage_rows(timeline)
    rows.append({"stage": "pipeline wall, autoscaling cluster (s)", "start_after_submit_s": timeline["wall_s"]})
    rows.append({"stage": "pipeline wall, plain local Ray (s)", "start_after_submit_s": plain})
    rows.append({"stage": "ratio autoscaling / plain", "start_after_submit_s": timeline["wall_s"] / plain})
    table = pd.DataFrame(rows)
    shape = (f"local cluster: head CPU: 0; cpu_worker max {lc.cpu_workers} x {lc.cpus_per_worker} CPU; gpu_worker "
             f"stand-in max {lc.gpu_workers}; idle_timeout_minutes {lc.idle_timeout_minutes}; plain: one local "
             f"Ray with tiny.yaml's ray.num_cpus; overrides {overrides}")
    md = table.to_markdown(index=False, floatfmt=".1f")
    save(out_dir, "cluster", f"# Cluster benchmark\n\n{md}\n\n{shape}\n",
         {"rows": rows, "shape": shape, "nodes": timeline["nodes"]})
    return table
