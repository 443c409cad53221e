"""The placement check (no Ray): the shipped configs fit their clusters; what does not fit is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
GPU = ROOT / "jobs" / "configs" / "gpu.yaml"


def test_shipped_configs_fit_their_clusters():
    from mgh_ray import cluster, config, pipeline, placement

    assert placement.check_file(config.load(pipeline.PipelineConfig, GPU), ROOT / "cluster.yaml") == []
    assert placement.check_file(config.load(pipeline.PipelineConfig, TINY), ROOT / "cluster.yaml") == []
    types, max_workers = placement.node_types(cluster.provider_config(cluster.LocalClusterConfig()))
    tiny = config.load(pipeline.PipelineConfig, TINY, [])
    assert placement.check_placement(tiny, types, max_workers) == []


def test_too_many_gpus_is_refused_naming_the_stage():
    from mgh_ray import config, pipeline, placement

    def check(*overrides: str) -> list:
        return placement.check_file(config.load(pipeline.PipelineConfig, GPU, list(overrides)), ROOT / "cluster.yaml")

    problems = check("train.num_workers=9")
    assert [p.stage for p in problems] == ["train"]
    text = str(problems[0])
    assert "9 x {CPU: 4, GPU: 1}" in text and "8 of the 9 train workers" in text and "gpu_worker 8 x" in text
    problems = check("synthesis.num_gpus_per_actor=2", "evaluate.num_replicas=12")
    assert [p.stage for p in problems] == ["synthesize", "evaluate"]
    assert "0 of the 8 vLLM engine actors" in str(problems[0])


def test_cluster_wide_max_workers_and_head_resources_count():
    from mgh_ray import cluster, config, pipeline, placement

    cfg = config.load(pipeline.PipelineConfig, TINY, ["train.num_workers=3", "train.cpus_per_worker=2"])
    local = cluster.provider_config(cluster.LocalClusterConfig(cpu_workers=2, cpus_per_worker=2))
    types, max_workers = placement.node_types(local)
    assert [p.stage for p in placement.check_placement(cfg, types, max_workers)] == ["train"]  # head has CPU: 0
    types = [placement.NodeType("head", {"CPU": 2}, 1, head=True), placement.NodeType("w", {"CPU": 2}, 5)]
    assert placement.check_placement(cfg, types, max_workers=5) == []
    assert [p.stage for p in placement.check_placement(cfg, types, max_workers=1)] == ["train"]


def test_node_types_must_declare_resources():
    from mgh_ray import placement

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["resources"] = {}
    with pytest.raises(ValueError, match="gpu_worker.*declares no resources"):
        placement.node_types(cfg)
