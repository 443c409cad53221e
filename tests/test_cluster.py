"""cluster.yaml against the schema the installed Ray ships; a real job submitted to a local head."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
GPU = ROOT / "jobs" / "configs" / "gpu.yaml"


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


def test_working_dir_stays_small():
    """What `ray job submit --working-dir .` uploads (minus .rayignore) is far below Ray's 100 MiB."""
    ignored = {".git", ".venv", "runs", ".pytest_cache", "__pycache__"}
    assert set(l.strip().lstrip("*/") for l in (ROOT / ".rayignore").read_text().splitlines()) >= ignored
    total = sum(p.stat().st_size for p in ROOT.rglob("*")
                if p.is_file() and not ignored & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts))
    assert total < 20 * 2**20


def submit_when_ready(client, entrypoint: str, **runtime_env) -> str:
    """Submit a job to the session's `ray_cluster`; a cluster seconds old may not have its job agent yet
    ("No available agent"): Ray says retry."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": [".git", ".venv", "runs"], **runtime_env})
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def finish_job(client, job: str) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, f"job {job} still {status}"
        time.sleep(2)
    return str(status.value), client.get_job_logs(job)


@pytest.fixture
def job_cluster(ray_cluster):
    """The module's cluster with the address file that `ray start` writes and `ray.init` does not. A job's
    supervisor looks its cluster up there; without it Ray's "auto" takes any GCS it finds on the host,
    which is another cluster's when `make test` runs the own_cluster tests beside this one. Written only
    around a job test, not by conftest for every module: a run stopped before the teardown leaves the
    file behind, and every later `ray.init()` on the host would then dial a cluster that is gone."""
    from ray._common.utils import reset_ray_address
    from ray._private.utils import write_ray_address

    write_ray_address(ray_cluster.address_info["gcs_address"])
    yield ray_cluster
    reset_ray_address()


@pytest.mark.integration
def test_job_submission_runs_a_real_job(job_cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(f"http://{job_cluster.dashboard_url}")
    run_dir = tmp_path / "run"
    job = submit_when_ready(client, f"{sys.executable} -m jobs.fetch jobs/configs/tiny.yaml run_dir={run_dir}",
                            env_vars={"MGH_RAY_CACHE": os.environ.get("MGH_RAY_CACHE",
                                                                      str(Path.home() / ".cache/mgh_ray"))})
    status, logs = finish_job(client, job)
    assert status == "SUCCEEDED", logs[-3000:]
    paths = json.loads((run_dir / "fetch" / "assets.json").read_text())
    assert Path(paths["smollm2"], "config.json").is_file() and Path(paths["table:seeds"]).is_file()


@pytest.mark.integration
def test_a_jobs_ray_workers_run_the_projects_setup_hook(job_cluster):
    """A job's driver joins the cluster through `pipeline.init_ray`, as every stage command does: the
    project's runtime env (`logs.RUNTIME_ENV`) merges with the job's own (its working_dir), and the
    job's workers run `logs.worker_setup` (which keeps Ray Data's known thread race out of the log)."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    code = ("import threading, ray; from mgh_ray import pipeline; pipeline.init_ray(pipeline.RayConfig()); "
            "hooked = ray.get(ray.remote(lambda: getattr(threading.excepthook, '_drops_known_race', False))"
            ".options(num_cpus=0).remote()); print('worker hook', hooked)")
    client = JobSubmissionClient(f"http://{job_cluster.dashboard_url}")
    status, logs = finish_job(client, submit_when_ready(client, f"{sys.executable} -c {shlex.quote(code)}"))
    assert status == "SUCCEEDED" and "worker hook True" in logs, logs[-3000:]


def test_check_cluster_command_exit_codes():
    from typer.testing import CliRunner

    from mgh_ray.cli import app

    ok = CliRunner().invoke(app, ["check-cluster", str(ROOT / "cluster.yaml"), str(GPU)])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["check-cluster", str(ROOT / "cluster.yaml"), str(GPU), "serve.num_gpus=2"])
    assert bad.exit_code == 1 and "stage serve" in bad.output and "stage evaluate" in bad.output


