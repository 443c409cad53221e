"""The whole pipeline as one resumable job: fetch -> synthesize -> adapt -> train -> serve -> evaluate.

One config (`PipelineConfig`, composed of every stage's own section) drives all stages. `run_dir` is a
local path or a URI (s3://, gs://, file://); `layout.RunLayout` says where each stage's folder is.
Each stage writes into its own folder with its resolved config and goes through `stages.run_stage`
(a `_SUCCESS` fingerprint of the config it depends on). The driver holds configs, counts and
locations: models load in Ray tasks and actors (base model, parity check, export), rows stay on
workers. A rerun skips finished stages whose fingerprint still matches, resumes the first unfinished
one (synthesis resumes row by row, training from its last checkpoint), and refuses to mix a finished
stage made with a different config (it names the stage and tells how to start over).

    mgh-ray pipeline jobs/configs/tiny.yaml            # or: python -m jobs.pipeline jobs/configs/tiny.yaml
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from pydantic import Field

from mgh_ray import stages, storage
from mgh_ray.adapt import AdaptConfig
from mgh_ray.arms import AblationConfig
from mgh_ray.config import Section
from mgh_ray.evaluation import EvalConfig
from mgh_ray.layout import SCORES_FILE, RunLayout, save_config
from mgh_ray.mining import MiningConfig
from mgh_ray.serving import ServeConfig
from mgh_ray.synthesis import SynthesisConfig
from mgh_ray.training import TrainConfig

log = logging.getLogger(__name__)


class RayConfig(Section):
    """Where to run. address None: RAY_ADDRESS or a running local cluster if any, else start one.

    `num_cpus` and `include_dashboard` shape a local cluster that this process starts; they are not
    passed when the job connects to an existing cluster (`ray job submit`, RAY_ADDRESS, "auto"), where
    Ray refuses them."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, strict=True)  # only when this process starts a local cluster
    # A new local cluster starts Ray's dashboard on 127.0.0.1:8265 by default: it also serves the State
    # API that Ray Train's placement-group cleaner polls every second (without it that actor logs
    # "Failed to query Ray Train Controller actor state" each time and cannot clean up after a crash).
    include_dashboard: bool = Field(True, strict=True)
    # A stage that fails because a node went away (spot preemption, or the autoscaler removing an idle
    # node just as Ray Data spread an actor onto it) is run again this many times; each stage resumes
    # from what it wrote, so a rerun costs only the lost work.
    node_loss_retries: int = Field(1, ge=0, strict=True)


class PipelineConfig(Section):
    run_dir: str = Field("runs/tiny", min_length=1)  # a local path or a URI; empty is refused
    ray: RayConfig = Field(default_factory=RayConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)  # runs only for a bidirectional encoder
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)


def existing_cluster(cfg: RayConfig) -> str | None:
    """The address this process will connect to, or None when `ray.init` would start a new cluster.

    Ray's own resolution (the one `ray.init` uses): RAY_ADDRESS (set for the driver of a submitted
    job), then `address`, then a cluster started on this machine with `ray start`."""
    if cfg.address == "local":
        return None
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment(cfg.address, None)
    except ConnectionError:  # address "auto" and nothing running: let ray.init say so
        return cfg.address


def init_ray(cfg: RayConfig) -> None:
    """Connect to the cluster the config names (or the running one), else start a local one.

    Only a new local cluster gets `num_cpus` and the dashboard settings: Ray raises "When connecting
    to an existing cluster, num_cpus and num_gpus must not be provided" otherwise."""
    import ray

    from mgh_ray import logs

    logs.data_progress()
    if ray.is_initialized():
        return
    address = existing_cluster(cfg)
    if address is not None:
        if cfg.num_cpus is not None:
            log.info("connecting to the running cluster at %s: ray.num_cpus=%d applies to new local clusters "
                     "only and is ignored", address, cfg.num_cpus)
        ray.init(address=address, log_to_driver=True, runtime_env=logs.RUNTIME_ENV)
        return
    from mgh_ray.serving import apply_cluster_env

    apply_cluster_env()  # the new cluster's processes (Serve's controller among them) inherit it
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
             log_to_driver=True, runtime_env=logs.RUNTIME_ENV)


