"""The main job end to end on a micro budget, its resume, and the ablation runner in CI size."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd
import pytest

from mgh_ray import ablation, config, driver, pipeline, storage
from mgh_ray.layout import RunLayout

TINY = Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml"
STAGES = ("fetch", "synthesize", "train", "serve", "evaluate")


def micro(run_dir: Path | str, *extra: str) -> pipeline.PipelineConfig:
    """tiny.yaml cut down to CI size: 16 seeds, 4 training steps, 2 small tasks; the default quality
    gate (a run whose gate keeps too few records fails loudly, which is what a user would see)."""
    return config.load(pipeline.PipelineConfig, TINY, [
        f"run_dir={run_dir}", "synthesis.num_seeds=16", "synthesis.rows_per_shard=4",
        "train.steps=4", "train.batch_size=2", "train.checkpoint_every=4",
        "train.warmup=1", "train.export=false", "train.encoder.max_length=32", "train.encoder.lora.top_layers=2",
        "evaluate.tasks=[LeeSTS,SDGPairClassification]", "evaluate.max_rows=16", "evaluate.num_replicas=1",
        *extra])


def test_a_model_load_in_a_forbidden_driver_fails_loudly(monkeypatch):
    from mgh_ray.encoder import Encoder, EncoderConfig

    monkeypatch.setenv(driver.ENV, str(os.getpid()))
    with pytest.raises(driver.ModelInDriverError, match="encoder smollm2 was about to load in the driver"):
        Encoder.from_config(EncoderConfig())


def test_schedule_arms_map_to_training_settings():
    tiny = config.load(pipeline.PipelineConfig, TINY, [])
    for arm in ablation.SCHEDULES:
        cfg = config.override(tiny, ablation.schedule_overrides(arm))
        if arm.startswith("level_"):
            assert (cfg.train.curriculum.mode, cfg.train.curriculum.level) == ("single", int(arm[-1]))
        elif arm == "in_batch":
            assert not cfg.train.loss.hard_negatives
        elif arm == "reference_levels":  # same schedule, records gated with the embedder's levels
            assert cfg.train.curriculum.mode == "curriculum" and cfg.synthesis.quality.policy == "relabel"
            assert tiny.synthesis.quality.policy == "filter"  # the default arms use the LLM's levels
        else:
            assert cfg.train.curriculum.mode == ("curriculum" if arm == "mined" else arm)
            assert cfg.train.loss.hard_negatives
    with pytest.raises(ValueError, match="unknown schedule arm"):
        ablation.schedule_overrides("level_x")


def test_finished_stage_with_another_config_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_SUCCESS").write_text("abc")
    with pytest.raises(pipeline.StaleStageError, match="train"):
        pipeline.run_stage(str(tmp_path / "train"), "train", "def", lambda: None)
    assert pipeline.run_stage(str(tmp_path / "train"), "train", "abc", lambda: 1 / 0) is False  # reused


def test_a_stage_that_lost_its_node_runs_again_and_other_failures_do_not(tmp_path):
    import ray.exceptions as rex

    calls = []

    def flaky():  # the error Ray raised when the autoscaler removed a node under a parquet read
        calls.append(1)
        if len(calls) == 1:
            try:
                raise rex.ActorDiedError()
            except rex.ActorDiedError as died:
                raise RuntimeError("The actor died because its node has died. Terminated by autoscaler.") from died

    with pytest.raises(RuntimeError):  # retries off: the loss is raised
        pipeline.run_stage(str(tmp_path / "a"), "a", "fp", flaky, node_loss_retries=0)
    calls.clear()
    assert pipeline.run_stage(str(tmp_path / "b"), "b", "fp", flaky, node_loss_retries=1) is True
    assert len(calls) == 2 and (tmp_path / "b" / "_SUCCESS").read_text() == "fp"
    with pytest.raises(ZeroDivisionError):  # not a lost node: no retry
        pipeline.run_stage(str(tmp_path / "c"), "c", "fp", lambda: 1 / 0, node_loss_retries=3)
    assert not (tmp_path / "c" / "_SUCCESS").exists()


@pytest.mark.integration
def test_pipeline_on_s3_runs_to_the_table_resumes_and_ablates(tmp_path, monkeypatch, ray_cluster, smollm2_path,
                                                               minilm_path, s3_bucket):
    """The micro pipeline with run_dir on the loopback S3 server (local paths go through the same
    storage layer, and each stage's own tests run them): every stage's output lands in the bucket,
    nothing of the run on local disk outside the caches, no model in the driver; a rerun reuses every
    stage; a changed config is refused; the ablation runner trains its arms on the same records."""
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    monkeypatch.setenv(driver.ENV, str(os.getpid()))  # the driver never loads a model (cluster heads are small)
    run = RunLayout(f"s3://{s3_bucket}/run")
    cfg = micro(run.run_dir, "train.export=true")
    scores = pipeline.run_pipeline(cfg)

    assert {"base", "trained"} <= set(scores.columns)
    assert list(scores.index) == ["LeeSTS", "SDGPairClassification", "mean"]
    assert scores.notna().all().all()
    for stage in (*STAGES, "base"):
        assert storage.is_file(RunLayout.success(getattr(run, stage))), stage
        assert stage == "base" or storage.is_file(RunLayout.config(getattr(run, stage))), stage
    assert storage.is_file(RunLayout.config(run.run_dir))
    assert storage.list_files(RunLayout.records(run.synthesize))
    assert storage.is_file(storage.join(run.synthesize, "report.json"))
    assert storage.is_file(storage.join(run.model, "encoder.yaml"))
    assert storage.is_file(storage.join(run.model, storage.MANIFEST))
    assert storage.list_files(storage.join(run.export, "merged"), recursive=True)
    assert storage.list_files(storage.join(run.train, "train"), recursive=True)  # Ray Train's checkpoints
    assert storage.is_file(storage.join(run.evaluate, "report.md"))
    assert storage.is_file(storage.join(run.evaluate, "scores.png"))
    parity = pd.read_json(io.StringIO(storage.read_text(storage.join(run.serve, "serve.json"))), typ="series")
    assert parity["parity_min_cosine"] >= 0.9999
    assert list(tmp_path.iterdir()) == []

    # a rerun reuses every stage: nothing is rewritten, the same table comes back
    stamps = {s: storage.info(RunLayout.success(getattr(run, s))).mtime for s in STAGES}
    metrics = storage.read_text(storage.join(run.train, "metrics.jsonl"))
    again = pipeline.run_pipeline(cfg)
    pd.testing.assert_frame_equal(again, scores)
    assert stamps == {s: storage.info(RunLayout.success(getattr(run, s))).mtime for s in STAGES}
    assert storage.read_text(storage.join(run.train, "metrics.jsonl")) == metrics

    # a different training config must not silently reuse the trained model
    with pytest.raises(pipeline.StaleStageError, match="train"):
        pipeline.run_pipeline(micro(run.run_dir, "train.export=true", "train.steps=5"))

    # the ablation runner, CI size: two schedule arms on the same records, same seeds and steps
    ab = micro(run.run_dir, "ablation.schedules=[curriculum,in_batch]", "ablation.poolings=[]",
               "ablation.steps=4", "ablation.tasks=[LeeSTS]")
    tables = ablation.run_ablation(ab)
    table = tables["schedule"]
    assert list(table.index) == ["curriculum", "in_batch"] and "pooling" not in tables
    assert table["mean"].notna().all()
    for arm in ("curriculum-s0", "in_batch-s0"):
        assert storage.is_file(RunLayout.success(run.arm("schedule", arm)))
    assert storage.is_file(storage.join(run.ablation, "schedule.png"))
    assert storage.is_file(storage.join(run.ablation, "schedule.md"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_pipeline_refuses_a_config_the_cluster_cannot_place(tmp_path, ray_cluster):
    """On the 4-CPU test cluster, 8 training workers can never be placed: refused at once, stage named,
    nothing written (Ray Train would otherwise retry its worker group for minutes)."""
    cfg = micro(tmp_path / "run", "train.num_workers=8")
    with pytest.raises(pipeline.PlacementError, match=r"stage train: asks 8 x \{CPU: 1\}"):
        pipeline.run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
