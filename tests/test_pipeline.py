"""The pipeline's stage bookkeeping, its driver guard and placement check, the ablation arms.

The pipeline itself runs end to end as submitted jobs in test_cluster.py (stop and resume, reuse,
stale config, ablation), the way users run it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mgh_ray import ablation, arms, config, driver, pipeline, report, stages

TINY = Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml"


def test_a_model_load_in_a_forbidden_driver_fails_loudly(monkeypatch):
    from mgh_ray.encoder import Encoder, EncoderConfig

    monkeypatch.setenv(driver.ENV, str(os.getpid()))
    with pytest.raises(driver.ModelInDriverError, match="encoder smollm2 was about to load in the driver"):
        Encoder.from_config(EncoderConfig())


def test_schedule_arms_map_to_training_settings():
    tiny = config.load(pipeline.PipelineConfig, TINY, [])
    for arm in arms.SCHEDULES:
        cfg = config.override(tiny, arms.schedule_overrides(arm))
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
        arms.schedule_overrides("level_x")
    with pytest.raises(config.ConfigError, match=r"unknown schedule arm\(s\) \['curiculum'\]"):
        config.load(pipeline.PipelineConfig, TINY, ["ablation.schedules=[curiculum]"])  # refused up front

    # which arms share a trained model: pooling "ata" is schedule "curriculum"; reference_levels is not
    def key(arm, *over):
        return ablation.arm_key(tiny, config.override(tiny, [*arms.schedule_overrides(arm), *over]), arm)

    assert key("curriculum") == key("curriculum", "train.encoder.pooling.mode=ata")
    assert key("reference_levels")[0] == "synth:relabel" and key("reference_levels")[1] != key("curriculum")[1]
    assert key("mined")[0] == "mined" and key("in_batch") != key("curriculum")


def test_finished_stage_with_another_config_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "_SUCCESS").write_text("abc")
    with pytest.raises(stages.StaleStageError, match="train"):
        stages.run_stage(str(tmp_path / "train"), "train", "def", lambda: None)
    assert stages.run_stage(str(tmp_path / "train"), "train", "abc", lambda: 1 / 0) is False  # reused


def test_how_a_stage_runs_does_not_change_its_fingerprint_and_what_it_makes_does():
    tiny = config.load(pipeline.PipelineConfig, TINY, ["train.encoder.attention=bidirectional"])

    def prints(*over):
        c = config.override(tiny, list(over))
        return pipeline.train_fingerprint(c), pipeline.adapt_fingerprint(c)

    same = prints()
    # runtime fields: a finished stage is reused (a release that adds one keeps old runs too)
    for over in ("train.keep_rows=0", "train.log_every=1", "train.cpus_per_worker=2", "adapt.log_every=3",
                 "adapt.checkpoint_every=7", "train.fail_at_step=3"):
        assert prints(over) == same, over
    assert prints("train.steps=41")[0] != same[0] and prints("train.export=false")[0] != same[0]
    assert prints("adapt.steps=7")[1] != same[1] and prints("adapt.steps=7")[0] != same[0]  # train starts from it


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
        stages.run_stage(str(tmp_path / "a"), "a", "fp", flaky, node_loss_retries=0)
    calls.clear()
    assert stages.run_stage(str(tmp_path / "b"), "b", "fp", flaky, node_loss_retries=1) is True
    assert len(calls) == 2 and (tmp_path / "b" / "_SUCCESS").read_text() == "fp"
    with pytest.raises(ZeroDivisionError):  # not a lost node: no retry
        stages.run_stage(str(tmp_path / "c"), "c", "fp", lambda: 1 / 0, node_loss_retries=3)
    assert not (tmp_path / "c" / "_SUCCESS").exists()


@pytest.mark.integration
def test_pipeline_refuses_a_config_the_cluster_cannot_place(tmp_path, ray_cluster):
    """On the 4-CPU test cluster, 8 training workers can never be placed: refused at once, stage named,
    nothing written (Ray Train would otherwise retry its worker group for minutes)."""
    cfg = config.load(pipeline.PipelineConfig, TINY, [f"run_dir={tmp_path / 'run'}", "train.num_workers=8"])
    with pytest.raises(pipeline.PlacementError, match=r"stage train: asks 8 x \{CPU: 1\}"):
        pipeline.run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_ablation_table_keeps_the_untrained_row_the_unlike_mean_and_its_spread_over_seeds(tmp_path):
    import pandas as pd

    from mgh_ray.report import MEAN_LIKE, MEAN_UNLIKE

    index = ["BBCHeadlineRetrieval", "LeeSTS", "mean", MEAN_LIKE, MEAN_UNLIKE]
    scores = {"curriculum-s0": pd.Series([0.6, 0.2, 0.4, 0.6, 0.2], index=index),
              "curriculum-s1": pd.Series([0.6, 0.4, 0.5, 0.6, 0.4], index=index),
              "untrained": pd.Series([0.3, 0.25, 0.275, 0.3, 0.25], index=index)}
    table = ablation.summarize(scores, ["curriculum"], [0, 1], untrained=["untrained"])
    assert list(table.index) == ["untrained", "curriculum"]  # the line every arm has to clear comes first
    assert table.loc["untrained", MEAN_UNLIKE] == 0.25 and pd.isna(table.loc["untrained", "std_over_seeds"])
    assert table.loc["curriculum", MEAN_UNLIKE] == pytest.approx(0.3)
    assert table.loc["curriculum", "std_unlike_over_seeds"] == pytest.approx(pd.Series([0.2, 0.4]).std())
    assert table.loc["curriculum", "std_over_seeds"] == pytest.approx(pd.Series([0.4, 0.5]).std())
    png = report.ablation_chart(table, "schedule", tmp_path / "schedule.png")
    assert png.stat().st_size > 0


def test_ablation_rows_are_compared_with_their_reference_and_their_untrained_model_paired():
    """Schedule arms against curriculum, pooling arms against mean pooling under the same attention,
    every trained row against its own untrained model; the paired difference of two rows whose
    replicates differ by a constant is that constant, with an interval of zero width."""
    import numpy as np

    from mgh_ray.intervals import Bootstrap
    from mgh_ray.report import MEAN_LIKE, MEAN_UNLIKE

    assert ablation.comparisons("schedule", ["curriculum", "random"], ["untrained"]) == {
        "vs untrained": [("curriculum", "untrained"), ("random", "untrained")],
        "vs curriculum": [("random", "curriculum")]}
    arms = ["causal-ata", "causal-mean", "bidirectional-ata", "bidirectional-mean", "bidirectional-last"]
    pairs = ablation.comparisons("pooling", arms, [f"untrained-{a}" for a in arms])
    assert pairs["vs mean"] == [("causal-ata", "causal-mean"), ("bidirectional-ata", "bidirectional-mean"),
                                ("bidirectional-last", "bidirectional-mean")]
    assert pairs["vs bidirectional"] == [("causal-ata", "bidirectional-ata"), ("causal-mean", "bidirectional-mean")]
    assert ablation.comparisons("pooling", ["ata", "last"], []) == {}  # nothing to compare with

    rng = np.random.default_rng(0)
    # every model of a task resamples the same rows: their replicates share the rows' noise
    noise = {t: rng.normal(0, 0.05, 200) for t in ("BBC", "Lee")}
    boots = {f"{arm}-s{s}": {t: Bootstrap(0.5 + shift, 0.5 + shift + noise[t], 40) for t in ("BBC", "Lee")}
             for arm, shift in (("curriculum", 0.02), ("random", 0.0)) for s in (0, 1)}
    merged = ablation.merge_rows(boots, {a: [f"{a}-s0", f"{a}-s1"] for a in ("curriculum", "random")}, ["BBC", "Lee"])
    diffs = ablation.paired_differences(merged, {"vs curriculum": [("random", "curriculum")]}, ["BBC", "Lee"], ["BBC"])
    unlike = diffs[diffs["mean"] == MEAN_UNLIKE].iloc[0]
    assert (unlike.row, unlike.reference) == ("random", "curriculum")
    assert unlike.point == pytest.approx(-0.02) and unlike.low == pytest.approx(-0.02) and unlike.high == pytest.approx(-0.02)
    assert set(diffs["mean"]) == {"mean", MEAN_LIKE, MEAN_UNLIKE}