def test_cluster_yaml_keeps_the_jobs_api_on_loopback_and_runs_on_object_storage():
    from mgh_ray import config, pipeline

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert config.load(pipeline.PipelineConfig, GPU, []).run_dir.startswith("s3://")


def test_local_provider_config_mirrors_cluster_yaml_and_validates():
    import jsonschema
    import ray

    from mgh_ray import cluster

    local = cluster.provider_config(cluster.LocalClusterConfig())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(local, schema)
    types = local["available_node_types"]
    assert types[local["head_node_type"]]["resources"] == {"CPU": 0}  # like cluster.yaml's head
    assert set(types) - {local["head_node_type"]} == {"cpu_worker", "gpu_worker"}
    assert all(t["min_workers"] == 0 for n, t in types.items() if n != local["head_node_type"])
    assert types["gpu_worker"]["resources"][cluster.GPU_STAND_IN] == 1
    assert local["provider"]["type"] == "fake_multinode"


def test_init_ray_connects_without_local_cluster_settings(monkeypatch):
    """A submitted job's driver has RAY_ADDRESS: it connects there, never passing num_cpus (Ray refuses)."""
    from mgh_ray import pipeline

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:16379")
    assert pipeline.existing_cluster(pipeline.RayConfig(num_cpus=4)) == "127.0.0.1:16379"
    assert pipeline.existing_cluster(pipeline.RayConfig(address="local", num_cpus=4)) is None


# ---------------------------------------------------------------- real clusters (integration)

@contextlib.contextmanager
def autoscaling_cluster(tmp_path, **shape):
    """The local autoscaling cluster on ports of its own (a session `ray_cluster` may be up beside it),
    0 workers at start, short idle timeout; stopped, every process of it, even when the test fails."""
    from mgh_ray import cluster

    shape.setdefault("idle_timeout_minutes", 0.5)
    lc = cluster.LocalClusterConfig(port=6391, dashboard_port=8291, temp_dir=f"/tmp/mgr-test-{os.getpid()}",
                                    token_path=str(tmp_path / "auth_token"), **shape)
    try:
        yield cluster.up(lc)
    finally:
        cluster.down(lc)
        assert cluster._pids(Path(lc.temp_dir)) == []  # nothing left behind
        shutil.rmtree(lc.temp_dir, ignore_errors=True)


@pytest.fixture
def local_cluster(tmp_path):
    # one worker node type of 4 CPUs (the plain test cluster's size), no GPU stand-in: on 2 cores every
    # extra idle node (a raylet and its agents) slows the run; the driver still runs on the CPU-0 head
    with autoscaling_cluster(tmp_path, cpu_workers=1, cpus_per_worker=4, gpu_workers=0) as lc:
        yield lc


AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
           "AWS_EC2_METADATA_DISABLED")


def local_files() -> set[str]:
    """Files of the repo outside the venv, git and caches (the working dir of jobs on the local cluster)."""
    skip = {".venv", ".git", ".pytest_cache", "__pycache__", ".ruff_cache"}
    return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith(".pyc")}


def read_scores(run_dir: str):
    import io

    import pandas as pd

    from mgh_ray import storage

    return pd.read_csv(io.StringIO(storage.read_text(storage.join(run_dir, "evaluate", "scores.csv"))), index_col=0)


def read_table(folder: str, table: str, columns: list[str] | None = None):
    """A records folder's table (path or URI) read here with pandas: no Ray Data, so the test process
    never starts a Ray instance of its own beside the cluster under test."""
    import io

    import pandas as pd

    from mgh_ray import records, storage

    parts = [pd.read_parquet(io.BytesIO(storage.read_bytes(f)), columns=columns)
             for f in records.shard_files(folder, table)]
    if parts:
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame(columns=columns or (records.RECORD_COLS if table == "records" else records.FAILURE_COLS))


