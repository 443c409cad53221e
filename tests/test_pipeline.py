"""The main job end to end on a micro budget, its resume, and the ablation runner in CI size."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from mgh_ray import ablation, config, driver, pipeline

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

    # which arms share a trained model: pooling "ata" is schedule "curriculum"; reference_levels is not
    def key(arm, *over):
        return ablation.arm_key(tiny, config.override(tiny, [*ablation.schedule_overrides(arm), *over]), arm)

    assert key("curriculum") == key("curriculum", "train.encoder.pooling.mode=ata")
    assert key("reference_levels")[0] == "synth:relabel" and key("reference_levels")[1] != key("curriculum")[1]
    assert key("mined")[0] == "mined" and key("in_batch") != key("curriculum")


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
def test_pipeline_runs_to_the_table_resumes_and_ablates(tmp_path, monkeypatch, ray_cluster, smollm2_path,
                                                        minilm_path):
    """The micro pipeline in-process on a local run_dir, no model in the driver; a rerun reuses every
    stage; a changed config is refused; the ablation runner trains its arms on the same records.
    (The same pipeline with run_dir on S3 runs as a submitted job in test_cluster.py.)"""
    monkeypatch.setenv(driver.ENV, str(os.getpid()))  # the driver never loads a model (cluster heads are small)
    run = tmp_path / "run"
    cfg = micro(run)
    scores = pipeline.run_pipeline(cfg)

    assert {"base", "trained"} <= set(scores.columns)
    assert list(scores.index) == ["LeeSTS", "SDGPairClassification", "mean"]
    assert scores.notna().all().all()
    for stage in STAGES:
        assert (run / stage / "_SUCCESS").is_file(), stage
        assert (run / stage / "config.yaml").is_file(), stage
    assert (run / "config.yaml").is_file() and (run / "base" / "_SUCCESS").is_file()
    assert (run / "synthesize" / "report.json").is_file() and (run / "train" / "model" / "encoder.yaml").is_file()
    assert (run / "evaluate" / "report.md").is_file() and (run / "evaluate" / "scores.png").stat().st_size > 0
    parity = pd.read_json(run / "serve" / "serve.json", typ="series")
    assert parity["parity_min_cosine"] >= 0.9999

    # a rerun reuses every stage: nothing is rewritten, the same table comes back
    stamps = {s: (run / s / "_SUCCESS").stat().st_mtime_ns for s in STAGES}
    metrics = (run / "train" / "metrics.jsonl").read_text()
    again = pipeline.run_pipeline(cfg)
    pd.testing.assert_frame_equal(again, scores)
    assert stamps == {s: (run / s / "_SUCCESS").stat().st_mtime_ns for s in STAGES}
    assert (run / "train" / "metrics.jsonl").read_text() == metrics

    # a different training config must not silently reuse the trained model
    with pytest.raises(pipeline.StaleStageError, match="train"):
        pipeline.run_pipeline(micro(run, "train.steps=5"))

    # the ablation runner, CI size: two schedule arms on the same records, same seeds and steps
    # (reference_levels: the same records through the relabel gate, i.e. the reference embedder's levels)
    ab = micro(run, "ablation.schedules=[curriculum,reference_levels]", "ablation.poolings=[]",
               "ablation.steps=4", "ablation.tasks=[LeeSTS]")
    tables = ablation.run_ablation(ab)
    table = tables["schedule"]
    assert list(table.index) == ["curriculum", "reference_levels"] and "pooling" not in tables
    assert table["mean"].notna().all()
    for arm in ("curriculum-s0", "reference_levels-s0"):
        assert (run / "ablation" / "schedule" / arm / "_SUCCESS").is_file()
        assert not (run / "ablation" / "schedule" / arm / "export").exists()  # arms are only evaluated
    assert (run / "ablation" / "schedule.png").stat().st_size > 0
    assert (run / "ablation" / "schedule.md").is_file()


@pytest.mark.integration
def test_pipeline_refuses_a_config_the_cluster_cannot_place(tmp_path, ray_cluster):
    """On the 4-CPU test cluster, 8 training workers can never be placed: refused at once, stage named,
    nothing written (Ray Train would otherwise retry its worker group for minutes)."""
    cfg = micro(tmp_path / "run", "train.num_workers=8")
    with pytest.raises(pipeline.PlacementError, match=r"stage train: asks 8 x \{CPU: 1\}"):
        pipeline.run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
