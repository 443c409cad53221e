"""Distributed evaluation: mteb tasks as Ray tasks, encode batches over 2 real Serve replicas, scores equal
to in-process evaluation, mteb's result folders, reruns that skip finished work, and the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mgh_ray import evaluation, mteb_adapters, report, serving, tasks
from mgh_ray.tasks import DATA_VERSION

PORT = 18731  # the same Serve HTTP port as tests/test_serving.py (one Serve per Ray session)
TASKS = ["LeeSTS", "BBCHeadlineRetrieval"]


@pytest.fixture(scope="module")
def minilm_encoder(minilm_path):
    from mgh_ray.encoder import Encoder, EncoderConfig
    from mgh_ray.pooling import PoolingConfig

    return Encoder.from_config(EncoderConfig(backbone="minilm", pooling=PoolingConfig(mode="mean")))


def test_config_and_adapter_contracts():
    cfg = evaluation.EvalConfig()
    assert cfg.num_replicas == 2 and cfg.max_rows and cfg.tasks == list(tasks.NAMES)
    with pytest.raises(ValueError, match="exactly one"):
        mteb_adapters.ServedEncoder("m", "r", 8)
    with pytest.raises(ValueError, match="exactly one"):
        mteb_adapters.ServedEncoder("m", "r", 8, app="a", url="http://127.0.0.1:1")


def test_scores_table_adds_the_mean_row():
    class Result:
        def __init__(self, score):
            self.score = score

        def get_score(self):
            return self.score

    table = evaluation.scores_table({"base": {"A": Result(0.2), "B": Result(0.4)},
                                     "trained": {"A": Result(0.6), "B": Result(0.8)}}, ["B", "A"])
    assert list(table.index) == ["B", "A", "mean"] and list(table.columns) == ["base", "trained"]
    assert table.loc["mean", "base"] == pytest.approx(0.3)
    assert table.loc["mean", "trained"] == pytest.approx(0.7)

    # tasks shaped like the seeds and tasks unlike them get a mean each (only when there are both)
    results = {"base": {"A": Result(0.2), "B": Result(0.4), "C": Result(0.9)}}
    split = evaluation.scores_table(results, ["A", "B", "C"], like_seeds=["A"])
    assert list(split.index) == ["A", "B", "C", "mean", report.MEAN_LIKE, report.MEAN_UNLIKE]
    assert split.loc[report.MEAN_LIKE, "base"] == pytest.approx(0.2)
    assert split.loc[report.MEAN_UNLIKE, "base"] == pytest.approx(0.65)
    assert split.loc["mean", "base"] == pytest.approx(0.5)  # over the tasks, not over the group means
    assert list(evaluation.scores_table(results, ["B", "C"], like_seeds=["A"]).index) == ["B", "C", "mean"]


def test_endpoint_urls_are_told_from_folders(tmp_path):
    from pathlib import Path

    assert evaluation.endpoint_url("http://127.0.0.1:8000/emb") == "http://127.0.0.1:8000/emb"
    assert evaluation.endpoint_url(Path("http://127.0.0.1:8000/emb")) == "http://127.0.0.1:8000/emb"
    assert evaluation.endpoint_url(tmp_path) is None and evaluation.endpoint_url("runs/http/model") is None


def test_row_caps_per_task():
    cfg = evaluation.EvalConfig(max_rows=500, max_rows_per_task={"LeeSTS": None, "SDGPairClassification": 100})
    assert (cfg.rows("LeeSTS"), cfg.rows("SDGPairClassification"), cfg.rows("BBCHeadlineRetrieval")) == \
        (None, 100, 500)
    with pytest.raises(ValueError, match="row counts >= 1"):
        evaluation.EvalConfig(max_rows_per_task={"LeeSTS": 0})


def test_evaluation_replicas_compute_in_the_evaluations_precision(tmp_path):
    serve_cfg = serving.ServeConfig()
    assert serve_cfg.precision == "float32"  # an endpoint's vectors equal in-process ones (the parity check)
    assert evaluation.eval_serve_config(evaluation.EvalConfig(), serve_cfg).precision == "auto"
    assert evaluation.eval_serve_config(evaluation.EvalConfig(engine="vllm"), serve_cfg).engine == "vllm"
    with pytest.raises(ValueError, match="use engine=torch"):
        evaluation.eval_serve_config(evaluation.EvalConfig(engine="vllm", precision="bfloat16"), serve_cfg)
    with pytest.raises(ValueError, match="use engine=torch"):
        serving.ServeConfig(engine="vllm", precision="bfloat16")
    # the serve stage's parity gate: exact arithmetic unless the torch engine computes under autocast
    assert serving.parity_floor(serve_cfg) == 0.9999
    assert serving.parity_floor(serve_cfg.model_copy(update={"precision": "auto"})) == 0.999
    assert serving.parity_floor(serving.ServeConfig(engine="vllm", precision="auto")) == 0.9999
    (tmp_path / "encoder.yaml").write_text("backbone: minilm\n")
    revision = serving.model_revision(tmp_path)
    assert evaluation.result_revision(evaluation.EvalConfig(precision="float32"), tmp_path) == revision
    assert evaluation.result_revision(evaluation.EvalConfig(), tmp_path) == f"{revision}-auto"


def test_unknown_task_fails_before_deploying(tmp_path):
    cfg = evaluation.EvalConfig(tasks=["LeeSTS", "NoSuchTask"])
    with pytest.raises(KeyError, match="NoSuchTask"):
        evaluation.evaluate(cfg, {"m": tmp_path}, tmp_path / "out")


@pytest.mark.integration
def test_distributed_evaluation_equals_in_process(ray_cluster, minilm_encoder, minilm_dir, tmp_path):
    from ray import serve

    # float32: equal to the in-process scores (bf16 autocast, the default on this CPU, rounds by batch shape)
    cfg = evaluation.EvalConfig(tasks=TASKS, max_rows=24, batch_size=8, concurrency=4, num_replicas=2,
                                replica_num_cpus=1, precision="float32")
    serve_cfg = serving.ServeConfig(port=PORT, api_key_env=None)
    out = tmp_path / "eval"
    local = evaluation.score_in_process(cfg, minilm_encoder)

    results, replicas, _ = evaluation.evaluate_model(cfg, "minilm", minilm_dir, out, serve_cfg)
    assert len(replicas) == 2  # encode requests of the fanned-out tasks reached both replicas
    assert "eval-minilm" not in serve.status().applications  # the evaluation app is removed afterwards
    for task in TASKS:
        assert results[task].get_score() == pytest.approx(local[task], abs=1e-4), task

    table = evaluation.evaluate(cfg, {"minilm": minilm_dir}, out, serve_cfg)  # a rerun: nothing left to do
    for task in TASKS:
        assert table.loc[task, "minilm"] == pytest.approx(local[task], abs=1e-4)
    assert table.loc["mean", "minilm"] == pytest.approx(np.mean([local[t] for t in TASKS]), abs=1e-4)

    # mteb's own result folder format, one file per task, readable by mteb
    from mteb.cache import ResultCache

    folder = out / "results" / "mgh-ray__minilm" / serving.model_revision(minilm_dir)
    files = {p.stem: p for p in folder.glob("*.json") if p.stem in TASKS}
    assert set(files) == set(TASKS) and (folder / "model_meta.json").is_file()
    assert json.loads(files["LeeSTS"].read_text())["dataset_revision"] == f"{DATA_VERSION}-n24-s0"
    stored = ResultCache(out).load_task_result("LeeSTS", mteb_adapters.model_meta("minilm", folder.name, 384))
    assert stored.get_score() == pytest.approx(local["LeeSTS"], abs=1e-4)
    stamps = {t: p.stat().st_mtime_ns for t, p in files.items()}
    assert "minilm" in (out / "report.md").read_text() and (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # each task's and each mean's 95% bootstrap interval holds its score (from mteb's own predictions)
    ivs = pd.read_csv(out / "intervals.csv").set_index("row")
    assert list(ivs.index) == [*TASKS, "mean"]
    for row in ivs.index:
        assert ivs.loc[row, "point"] == pytest.approx(table.loc[row, "minilm"], abs=1e-4), row
        assert ivs.loc[row, "low"] <= ivs.loc[row, "point"] <= ivs.loc[row, "high"], row
    assert "95% bootstrap intervals" in (out / "report.md").read_text()

    # finished tasks are skipped (files untouched); another size or seed is another dataset: not finished
    evaluation.evaluate(cfg, {"minilm": minilm_dir}, out, serve_cfg)
    assert {t: p.stat().st_mtime_ns for t, p in files.items()} == stamps
    from mgh_ray import tasks

    meta = mteb_adapters.model_meta("minilm", folder.name, 384)
    assert evaluation.finished(ResultCache(out), tasks.build("LeeSTS", max_rows=24), meta) is not None
    assert evaluation.finished(ResultCache(out), tasks.build("LeeSTS", max_rows=20), meta) is None
    assert evaluation.finished(ResultCache(out), tasks.build("LeeSTS", max_rows=24, seed=1), meta) is None

    # the default precision (bf16 autocast on a CPU with bf16 arithmetic), its results kept apart from
    # float32's (not reused for them)
    auto = cfg.model_copy(update={"precision": "auto", "tasks": ["LeeSTS"]})
    results, _, revision = evaluation.evaluate_model(auto, "minilm", minilm_dir, out, serve_cfg)
    assert revision == f"{folder.name}-auto"
    assert (out / "results" / "mgh-ray__minilm" / revision / "LeeSTS.json").is_file()
    assert results["LeeSTS"].get_score() == pytest.approx(local["LeeSTS"], abs=0.02)


@pytest.mark.integration
def test_evaluation_against_a_running_endpoint(ray_cluster, minilm_encoder, minilm_dir, tmp_path):
    cfg = evaluation.EvalConfig(tasks=["LeeSTS"], max_rows=20, batch_size=8)
    serve_cfg = serving.ServeConfig(port=PORT, app_name="test-endpoint", route_prefix="/endpoint",
                                    api_key_env=None)
    url = serving.deploy(serve_cfg, minilm_dir)
    try:
        table = evaluation.evaluate(cfg, {"endpoint": url}, tmp_path, serve_cfg)
    finally:
        serving.undeploy("test-endpoint")
    local = evaluation.score_in_process(cfg, minilm_encoder)
    assert table.loc["LeeSTS", "endpoint"] == pytest.approx(local["LeeSTS"], abs=1e-4)
    folder = tmp_path / "results" / "mgh-ray__endpoint" / serving.model_revision(minilm_dir)
    assert (folder / "LeeSTS.json").is_file()