def record_ids(folder: str) -> list[str]:
    """Every row id in a synthesis folder's records and failures, repeats included."""
    return [*read_table(folder, "records", ["id"])["id"], *read_table(folder, "failures", ["id"])["id"]]


def assert_no_traceback(logs: str) -> None:
    """A green job's log holds no traceback; the failure shows the one it does hold."""
    at = logs.find("Traceback")
    assert at < 0, logs[max(0, at - 2000):at + 4000]


# tiny.yaml cut to CI size, with the default quality gate (a run whose gate keeps too few records fails
# loudly, which is what a user would see). Synthesis sends 4 rows per engine call, 2 calls at a time:
# the 16 rows finish in rounds, so a job stopped at the first shard stops mid-stage.
PIPELINE_JOB = ["synthesis.num_seeds=16", "synthesis.rows_per_shard=4", "synthesis.batch_size=4",
                "synthesis.max_concurrent_batches=2", "train.steps=4", "train.batch_size=2",
                "train.checkpoint_every=4", "train.warmup=1", "train.export=false", "train.encoder.max_length=32",
                "train.encoder.lora.top_layers=2", "evaluate.tasks=[LeeSTS]",
                "evaluate.max_rows=16", "evaluate.num_replicas=1",
                "serve.port=18791"]  # a Serve port of its own: the session's `ray_cluster` may hold the default
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@pytest.mark.integration
@pytest.mark.own_cluster  # `make test` runs it beside the others: its cluster has its own ports and temp dir
# more than `make test`'s 20 minutes: it takes 13-15 (786-885 s, an Intel CPU with bf16 arithmetic and an
# AVX2-only AMD one, float32 throughout there); each job still has its own 20-minute deadline below
@pytest.mark.timeout(1800)
def test_pipeline_jobs_on_the_local_autoscaling_cluster_resume_reuse_and_ablate(local_cluster, tmp_path,
                                                                                 s3_bucket):
    """The user's path, end to end: `ray start --head` with token auth and the autoscaler (an
    unauthenticated submission is refused), the micro pipeline submitted as a job with run_dir on the
    loopback S3 server (tiny.yaml's ray.num_cpus must not reach ray.init; the driver may load no model).

    1. stopped mid-synthesis (`ray job stop`: the driver and its engine die), then submitted again: it
       resumes, every seed row written once, the earlier shards untouched, the default gate, a table;
    2. the same job again reuses every stage; a changed training config is refused, stage named;
    3. the ablation job trains its arms on the same records (the bidirectional one after MNTP);
    worker nodes start from zero for the work and go away after the idle timeout."""
    import urllib.error
    import urllib.request

    from ray.job_submission import JobSubmissionClient

    from mgh_ray import cluster, prompts, records, storage, synthesis
    from mgh_ray.layout import RunLayout

    url = local_cluster.dashboard_url
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", method="POST", data=b"{}",
                                                      headers={"Content-Type": "application/json"}), timeout=30)
    assert refused.value.code == 401
    assert [n for n in cluster.nodes(url, local_cluster.headers()) if not n["head"]] == []  # 0 workers
    # the documented way (docs/cluster.md): `ray job submit` with RAY_AUTH_MODE=token and the token file; its driver's
    # ray.init (RAY_ADDRESS from Ray) connects with the token the cluster's processes have
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ADDRESS=url,
               RAY_AUTH_TOKEN_PATH=str(tmp_path / "auth_token"))
    cli = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--", sys.executable, "-c",
                          "import ray; ray.init(); print('connected', ray.cluster_resources().get('CPU', 0))"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "connected" in cli.stdout, cli.stdout[-2000:] + cli.stderr[-2000:]

    run_dir = f"s3://{s3_bucket}/run"
    run = RunLayout(run_dir)
    client = JobSubmissionClient(url, headers=local_cluster.headers())
    most = [0]

    def submit(module: str, *overrides: str) -> str:
        return client.submit_job(
            # docs/cluster.md's command as written: `python`, which the cluster resolves to the venv's interpreter
            entrypoint=" ".join(["python", "-m", module, "jobs/configs/tiny.yaml", f"run_dir={run_dir}",
                                 *PIPELINE_JOB, *overrides]),
            runtime_env={"working_dir": cluster.local_working_dir(ROOT),
                         "env_vars": {"MGH_RAY_CACHE": os.environ.get("MGH_RAY_CACHE",
                                                                      str(Path.home() / ".cache/mgh_ray")),
                                      **{k: os.environ[k] for k in AWS_ENV if k in os.environ}}})

    def finish(job: str, until=lambda: False) -> tuple[str, str]:
        """Wait for the job's end (or `until()`); returns (status, logs). Counts worker nodes meanwhile."""
        start = time.time()
        deadline = start + 1200
        while (status := str(client.get_job_status(job).value)) not in TERMINAL and not until():
            assert time.time() < deadline, f"job {job} still {status}"
            most[0] = max(most[0], sum(n["alive"] and not n["head"] for n in cluster.nodes(url, local_cluster.headers())))
            time.sleep(1)
        logs = client.get_job_logs(job)
        log.info("job %s: %s after %.0f s (%d worker nodes at most so far); %s", job, status,
                 time.time() - start, most[0], "; ".join(re.findall(r"stage \S+: finished in \d+ s", logs)))
        return status, logs

    before_files = local_files()  # jobs run in the repo (local://): a path written by mistake lands here
    # 1. stopped once the first shard of synthesized rows is in the bucket, then resumed by a new job
    job = submit("jobs.pipeline")
    status, logs = finish(job, until=lambda: bool(records.shard_files(run.synthesize)))
    assert status not in TERMINAL, f"the job ended ({status}) before synthesis wrote a shard: {logs[-4000:]}"
    client.stop_job(job)
    status, logs = finish(job)
    first = record_ids(run.synthesize)
    shards = {f: storage.read_bytes(f) for t in ("records", "failures") for f in records.shard_files(run.synthesize, t)}
    assert status == "STOPPED" and not storage.is_file(RunLayout.success(run.synthesize)), logs[-4000:]
    assert 1 <= len(first) < 16, f"{len(first)} rows before the stop"

    status, logs = finish(submit("jobs.pipeline"))
    assert status == "SUCCEEDED", logs[-4000:]
    assert "num_cpus and num_gpus must not be provided" not in logs
    assert "Reporting training result" not in logs  # Ray Train's line per step per worker (logs.py)
    assert "stage fetch: done earlier" in logs and "stage synthesize: running into" in logs
    # one host: one HTTP proxy (a proxy per node bound the same port twice and failed the deploy)
    assert "one HTTP proxy, on the head (HeadOnly)" in logs
    # a green job prints no traceback: Ray Train's PlacementGroupCleaner printed one per training run
    # while the cluster's processes had no RAY_ADDRESS (cluster.up)
    assert_no_traceback(logs)
    ids = record_ids(run.synthesize)
    assert len(ids) == len(set(ids)) == 16 and set(first) <= set(ids)  # no duplicate, no gap
    assert all(storage.read_bytes(f) == data for f, data in shards.items())  # earlier shards untouched
    report = json.loads(storage.read_text(storage.join(run.synthesize, "report.json")))
    assert report["seeds"] == 16 and report["missing"] == 0 and report["this_run"]["rows"] == 16 - len(first)
    # 16 real seeds: a parser or prompt regression shows as failed rows (32-seed runs write 31 of 32)
    assert report["written"] + report["failed"] == 16 and report["written"] >= 11, report["failed_by_reason"]
    recs = read_table(run.synthesize, "records")
    for rec in recs.itertuples():  # what each record says of itself
        assert all(isinstance(getattr(rec, f"gen_{k}"), str) and getattr(rec, f"gen_{k}") for k in range(1, 5))
        assert rec.model == "smollm2" and rec.attempts >= 1 and json.loads(rec.sampling)["max_tokens"] == 320
        assert rec.prompt_version == prompts.DEFAULT_VERSION and rec.instruction == synthesis.DEFAULT_INSTRUCTION
    failed = read_table(run.synthesize, "failures")
    assert (failed["attempts"] == 3).all() and failed["raw_output"].map(bool).all()  # 2 retries, raw output kept
    scores = read_scores(run_dir)
    assert list(scores.index) == ["LeeSTS", "mean"]
    assert {"base", "trained"} <= set(scores.columns) and scores.notna().all().all()
    # every stage's output is in the bucket, nothing of the run on local disk outside the caches
    for stage in ("fetch", "synthesize", "train", "serve", "evaluate", "base"):
        assert storage.is_file(RunLayout.success(getattr(run, stage))), stage
        assert stage == "base" or storage.is_file(RunLayout.config(getattr(run, stage))), stage
    assert storage.is_file(storage.join(run.model, storage.MANIFEST))
    assert storage.list_files(storage.join(run.train, "train"), recursive=True)  # Ray Train's checkpoints
    assert all(storage.is_file(storage.join(run.evaluate, f)) for f in ("report.md", "scores.png"))
    assert json.loads(storage.read_text(storage.join(run.serve, "serve.json")))["parity_min_cosine"] >= 0.9999

    # 2. the same job again reuses every stage and gives the same table; another train config is refused
    status, logs = finish(submit("jobs.pipeline"))
    assert status == "SUCCEEDED" and "running into" not in logs, logs[-4000:]
    assert all(f"stage {s}: done earlier" in logs for s in ("fetch", "synthesize", "train", "serve", "evaluate"))
    assert read_scores(run_dir).equals(scores)
    status, logs = finish(submit("jobs.pipeline", "train.steps=5"))
    assert status == "FAILED" and "StaleStageError" in logs and "stage 'train'" in logs, logs[-4000:]

    # 3. the ablation runner, CI size, on the pipeline's records: the pooling study crosses the causal
    # backbone with the bidirectional one (after its MNTP adaptation stage); the pooling arm "causal-ata"
    # is the schedule study's "curriculum" (the run's own attention and pooling), so both studies share
    # that model and its untrained row, trained and scored once. One training worker: the pipeline above
    # ran DDP, and a one-worker group starts faster on 2 cores. Which arm maps to which training settings
    # (reference_levels and the other schedules included) is checked without Ray in test_pipeline.py, the
    # relabelled records that reference_levels trains on in test_records.py
    status, logs = finish(submit("jobs.ablate", "ablation.schedules=[curriculum]", "ablation.poolings=[ata]",
                                 "ablation.attentions=[causal,bidirectional]", "train.num_workers=1",
                                 "adapt.steps=4", "adapt.checkpoint_every=2", "ablation.steps=4",
                                 "ablation.tasks=[LeeSTS]", "evaluate.bootstrap=200"))
    assert status == "SUCCEEDED" and "stage synthesize: done earlier" in logs, logs[-4000:]
    assert_no_traceback(logs)  # MNTP and the arms train too
    assert "stage adapt: running" in logs and "stage pooling:bidirectional-ata-s0: running" in logs, logs[-4000:]
    assert "ablation: evaluating in float32" in logs  # evaluate.precision unset: the arms' scores in float32
    assert "schedule:curriculum-s0 trains exactly like" in logs and "stage schedule:curriculum" not in logs, \
        logs[-4000:]
    adapted = yaml.safe_load(storage.read_text(storage.join(run.adapter, "adapted.yaml")))
    assert adapted["attention"] == "bidirectional" and storage.is_file(storage.join(run.adapt, "report.md"))
    arm = run.arm("pooling", "bidirectional-ata-s0")
    bidir = yaml.safe_load(storage.read_text(storage.join(arm, "model", "encoder.yaml")))
    assert bidir["attention"] == "bidirectional" and bidir["base_adapter"] == "base_adapter"
    assert storage.is_file(RunLayout.success(arm))
    assert not storage.exists(storage.join(arm, "export"))  # arms are only evaluated
    tables = {s: pd.read_csv(io.StringIO(storage.read_text(storage.join(run.ablation, f"{s}.csv"))), index_col=0)
              for s in ("schedule", "pooling")}
    assert tables["pooling"].loc["causal-ata", "LeeSTS"] == tables["schedule"].loc["curriculum", "LeeSTS"]
    assert tables["pooling"].loc["untrained-causal-ata", "LeeSTS"] == tables["schedule"].loc["untrained", "LeeSTS"]
    assert tables["pooling"].loc["untrained-bidirectional-ata", "LeeSTS"] != \
        tables["pooling"].loc["untrained-causal-ata", "LeeSTS"]
    # where ATA's weight goes, per arm; how well the levels order, per schedule arm
    assert tables["pooling"][["ata weight: position_0", "ata weight: instruction", "ata weight: text"]].sum(
        axis=1).round(6).eq(1.0).all()
    assert 0 <= tables["schedule"].loc["curriculum", "level order"] <= 1
    ivs = pd.read_csv(io.StringIO(storage.read_text(storage.join(run.ablation, "pooling_intervals.csv"))))
    assert ((ivs.low <= ivs.point) & (ivs.point <= ivs.high)).all() and set(ivs.row) == {"LeeSTS", "mean"}
    assert all(storage.is_file(storage.join(run.ablation, f)) for f in ("schedule.md", "schedule.png"))
    schedule_md = storage.read_text(storage.join(run.ablation, "schedule.md"))
    assert "curriculum" in schedule_md and "untrained" in schedule_md
    assert local_files() == before_files

    launched = [n for n in cluster.nodes(url, local_cluster.headers()) if not n["head"]]
    assert most[0] >= 1 and {n["kind"] for n in launched} == {"cpu_worker"}  # started from zero for the work
    last_job = time.time()
    while any(n["alive"] for n in cluster.nodes(url, local_cluster.headers()) if not n["head"]):
        # idle timeout 30 s, then the autoscaler's next pass
        assert time.time() < last_job + 180, "idle worker nodes were not removed"
        time.sleep(3)
    log.info("idle worker nodes gone %.0f s after the last job", time.time() - last_job)


