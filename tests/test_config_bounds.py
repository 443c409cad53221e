"""Configs that cannot run are refused when they load: every count and rate has its bounds."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from mgh_ray import config, pipeline
from mgh_ray.config import ConfigError

TINY = Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml"

# the values probing found the validation let through (issue 11), and neighbours of each
BAD = [
    "synthesis.num_seeds=-5", "synthesis.num_seeds=0", "synthesis.batch_size=0", "synthesis.batch_size=-3",
    "synthesis.max_retries=-1", "synthesis.num_actors=0", "synthesis.max_concurrent_batches=0",
    "synthesis.rows_per_shard=0", "synthesis.temperature=-1", "synthesis.top_p=7", "synthesis.top_p=0",
    "synthesis.top_k=-1",
    "synthesis.max_tokens=0", "synthesis.num_cpus_per_actor=-1", "synthesis.num_gpus_per_actor=-1",
    "synthesis.max_input_chars=-10", "synthesis.gpu_memory_utilization=1.5", "synthesis.max_num_seqs=0",
    "synthesis.quality.batch_size=0", "synthesis.quality.num_cpus=-1", "synthesis.quality.copy_sim=2",
    "ray.num_cpus=-4", "ray.num_cpus=0", "train.steps=true", "train.steps=4.5", "train.num_workers=true",
    "train.batch_size=0", "train.checkpoint_every=0", "train.lr=0", "train.encoder.lora.r=0",
    "train.encoder.max_length=2", "train.encoder.pooling.mean_mix=2", "train.curriculum.levels=0",
    "train.loss.temperature=0", "serve.num_replicas=0", "serve.port=70000", "serve.autoscaling.max_replicas=0",
    "serve.max_batch_size=0", "serve.torch_threads=0", "evaluate.num_replicas=0", "evaluate.max_rows=0",
    "evaluate.concurrency=0", "mining.num_seeds=-1", "mining.chunk_size=0", "ablation.steps=0",
    "synthesis.generate_examples=-1", "synthesis.example_max_tokens=0", "synthesis.seed_sources=[]", "synthesis.seed_sources=[wiki]",
    "synthesis.seed_sources=[bbc,bbc]", "train.num_workers=9999", "synthesis.num_actors=5000",
    "evaluate.num_replicas=2000", "serve.num_replicas=1025", "adapt.num_workers=4096", "run_dir=",
]


@pytest.mark.parametrize("item", BAD)
def test_bad_value_is_refused_naming_the_key(item):
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(pipeline.PipelineConfig, TINY, [item])


def test_shipped_values_and_good_edges_still_load():
    cfg = config.load(pipeline.PipelineConfig, TINY, [
        "synthesis.num_seeds=null", "synthesis.max_retries=0", "synthesis.temperature=0", "synthesis.top_p=1",
        "train.lr=1.0e-4", "train.cpus_per_worker=2", "serve.num_cpus=0.5", "serve.autoscaling.min_replicas=0",
        "ray.num_cpus=null", "train.max_failures=-1"])
    assert cfg.synthesis.num_seeds is None and cfg.train.cpus_per_worker == 2.0
    assert config.load(pipeline.PipelineConfig, TINY, []).ray.num_cpus == 4


def _sections(model: type[BaseModel], prefix: str = ""):
    """(dotted key, field) of every field of every nested Section."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        inner = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            yield from _sections(inner[0], key + ".")
        else:
            yield key, field


def test_no_integer_field_takes_a_bool():
    """`train.steps=true` once became 1 step: every int field is strict (a bool is refused).

    Except `serve.*`: `serve run mgh_ray.serving:build_app num_replicas=2` hands ServeConfig strings,
    so its fields stay lax (bounds still apply)."""
    ints = [key for key, f in _sections(pipeline.PipelineConfig)
            if int in (typing.get_args(f.annotation) or (f.annotation,)) and not key.startswith("serve.")]
    assert len(ints) > 30, ints
    for key in ints:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.load(pipeline.PipelineConfig, TINY, [f"{key}=true"])