class PlacementError(RuntimeError):
    """A stage asks for more than the cluster's node types can ever give; the message names it."""


def check_cluster(cfg: PipelineConfig, stages: list[str] | None = None) -> None:
    """Refuse, before any stage starts, a config whose stages (all, or `stages`) cannot be placed on the
    connected cluster (its autoscaler's node types at max_workers when known, else its live nodes),
    instead of waiting forever for resources that never come."""
    from mgh_ray import placement

    types, max_workers = placement.live_node_types()
    problems = [p for p in placement.check_placement(cfg, types, max_workers) if stages is None or p.stage in stages]
    if problems:
        raise PlacementError("this config does not fit the cluster:\n  - " + "\n  - ".join(map(str, problems))
                             + "\nlower the stage's counts/resources, or give the cluster bigger node types")


def _save_base(encoder_cfg: dict, folder: str) -> str:
    """The untrained backbone saved as an encoder folder (a Ray task: the model loads on a worker)."""
    import tempfile

    from mgh_ray.encoder import Encoder, EncoderConfig

    with tempfile.TemporaryDirectory() as tmp:
        Encoder.from_config(EncoderConfig.model_validate(encoder_cfg)).save(Path(tmp) / "base")
        return storage.upload_dir(Path(tmp) / "base", folder)


def adapted(cfg: PipelineConfig) -> bool:
    """Whether the run has an adaptation (MNTP) stage: a bidirectional encoder with adapt.steps > 0."""
    from mgh_ray import adapt

    return adapt.needed(cfg.train.encoder, cfg.adapt)


def train_config(cfg: PipelineConfig) -> TrainConfig:
    """The training config of the run: the encoder starts from the adaptation stage's adapter when the
    run has one (`adapted`)."""
    if not adapted(cfg):
        return cfg.train
    encoder = cfg.train.encoder.model_copy(update={"base_adapter": RunLayout(cfg.run_dir).adapter})
    return cfg.train.model_copy(update={"encoder": encoder})


def train_fingerprint(cfg: PipelineConfig) -> str:
    """What a trained model depends on: the records' synthesis, the training config and, for an adapted
    encoder, the adaptation (a run without one keeps the fingerprint it always had)."""
    sections = [cfg.synthesis, train_config(cfg)] + ([cfg.adapt] if adapted(cfg) else [])
    return stages.fingerprint(*sections)


def adapt(cfg: PipelineConfig) -> str:
    """The adaptation stage: MNTP on the run's seed texts (the published seed file of seed_sources)."""
    from mgh_ray import adapt as adapting

    return adapting.adapt(cfg.adapt, cfg.train.encoder, published_seeds(cfg), RunLayout(cfg.run_dir).adapt)


def adapt_stage(cfg: PipelineConfig) -> str:
    """The adaptation stage as the pipeline runs it (skipped when done with these settings); the
    adapter's location."""
    run = RunLayout(cfg.run_dir)
    stages.run_stage(run.adapt, "adapt", adapt_fingerprint(cfg), lambda: adapt(cfg), cfg.ray.node_loss_retries)
    return run.adapter


def base_model(cfg: PipelineConfig, folder: str | None = None) -> str:
    """The untrained model the run's training starts from, with the same pooling (the backbone, with
    the adaptation merged in when the run has one), saved for comparison under `folder` (default
    run_dir/base). A folder saved from another encoder config is saved again."""
    import ray

    folder = folder or RunLayout(cfg.run_dir).base
    encoder = train_config(cfg).encoder
    mark = stages.fingerprint(encoder)
    if not storage.is_file(RunLayout.success(folder)) or storage.read_text(RunLayout.success(folder)) != mark:
        if adapted(cfg):
            adapt_stage(cfg)
        remote = ray.remote(_save_base).options(num_cpus=cfg.train.cpus_per_worker,
                                                num_gpus=1 if cfg.train.use_gpu else 0)
        ray.get(remote.remote(encoder.model_dump(mode="json"), folder))
        storage.write_text(RunLayout.success(folder), mark)
    return folder