def serve_replicas(lc, app: str) -> int:
    """RUNNING replicas of a Serve app, from the dashboard's Serve API (no ray.init here)."""
    import urllib.request

    req = urllib.request.Request(f"{lc.dashboard_url}/api/serve/applications/", headers=lc.headers())
    with urllib.request.urlopen(req, timeout=20) as resp:
        apps = json.load(resp).get("applications") or {}
    deployments = (apps.get(app) or {}).get("deployments") or {}
    return sum(r.get("state") == "RUNNING" for d in deployments.values() for r in d.get("replicas") or [])


@pytest.mark.integration
@pytest.mark.own_cluster
def test_serve_autoscaling_adds_nodes_under_load_and_gives_them_back(tmp_path, minilm_path):
    """`mgh-ray serve` submitted as a job to the local autoscaling cluster with serve.autoscaling: a
    bounded load (at most 2000 requests or 120 s, loopback) raises the replica count, the autoscaler
    starts a node for the replicas (2 CPUs each: one per node), and after the load stops the extra
    replicas go away, then their nodes."""
    import threading

    from ray.job_submission import JobStatus, JobSubmissionClient

    from mgh_ray import cluster, serving
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    model = tmp_path / "minilm"
    Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean"))).save(model)
    app, port = "autoscale", 18792
    # replica nodes hold no Ray Data work (whose footer readers an early removal can hit): a short idle timeout
    with autoscaling_cluster(tmp_path, cpu_workers=3, gpu_workers=0, idle_timeout_minutes=0.25) as lc:
        client = JobSubmissionClient(lc.dashboard_url, headers=lc.headers())
        overrides = [f"run_dir={tmp_path / 'run'}", f"serve.app_name={app}", f"serve.port={port}",
                     "serve.num_cpus=2", "serve.max_batch_size=4",
                     "serve.max_ongoing_requests=4",
                     "serve.autoscaling={min_replicas: 1, max_replicas: 3, target_ongoing_requests: 1, "
                     "upscale_delay_s: 0, downscale_delay_s: 2, look_back_period_s: 5}"]
        job = client.submit_job(
            entrypoint=" ".join(["python", "-m", "jobs.serve", "jobs/configs/tiny.yaml", "--model", str(model),
                                 *(f"'{o}'" for o in overrides)]),
            runtime_env={"working_dir": cluster.local_working_dir(ROOT),
                         "env_vars": {"MGH_RAY_CACHE": os.environ.get("MGH_RAY_CACHE",
                                                                      str(Path.home() / ".cache/mgh_ray"))}})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while "serving at" not in client.get_job_logs(job):  # deployed, parity checked
                status = client.get_job_status(job)
                assert status not in {JobStatus.FAILED, JobStatus.STOPPED}, client.get_job_logs(job)[-4000:]
                assert time.time() < deadline, client.get_job_logs(job)[-4000:]
                time.sleep(2)
            assert "one HTTP proxy, on the head (HeadOnly)" in client.get_job_logs(job)  # serve.proxy_location unset

            def workers() -> int:
                return sum(n["alive"] and not n["head"] for n in cluster.nodes(lc.dashboard_url, lc.headers()))

            assert serve_replicas(lc, app) == 1
            before = workers()
            stop, sent, lock = threading.Event(), [0], threading.Lock()

            def load() -> None:
                with serving.EmbeddingClient(url) as http:
                    while not stop.is_set():
                        with lock:
                            if sent[0] >= 2000:
                                return
                            sent[0] += 1
                        http.embed(["a sentence long enough to keep a replica busy for a moment " * 4] * 4)

            threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
            for t in threads:
                t.start()
            deadline, peak, peak_nodes = time.time() + 120, 1, before
            while time.time() < deadline and (peak < 2 or peak_nodes <= before) and any(t.is_alive() for t in threads):
                peak, peak_nodes = max(peak, serve_replicas(lc, app)), max(peak_nodes, workers())
                time.sleep(1)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            assert peak >= 2, f"no scale-up after {sent[0]} requests"
            assert peak_nodes > before, f"replicas went to {peak} without a new node ({before} before)"
            deadline = time.time() + 240  # replicas: downscale delay 2 s; nodes: idle timeout 15 s
            while serve_replicas(lc, app) > 1 or workers() >= peak_nodes:
                assert time.time() < deadline, f"{serve_replicas(lc, app)} replicas, {workers()} worker nodes"
                time.sleep(3)
        finally:
            client.stop_job(job)
            deadline = time.time() + 60
            while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                assert time.time() < deadline
                time.sleep(1)


