"""The placement check: whether every stage of a config fits a cluster's node types, before anything starts.

It asks whether each stage's resource requests (vLLM actors and the quality scorer, adaptation and
train workers, serve replicas, evaluation replicas) fit the node types at their `max_workers`; each
problem names the stage, what it asks and what the cluster can give. Node types come from a
cluster-launcher file (`check_file`) or from the cluster this process is connected to
(`live_node_types`: its autoscaler config, else its nodes as they are).

    mgh-ray check-cluster cluster.yaml jobs/configs/gpu.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mgh_ray.cluster import BOOTSTRAP_CONFIG, CONFIG_ENV
from mgh_ray.config import Section

@dataclass
class NodeType:
    """One node type of a cluster: its resources and how many of it the autoscaler may start."""

    name: str
    resources: dict[str, float]
    max_workers: int  # the head: 1
    head: bool = False


@dataclass
class Demand:
    """`count` identical requests of one stage, and the config keys they come from."""

    what: str  # e.g. "train workers (train.num_workers x train.cpus_per_worker, train.use_gpu)"
    count: int
    resources: dict[str, float]


@dataclass
class Problem:
    """A stage that cannot be placed on the cluster, with what it asks and what the cluster gives."""

    stage: str
    asks: str
    gives: str

    def __str__(self) -> str:
        return f"stage {self.stage}: asks {self.asks}; the cluster can give {self.gives}"


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def node_types(cluster_cfg: dict[str, Any]) -> tuple[list[NodeType], int | None]:
    """Node types of a cluster-launcher / autoscaler config and its global `max_workers`.

    Resources must be written in the file: the placement check cannot ask the cloud what an instance
    type has (the autoscaler does so at run time)."""
    types, head = [], cluster_cfg.get("head_node_type")
    for name, spec in cluster_cfg.get("available_node_types", {}).items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name != head and "CPU" not in res:
            raise ValueError(f"node type {name!r} declares no resources (CPU, GPU): write them in the cluster "
                             f"file, e.g. resources: {{CPU: 8, GPU: 1}} for a g5.2xlarge")
        types.append(NodeType(name, res, 1 if name == head else int(spec.get("max_workers", 0)), name == head))
    return types, cluster_cfg.get("max_workers")


def live_node_types() -> tuple[list[NodeType], int | None]:
    """Node types of the cluster this process is connected to: its autoscaler config when known (the
    local cluster's, or ~/ray_bootstrap_config.yaml on a `ray up` head), else its nodes as they are."""
    for path in (os.environ.get(CONFIG_ENV), BOOTSTRAP_CONFIG):
        if path and Path(path).is_file():
            return node_types(yaml.safe_load(Path(path).read_text()))
    import ray

    types = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = {k: float(v) for k, v in node["Resources"].items()
                   if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
            types.append(NodeType(node["NodeID"][:8], res, 1, head=True))  # fixed: no autoscaler
    return types, 0


def stage_demands(cfg: Section) -> dict[str, list[Demand]]:  # cfg: a pipeline.PipelineConfig
    """What each stage asks of the cluster at once (stages run one after another)."""
    from mgh_ray.adapt import needed

    s, q, t, v, e, a = cfg.synthesis, cfg.synthesis.quality, cfg.train, cfg.serve, cfg.evaluate, cfg.adapt

    def res(cpu: float, gpu: float = 0.0, **extra: float) -> dict[str, float]:
        return {"CPU": cpu, **({"GPU": gpu} if gpu else {}), **extra}

    engine = res(s.num_cpus_per_actor, s.num_gpus_per_actor,
                 **({f"accelerator_type:{s.accelerator_type}": 0.001} if s.accelerator_type else {}))
    replicas = v.autoscaling.max_replicas if v.autoscaling else v.num_replicas
    eval_cpus = v.num_cpus if e.replica_num_cpus is None else e.replica_num_cpus
    return {
        "synthesize": [
            Demand("vLLM engine actors (synthesis.num_actors x num_cpus_per_actor, num_gpus_per_actor)",
                   s.num_actors, engine),
            Demand("quality scorer (synthesis.quality.num_cpus, num_gpus)", 1, res(q.num_cpus, q.num_gpus))],
        # the adaptation stage runs for a bidirectional encoder only (adapt.needed)
        "adapt": [Demand("adaptation workers (adapt.num_workers x adapt.cpus_per_worker, use_gpu)", a.num_workers,
                         res(a.cpus_per_worker, 1.0 if a.use_gpu else 0.0))] if needed(t.encoder, a) else [],
        "train": [Demand("train workers (train.num_workers x train.cpus_per_worker, use_gpu)", t.num_workers,
                         res(t.cpus_per_worker, 1.0 if t.use_gpu else 0.0))],
        "serve": [Demand("serve replicas (serve.autoscaling.max_replicas or serve.num_replicas x serve.num_cpus, "
                         "num_gpus)", replicas, res(v.num_cpus, v.num_gpus))],
        "evaluate": [Demand("evaluation replicas (evaluate.num_replicas x evaluate.replica_num_cpus, "
                            "serve.num_gpus)", e.num_replicas, res(eval_cpus, v.num_gpus))],
    }


def _fits(req: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in req.items() if v > 0)


def _pack(requests: list[dict[str, float]], types: list[NodeType], max_workers: int | None) -> int:
    """How many of `requests` (largest first) fit on the head plus worker nodes opened on demand,
    each type up to its max_workers and all together up to the cluster's max_workers."""
    open_nodes = [dict(t.resources) for t in types if t.head]
    started = {t.name: 0 for t in types}
    placed = 0
    for req in sorted(requests, key=lambda r: (-r.get("GPU", 0.0), -r.get("CPU", 0.0))):
        node = next((free for free in open_nodes if _fits(req, free)), None)
        if node is None:
            room = max_workers is None or sum(started.values()) < max_workers
            choices = [t for t in types if not t.head and room and started[t.name] < t.max_workers
                       and _fits(req, t.resources)]
            if not choices:
                return placed
            # keep GPU nodes for GPU work, and take the smallest node that fits
            pick = min(choices, key=lambda t: (bool(t.resources.get("GPU")) and not req.get("GPU"),
                                               sum(t.resources.values())))
            started[pick.name] += 1
            node = dict(pick.resources)
            open_nodes.append(node)
        for k, v in req.items():
            node[k] = node.get(k, 0.0) - v
        placed += 1
    return placed


def check_placement(cfg: Section, types: list[NodeType], max_workers: int | None = None) -> list[Problem]:
    """Every stage whose requests do not all fit the node types at their max_workers; [] when all fit."""
    shape = ", ".join(f"{t.name} {t.max_workers} x {_fmt(t.resources)}" for t in types)
    cap = f" (max_workers {max_workers} in all)" if max_workers is not None else ""
    problems = []
    for stage, demands in stage_demands(cfg).items():
        requests = [d.resources for d in demands for _ in range(d.count)]
        if _pack(requests, types, max_workers) == len(requests):
            continue
        asks = " + ".join(f"{d.count} x {_fmt(d.resources)} for {d.what}" for d in demands)
        alone = [f"{_pack([d.resources] * d.count, types, max_workers)} of the {d.count} {d.what.split(' (')[0]}"
                 for d in demands]
        problems.append(Problem(stage, asks, f"{', '.join(alone)} at most, with node types {shape}{cap}"))
    return problems


def check_file(cfg: Section, cluster_file: str | Path) -> list[Problem]:
    """`mgh-ray check-cluster`: a job's config against a cluster-launcher file, before anything starts."""
    from mgh_ray import config

    types, max_workers = node_types(config.read_yaml(cluster_file))
    return check_placement(cfg, types, max_workers)