def adapt_fingerprint(cfg: PipelineConfig) -> str:
    """What the adapter depends on: the adaptation config and how the encoder reads text."""
    enc = cfg.train.encoder
    reads = {k: getattr(enc, k) for k in ("backbone", "attention", "prompt_format", "document_template",
                                          "append_eos", "attn_implementation")}
    return stages.digest([cfg.adapt.model_dump(mode="json", exclude=set(cfg.adapt.runtime_fields)), reads,
                          cfg.synthesis.seed_sources])


def fetch(cfg: PipelineConfig) -> dict[str, str]:
    """Fetch the pinned models and data into this node's cache, and publish the training seeds of
    `synthesis.seed_sources` into run_dir/fetch so every node (and an object-store run_dir) reads the
    same seed file."""
    from mgh_ray import assets, corpora

    run = RunLayout(cfg.run_dir)
    paths = assets.fetch_all()
    paths.update({f"table:{k}": str(corpora.table_path(k)) for k in corpora.build_all()})
    seeds_loc = run.seeds
    storage.write_bytes(seeds_loc, corpora.seeds_path(cfg.synthesis.seed_sources).read_bytes())
    paths["published:seeds"] = seeds_loc
    storage.write_text(run.assets, json.dumps(paths, indent=1))
    save_config(cfg, run.fetch)
    return paths


def fetch_stage(cfg: PipelineConfig) -> None:
    """The fetch stage as the pipeline runs it (reused when done with these settings)."""
    stages.run_stage(RunLayout(cfg.run_dir).fetch, "fetch", fetch_fingerprint(cfg), lambda: fetch(cfg),
              cfg.ray.node_loss_retries)


def published_seeds(cfg: PipelineConfig) -> str:
    """run_dir/fetch/seeds.parquet: the default seeds, readable from every node. A stage that reads them
    before the fetch stage ran (`mgh-ray synthesize`, `mine` or `adapt` first on a new run_dir) runs that
    stage here, so it records the seed file the pipeline records, and a later `mgh-ray pipeline` or
    `ablate` resumes its folder instead of refusing it as a run with other settings."""
    loc = RunLayout(cfg.run_dir).seeds
    if not storage.is_file(loc):
        fetch_stage(cfg)
    return loc


def seeds_of(cfg: PipelineConfig) -> SynthesisConfig:
    """The synthesis config, its default seeds pointing at the published copy in run_dir/fetch."""
    if cfg.synthesis.seeds is not None or cfg.synthesis.mode == "generate":
        return cfg.synthesis
    return cfg.synthesis.model_copy(update={"seeds": published_seeds(cfg)})


def mining_of(cfg: PipelineConfig) -> MiningConfig:
    """The mining config, its default seeds pointing at the published copy in run_dir/fetch."""
    if cfg.mining.seeds is not None:
        return cfg.mining
    return cfg.mining.model_copy(update={"seeds": published_seeds(cfg)})


def synthesize(cfg: PipelineConfig) -> dict:
    from mgh_ray import synthesis

    return synthesis.synthesize(seeds_of(cfg), RunLayout(cfg.run_dir).synthesize)


def train(cfg: PipelineConfig, records_dir: str | None = None) -> str:
    from mgh_ray import records, training

    records_dir = storage.normalize(records_dir) if records_dir else RunLayout(cfg.run_dir).synthesize
    if not records.shard_files(records_dir):
        raise FileNotFoundError(f"no synthesized records in {records_dir}: run `mgh-ray synthesize` first "
                                f"(or pass the folder of an earlier run)")
    if adapted(cfg):  # a bidirectional encoder starts from the adaptation stage's adapter
        adapt_stage(cfg)
    return training.train(train_config(cfg), records_dir, RunLayout(cfg.run_dir).train)


def trained_model(cfg: PipelineConfig) -> str:
    return RunLayout(cfg.run_dir).model


