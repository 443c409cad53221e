"""The whole pipeline as one resumable job: fetch -> synthesize -> train -> serve -> evaluate -> report.

One config (`PipelineConfig`, composed of every stage's own section) drives all stages. Each stage
writes into its own folder under `run_dir` with its resolved config, and marks completion with a
`_SUCCESS` file that holds a fingerprint of the config it depends on. A rerun skips finished stages
whose fingerprint still matches, resumes the first unfinished one (synthesis resumes row by row,
training from its last checkpoint), and refuses to mix a finished stage made with a different config
(it names the stage and tells how to start over).

    mgh-ray pipeline jobs/configs/tiny.yaml            # or: python -m jobs.pipeline jobs/configs/tiny.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from pydantic import Field

from mgh_ray import config
from mgh_ray.config import Section
from mgh_ray.evaluation import EvalConfig
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


class AblationConfig(Section):
    """The paper's two ablations (see ablation.py); every arm gets the same seeds and steps."""

    schedules: list[str] = ["curriculum", "level_1", "level_2", "level_3", "level_4", "random", "reverse",
                            "cumulative", "in_batch", "mined"]
    poolings: list[str] = ["ata", "mean", "last", "weighted_mean"]
    seeds: list[int] = [0]
    steps: int | None = Field(None, ge=1, strict=True)  # None: train.steps
    tasks: list[str] | None = None  # None: evaluate.tasks


class PipelineConfig(Section):
    run_dir: str = "runs/tiny"
    ray: RayConfig = Field(default_factory=RayConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
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

    if ray.is_initialized():
        return
    address = existing_cluster(cfg)
    if address is not None:
        if cfg.num_cpus is not None:
            log.info("connecting to the running cluster at %s: ray.num_cpus=%d applies to new local clusters "
                     "only and is ignored", address, cfg.num_cpus)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(address="local", num_cpus=cfg.num_cpus,
             include_dashboard=cfg.include_dashboard, log_to_driver=True)


class StaleStageError(RuntimeError):
    """A finished stage in the run folder was made with a different config."""


def fingerprint(*sections: Section) -> str:
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_stage(folder: Path, name: str, print_: str, fn: Callable[[], object]) -> bool:
    """Run `fn` unless `folder` holds a matching _SUCCESS; returns True if it ran."""
    marker = folder / "_SUCCESS"
    if marker.is_file():
        done = marker.read_text().strip()
        if done == print_:
            log.info("stage %s: done earlier, reusing %s", name, folder)
            return False
        raise StaleStageError(
            f"stage {name!r} in {folder} was finished with a different config (fingerprint {done}, now "
            f"{print_}). Use a new run_dir=..., or delete {folder} (and the stages after it) to redo it.")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log.info("stage %s: running into %s", name, folder)
    fn()
    marker.write_text(print_)
    log.info("stage %s: finished in %.0f s", name, time.time() - start)
    return True


def base_model(cfg: PipelineConfig, run: Path) -> Path:
    """The untrained backbone with the same pooling, saved as an encoder folder for comparison."""
    from mgh_ray.encoder import Encoder

    folder = run / "base"
    if not (folder / "_SUCCESS").is_file():
        Encoder.from_config(cfg.train.encoder).save(folder)
        (folder / "_SUCCESS").write_text("base")
    return folder


def fetch(cfg: PipelineConfig) -> dict[str, str]:
    from mgh_ray import assets, corpora

    paths = assets.fetch_all()
    paths.update({f"table:{k}": str(corpora.table_path(k)) for k in corpora.build_all()})
    folder = Path(cfg.run_dir) / "fetch"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "assets.json").write_text(json.dumps(paths, indent=1))
    return paths


def synthesize(cfg: PipelineConfig) -> dict:
    from mgh_ray import synthesis

    return synthesis.synthesize(cfg.synthesis, Path(cfg.run_dir) / "synthesize")


def train(cfg: PipelineConfig, records_dir: Path | None = None) -> Path:
    from mgh_ray import synthesis, training

    records_dir = records_dir or Path(cfg.run_dir) / "synthesize"
    if not (records_dir / "records").is_dir():
        raise FileNotFoundError(f"no synthesized records in {records_dir}: run `mgh-ray synthesize` first "
                                f"(or pass the folder of an earlier run)")
    return training.train(cfg.train, synthesis.read_records(records_dir), Path(cfg.run_dir) / "train")


def trained_model(cfg: PipelineConfig) -> Path:
    return Path(cfg.run_dir) / "train" / "model"


def serve(cfg: PipelineConfig, model_dir: Path | None = None, keep: bool = False) -> dict:
    """Deploy the trained model and check that served vectors equal in-process ones.

    The pipeline undeploys it afterwards (`keep=False`): evaluation starts its own replicas, and on a
    small machine the CPUs are better spent there. `mgh-ray serve` keeps it up."""
    from mgh_ray import corpora, serving

    model_dir = model_dir or trained_model(cfg)
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model folder {model_dir}: run `mgh-ray train` first, or pass --model")
    texts = corpora.table("bbc_eval").title.head(16).tolist()
    url = serving.deploy(cfg.serve, model_dir, name=cfg.serve.app_name)
    try:
        cos = serving.check_parity(cfg.serve, model_dir, texts)
    finally:
        if not keep:
            serving.undeploy(cfg.serve.app_name)
    info = {"url": url, "model": str(model_dir), "parity_min_cosine": cos, "kept_running": keep}
    folder = Path(cfg.run_dir) / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serve.json").write_text(json.dumps(info, indent=1))
    if cos < 0.9999:
        raise RuntimeError(f"served vectors differ from in-process ones (min cosine {cos:.6f} < 0.9999)")
    return info


def evaluate(cfg: PipelineConfig, models: dict[str, Path | str] | None = None) -> pd.DataFrame:
    from mgh_ray import evaluation

    run = Path(cfg.run_dir)
    models = models or {"base": base_model(cfg, run), "trained": trained_model(cfg)}
    scores = evaluation.evaluate(cfg.evaluate, models, run / "evaluate", cfg.serve)
    scores.to_csv(run / "evaluate" / "scores.csv")
    return scores


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """All stages in order, skipping finished ones; returns the evaluation table (task x model)."""
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    config.save(cfg, run / "config.yaml")
    init_ray(cfg.ray)
    f_syn = fingerprint(cfg.synthesis)
    f_train = fingerprint(cfg.synthesis, cfg.train)
    f_eval = fingerprint(cfg.synthesis, cfg.train, cfg.evaluate, cfg.serve)
    plan: list[tuple[str, str, Callable[[], object]]] = [
        ("fetch", "fetch", lambda: fetch(cfg)),
        ("synthesize", f_syn, lambda: synthesize(cfg)),
        ("train", f_train, lambda: train(cfg)),
        ("serve", f_eval, lambda: serve(cfg)),
        ("evaluate", f_eval, lambda: evaluate(cfg)),
    ]
    for i, (name, fp, fn) in enumerate(plan, 1):
        log.info("[%d/%d] %s", i, len(plan), name)
        run_stage(run / name, name, fp, fn)
    return pd.read_csv(run / "evaluate" / "scores.csv", index_col=0)
