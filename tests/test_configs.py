"""Every shipped config loads and validates here (the GPU one included, without a GPU)."""

from pathlib import Path

import pytest

from mgh_ray import config, evaluation, pipeline
from mgh_ray.config import ConfigError

DIR = Path(__file__).parents[1] / "jobs" / "configs"
PRESETS = ["tiny", "small", "gpu", "gpu-small"]  # the presets the docs name; a missing file fails below
CONFIGS = [DIR / f"{name}.yaml" for name in PRESETS]


def test_every_shipped_config_is_a_named_preset():
    assert sorted(p.stem for p in DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = config.load(pipeline.PipelineConfig, path, [])
    assert cfg.run_dir.endswith(f"/{path.stem}")  # each preset writes a run folder of its own name


def test_tiny_is_cpu_and_local():
    cfg = config.load(pipeline.PipelineConfig, DIR / "tiny.yaml", [])
    assert cfg.synthesis.model == "smollm2" and cfg.synthesis.num_gpus_per_actor == 0
    assert not cfg.train.use_gpu and cfg.train.num_workers == 2
    assert cfg.synthesis.num_seeds >= 64
    assert cfg.serve.host == "127.0.0.1"


def test_small_mixes_seed_sources_with_generated_tasks_and_ablates_over_three_seeds():
    cfg = config.load(pipeline.PipelineConfig, DIR / "small.yaml", [])
    assert cfg.synthesis.seed_sources == ["bbc", "moviedialog"] and cfg.synthesis.generate_examples > 0
    assert "sts" in cfg.synthesis.kinds and cfg.synthesis.quality.policy == "filter"
    assert cfg.ablation.seeds == [0, 1, 2] and cfg.ablation.poolings == ["ata", "mean", "last"]
    assert cfg.ablation.attentions == ["causal", "bidirectional"] and cfg.adapt.steps > 0
    # the paper's backbone: bidirectional after MNTP, so the pipeline runs its adapt stage
    assert cfg.train.encoder.attention == "bidirectional" and pipeline.adapted(cfg)
    assert cfg.train.encoder.pooling.mode == "mean"  # the better pooling of the 2026-12-03 ablation
    assert {"curriculum", "level_4", "random", "reverse", "in_batch", "reference_levels"} == set(
        cfg.ablation.schedules)
    assert pipeline.like_seeds(cfg) == ["BBCHeadlineRetrieval", "MovieDialogReranking"]
    # tables with power: 500 rows, every Lee STS pair, a 95% interval from 1,000 resamples
    assert cfg.evaluate.max_rows == 500 and cfg.evaluate.rows("LeeSTS") is None and cfg.evaluate.bootstrap == 1000
    assert cfg.train.schedule == "constant"  # the curriculum's hardest stage is not starved


def test_gpu_uses_gpu_actors_and_workers():
    cfg = config.load(pipeline.PipelineConfig, DIR / "gpu.yaml", [])
    assert cfg.synthesis.num_gpus_per_actor >= 1 and cfg.synthesis.num_actors > 1
    assert cfg.train.use_gpu and cfg.train.backend == "nccl" and cfg.train.num_workers > 2
    assert cfg.serve.num_gpus >= 1
    assert "/" in cfg.synthesis.model and "/" in cfg.train.encoder.backbone  # hub ids


def test_overrides_apply_and_bad_keys_are_named():
    cfg = config.load(pipeline.PipelineConfig, DIR / "tiny.yaml", ["train.steps=7", "run_dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.run_dir == "/tmp/x"
    with pytest.raises(ConfigError, match="train.stepz"):
        config.load(pipeline.PipelineConfig, DIR / "tiny.yaml", ["train.stepz=7"])
    with pytest.raises(ConfigError, match="train.steps"):
        config.load(pipeline.PipelineConfig, DIR / "tiny.yaml", ["train.steps=many"])


def test_gpu_small_fits_one_gpu_with_the_local_tiny_models():
    from mgh_ray import assets

    cfg = config.load(pipeline.PipelineConfig, DIR / "gpu-small.yaml", [])
    # tiny models by asset name, from the local cache: no hub on this machine
    assert cfg.synthesis.model in assets.MODELS and cfg.train.encoder.backbone in assets.MODELS
    assert cfg.synthesis.quality.embedder in assets.MODELS
    # vLLM on CUDA beside the quality scorer, on one GPU
    assert 0 < cfg.synthesis.num_gpus_per_actor and cfg.synthesis.num_actors == 1
    assert cfg.synthesis.num_gpus_per_actor + cfg.synthesis.quality.num_gpus <= 1
    assert cfg.train.use_gpu and cfg.train.backend == "nccl" and cfg.train.num_workers == 1
    assert cfg.train.encoder.dtype in ("auto", "bfloat16")
    # the Serve app and the evaluation deployment share the GPU
    eval_serve = evaluation.eval_serve_config(cfg.evaluate, cfg.serve)
    assert cfg.serve.num_gpus > 0 and cfg.serve.num_gpus + eval_serve.num_replicas * eval_serve.num_gpus <= 1
    assert cfg.evaluate.max_rows is None and cfg.evaluate.truncation == "truncate"


def test_gpu_yaml_evaluates_full_tables_without_failing_on_long_articles():
    cfg = config.load(pipeline.PipelineConfig, DIR / "gpu.yaml", [])
    assert cfg.evaluate.max_rows is None and cfg.evaluate.truncation == "truncate"
    assert evaluation.eval_serve_config(cfg.evaluate, cfg.serve).truncation == "truncate"