def serve(cfg: PipelineConfig, model_dir: str | None = None, keep: bool = False) -> dict:
    """Deploy the trained model and check that served vectors equal in-process ones.

    The parity check's in-process encoder runs in a Ray task with a replica's resources, not in the
    driver. The pipeline undeploys the app afterwards (`keep=False`): evaluation starts its own
    replicas, and on a small machine the CPUs are better spent there. `mgh-ray serve` keeps it up."""
    import ray

    from mgh_ray import corpora, serving

    run = RunLayout(cfg.run_dir)
    model_dir = storage.normalize(model_dir) if model_dir else trained_model(cfg)
    if not storage.is_file(storage.join(model_dir, "encoder.yaml")):
        raise FileNotFoundError(f"no model folder {model_dir}: run `mgh-ray train` first, or pass --model")
    texts = corpora.table("bbc_eval").title.head(16).tolist()
    url = serving.deploy(cfg.serve, model_dir, name=cfg.serve.app_name)
    try:
        parity = ray.remote(num_cpus=cfg.serve.num_cpus, num_gpus=cfg.serve.num_gpus)(serving.check_parity)
        cos = ray.get(parity.remote(cfg.serve, model_dir, texts))
    finally:
        if not keep:
            serving.undeploy(cfg.serve.app_name)
    info = {"url": url, "model": str(model_dir), "parity_min_cosine": cos, "kept_running": keep}
    storage.write_text(run.serve_info, json.dumps(info, indent=1))
    save_config(cfg.serve, run.serve)
    if cos < (floor := serving.parity_floor(cfg.serve)):
        raise RuntimeError(f"served vectors differ from in-process ones (min cosine {cos:.6f} < {floor})")
    return info


def like_seeds(cfg: PipelineConfig, task_names: list[str] | None = None) -> list[str]:
    """The evaluation tasks shaped like the training seeds (none known for a seed file of the user's)."""
    from mgh_ray import tasks

    names = cfg.evaluate.tasks if task_names is None else task_names
    return [] if cfg.synthesis.seeds is not None else tasks.like_seeds(names, cfg.synthesis.seed_sources)


def evaluate(cfg: PipelineConfig, models: dict[str, str] | None = None) -> pd.DataFrame:
    from mgh_ray import evaluation

    run = RunLayout(cfg.run_dir)
    models = models or {"base": base_model(cfg), "trained": trained_model(cfg)}
    local = stages.stage_dir(run.evaluate)
    scores = evaluation.evaluate(cfg.evaluate, models, local, cfg.serve, like_seeds=like_seeds(cfg))
    scores.to_csv(local / SCORES_FILE)
    save_config(cfg.evaluate, str(local))
    stages.publish(local, run.evaluate)
    return scores


def fetch_fingerprint(cfg: PipelineConfig) -> str:
    # "fetch" alone for the default seeds: run folders made before seed_sources existed stay valid
    sources = cfg.synthesis.seed_sources
    return "fetch" if sources == ["bbc"] else "fetch:" + "+".join(sources)


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """All stages in order, skipping finished ones; returns the evaluation table (task x model)."""
    run = RunLayout(cfg.run_dir)
    init_ray(cfg.ray)
    check_cluster(cfg)
    storage.check_writable(run.run_dir)  # a missing bucket or credentials fail before any stage
    save_config(cfg, run.run_dir)
    f_fetch = fetch_fingerprint(cfg)
    f_syn = stages.fingerprint(cfg.synthesis)
    f_train = train_fingerprint(cfg)
    f_eval = stages.fingerprint(cfg.synthesis, train_config(cfg), cfg.evaluate, cfg.serve)
    plan: list[tuple[str, str, str, Callable[[], object]]] = [
        ("fetch", run.fetch, f_fetch, lambda: fetch(cfg)),
        ("synthesize", run.synthesize, f_syn, lambda: synthesize(cfg)),
        *([("adapt", run.adapt, adapt_fingerprint(cfg), lambda: adapt(cfg))] if adapted(cfg) else []),
        ("train", run.train, f_train, lambda: train(cfg)),
        ("serve", run.serve, f_eval, lambda: serve(cfg)),
        ("evaluate", run.evaluate, f_eval, lambda: evaluate(cfg)),
    ]
    for i, (name, folder, fp, fn) in enumerate(plan, 1):
        log.info("[%d/%d] %s", i, len(plan), name)
        stages.run_stage(folder, name, fp, fn, cfg.ray.node_loss_retries)
    return scores_of(cfg)


def scores_of(cfg: PipelineConfig) -> pd.DataFrame:
    """The evaluation table of a finished run."""
    import io

    text = storage.read_text(RunLayout(cfg.run_dir).scores)
    return pd.read_csv(io.StringIO(text), index_col=0)
