"""Every shipped config loads and validates here (the GPU one included, without a GPU)."""

from pathlib import Path

import pytest

from mgh_ray import config, pipeline
from mgh_ray.config import ConfigError

DIR = Path(__file__).parents[1] / "jobs" / "configs"
CONFIGS = sorted(DIR.glob("*.yaml"))


def test_the_presets_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny", "gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = config.load(pipeline.PipelineConfig, path, [])
    assert cfg.run_dir


def test_tiny_is_cpu_and_local():
    cfg = config.load(pipeline.PipelineConfig, DIR / "tiny.yaml", [])
    assert cfg.synthesis.model == "smollm2" and cfg.synthesis.num_gpus_per_actor == 0
    assert not cfg.train.use_gpu and cfg.train.num_workers == 2
    assert cfg.synthesis.num_seeds >= 64
    assert cfg.serve.host == "127.0.0.1"


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
