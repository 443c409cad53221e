"""cluster.yaml against the schema the installed Ray ships; a real job submitted to a local head."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # Ray's own checks on top of the schema
    types = cfg["available_node_types"]
    assert types["gpu_worker"]["min_workers"] == 0  # GPUs scale from zero
    assert cfg["idle_timeout_minutes"] > 0


def test_cluster_yaml_schema_check_can_fail():
    import jsonschema
    import ray

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


def test_working_dir_stays_small():
    """What `ray job submit --working-dir .` uploads (minus .rayignore) is far below Ray's 100 MiB."""
    ignored = {".git", ".venv", "runs", ".pytest_cache", "__pycache__"}
    assert set(l.strip().lstrip("*/") for l in (ROOT / ".rayignore").read_text().splitlines()) >= ignored
    total = sum(p.stat().st_size for p in ROOT.rglob("*")
                if p.is_file() and not ignored & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts))
    assert total < 20 * 2**20


@pytest.mark.integration
def test_job_submission_runs_a_real_job(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(f"http://{ray_cluster.dashboard_url}")
    run_dir = tmp_path / "run"
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m jobs.fetch jobs/configs/tiny.yaml run_dir={run_dir}",
        runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "runs"],
                     "env_vars": {"MGH_RAY_CACHE": os.environ.get("MGH_RAY_CACHE", str(Path.home() / ".cache/mgh_ray"))}},
    )
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status}"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    paths = json.loads((run_dir / "fetch" / "assets.json").read_text())
    assert Path(paths["smollm2"], "config.json").is_file() and Path(paths["table:seeds"]).is_file()