@pytest.mark.integration
def test_placement_check_against_the_live_cluster(ray_cluster):
    """On a running cluster without an autoscaler its nodes are the node types: train.num_workers=8 on 4
    CPUs is refused up front (it used to retry the worker group for minutes)."""
    from mgh_ray import config, pipeline, placement

    types, max_workers = placement.live_node_types()
    assert sum(t.resources.get("CPU", 0) for t in types) == 4 and max_workers == 0
    assert placement.check_placement(config.load(pipeline.PipelineConfig, TINY, []), types, max_workers) == []
    cfg = config.load(pipeline.PipelineConfig, TINY, ["train.num_workers=8"])
    assert [p.stage for p in placement.check_placement(cfg, types, max_workers)] == ["train"]


@pytest.mark.integration
def test_a_stage_command_refuses_what_the_cluster_can_never_place(tmp_path):
    """`mgh-ray train ... train.num_workers=8` on a new 4-CPU local cluster used to retry the worker
    group every 60 s forever; now the command's own stage is checked before anything starts."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = str(Path(sys.executable).parent / "mgh-ray")
    proc = subprocess.run([cli, "train", str(TINY), "train.num_workers=8", f"run_dir={tmp_path / 'run'}",
                           "ray.address=local", "ray.include_dashboard=false"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "does not fit the cluster" in proc.stderr and "8 x {CPU: 1} for train workers" in proc.stderr
    assert not (tmp_path / "run" / "train").exists()  # refused before the stage started
