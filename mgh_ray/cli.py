"""The `mgh-ray` command: one subcommand per stage, each taking a config file and dotlist overrides.

    mgh-ray fetch jobs/configs/tiny.yaml
    mgh-ray synthesize jobs/configs/tiny.yaml synthesis.num_seeds=32
    mgh-ray train jobs/configs/tiny.yaml train.steps=40
    mgh-ray serve jobs/configs/tiny.yaml            # deploys, checks parity, stays up until Ctrl-C
    mgh-ray evaluate jobs/configs/tiny.yaml --model base=runs/tiny/base --model trained=runs/tiny/train/model
    mgh-ray pipeline jobs/configs/tiny.yaml         # all of the above, resumable
    mgh-ray ablate jobs/configs/tiny.yaml
    mgh-ray benchmark jobs/configs/tiny.yaml --stage synthesis

The same commands run on a cluster through `ray job submit ... -- python -m jobs.<verb> CONFIG ...`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mgh_ray import config, driver, logs, storage
from mgh_ray.config import ConfigError
from mgh_ray.layout import RunLayout

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-granularity hard negatives, curriculum training and ATA pooling on Ray.")

CONFIG = typer.Argument(..., exists=False, help="YAML config, e.g. jobs/configs/tiny.yaml")
OVERRIDES = typer.Argument(None, help="dotlist overrides, e.g. train.steps=20 run_dir=runs/x")


def _setup(config_path: Path, overrides: list[str] | None):
    from mgh_ray import pipeline

    logs.setup()
    try:
        cfg = config.load(pipeline.PipelineConfig, config_path, overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return cfg


def _ray(cfg, stages: list[str] | None = None) -> None:
    """Connect to (or start) the cluster, then refuse at once what the command's `stages` can never be
    placed on there, naming what they ask and what the cluster has."""
    from mgh_ray import pipeline

    pipeline.init_ray(cfg.ray)
    if stages:
        try:
            pipeline.check_cluster(cfg, stages)
        except pipeline.PlacementError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


def _table(df) -> str:
    return df.to_markdown(floatfmt=".4f")


def _scores(df) -> str:
    """A task x model score table, best per task in bold."""
    from mgh_ray import report

    return report.markdown_table(df)


@app.command()
def fetch(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Fetch, verify and cache the pinned models and data (offline when the cache is warm)."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    typer.echo(json.dumps(pipeline.fetch(cfg), indent=1))


@app.command()
def synthesize(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Write graded hard negatives for the seeds with vLLM actors over Ray Data (resumable)."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    _ray(cfg, ["synthesize"])
    report = pipeline.synthesize(cfg)
    typer.echo(json.dumps(report, indent=1, default=str))


@app.command()
def mine(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Mined-negative baseline: graded negatives from the seed corpus by the reference embedder."""
    from mgh_ray import mining, pipeline

    cfg = _setup(config_path, overrides)
    _ray(cfg)
    mined = mining.mine(pipeline.mining_of(cfg), RunLayout(cfg.run_dir).mine)
    typer.echo(json.dumps(mined, indent=1, default=str))


@app.command()
def adapt(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """MNTP adaptation of a bidirectional encoder (LLM2Vec), the base `train` starts from; resumes."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    if not pipeline.adapted(cfg):
        typer.echo("error: adaptation is for a bidirectional encoder: set train.encoder.attention=bidirectional "
                   "(and adapt.steps > 0)", err=True)
        raise typer.Exit(2)
    _ray(cfg, ["adapt"])
    typer.echo(pipeline.adapt_stage(cfg))


@app.command()
def train(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES,
          records: str = typer.Option(None, help="folder of records, path or URI (default: RUN_DIR/synthesize)")) -> None:
    """Train the embedder with Ray Train (DDP, LoRA, ATA pooling, curriculum); resumes."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    _ray(cfg, ["adapt", "train"])
    typer.echo(str(pipeline.train(cfg, records)))


@app.command()
def serve(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES,
          model: str = typer.Option(None, help="encoder folder, path or URI (default: RUN_DIR/train/model)"),
          block: bool = typer.Option(True, help="stay up until Ctrl-C")) -> None:
    """Deploy the embedder on Ray Serve (/v1/embeddings) and check served == in-process vectors."""
    from mgh_ray import pipeline
    from mgh_ray.serving import lifecycle

    cfg = _setup(config_path, overrides)
    # Ctrl-C or SIGTERM at any point: delete what this command started, within seconds
    with lifecycle.serving_until_signal(cfg.serve.app_name):
        _ray(cfg, ["serve"])
        info = pipeline.serve(cfg, model, keep=block)
        typer.echo(json.dumps(info, indent=1))
        if block:
            typer.echo(f"serving at {info['url']}/v1/embeddings; Ctrl-C to stop")
            lifecycle.block()


@app.command()
def evaluate(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES,
             model: list[str] = typer.Option(None, help="NAME=FOLDER or NAME=http://host:port, repeatable "
                                                        "(default: base and trained of RUN_DIR)")) -> None:
    """Run the MTEB tasks (the project's, or any of mteb's registry by name) through Serve replicas and
    write the report."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    _ray(cfg, ["evaluate"])
    models = None
    if model:
        bad = [m for m in model if "=" not in m]
        if bad:
            typer.echo(f"error: --model takes NAME=FOLDER, got {bad}", err=True)
            raise typer.Exit(2)
        models = {k: v if v.startswith(("http://", "https://")) else storage.normalize(v)
                  for k, v in (m.split("=", 1) for m in model)}
    scores = pipeline.evaluate(cfg, models)
    typer.echo(_scores(scores))
    typer.echo(f"report: {RunLayout.report(RunLayout(cfg.run_dir).evaluate)}")


@app.command("pipeline")
def pipeline_(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """fetch -> synthesize -> train -> serve -> evaluate, reusing finished stages of the run folder."""
    from mgh_ray import pipeline

    cfg = _setup(config_path, overrides)
    driver.forbid_model_loads()  # a cluster head (cluster.yaml: CPU 0) must never hold a model
    scores = pipeline.run_pipeline(cfg)
    out = RunLayout(cfg.run_dir).evaluate
    typer.echo("\n" + _scores(scores))
    if {"base", "trained"} <= set(scores.columns) and "mean" in scores.index:
        delta = scores.loc["mean", "trained"] - scores.loc["mean", "base"]
        typer.echo(f"\ntrained - base, mean over tasks: {delta:+.4f}")
    typer.echo(f"report: {RunLayout.report(out)}\nplot:   {RunLayout.plot(out)}")


@app.command()
def ablate(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """The paper's ablations: negative schedule and pooling, same seeds and steps for every arm."""
    from mgh_ray import ablation

    cfg = _setup(config_path, overrides)
    driver.forbid_model_loads()
    _ray(cfg, ["synthesize", "adapt", "train", "evaluate"])
    for name, table in ablation.run_ablation(cfg).items():
        typer.echo(f"\n## {name}\n{_table(table)}")


@app.command()
def benchmark(config_path: Path = CONFIG, overrides: list[str] = OVERRIDES,
              stage: str = typer.Option("synthesis", help="synthesis | synthesis-levers | training | serving | "
                                                                      "serving-peers | serving-outage | pooling | dataplane | "
                                                                      "cluster")) -> None:
    """Speed benchmarks against a baseline in the same run; prints and saves a table."""
    from mgh_ray.benchmarks import serving, synthesis, training

    cfg = _setup(config_path, overrides)
    out = Path(RunLayout(cfg.run_dir).benchmarks)  # benchmarks write local tables
    if stage == "cluster":  # starts its own clusters: no Ray in this process
        from mgh_ray.benchmarks import cluster as cluster_bench

        typer.echo(_table(cluster_bench.run(config_path, overrides or [], out)))
        return
    if stage == "pooling":  # ATA memory, chunked vs not: no Ray needed
        from mgh_ray.benchmarks import pooling

        typer.echo(_table(pooling.run(out, budgets=[64.0, cfg.train.encoder.pooling.ata_chunk_mb])))
        return
    _ray(cfg)
    if stage == "synthesis":
        table = synthesis.run(cfg.synthesis, out)
    elif stage == "synthesis-levers":
        from mgh_ray.benchmarks import synthesis_levers

        table = synthesis_levers.run(cfg.synthesis, out)
    elif stage == "training":
        table = training.run(cfg.train, out)
    elif stage in ("serving", "serving-peers", "serving-outage"):
        from mgh_ray import pipeline
        from mgh_ray.benchmarks import outage, serving_peers

        model = pipeline.trained_model(cfg)
        model = model if storage.is_dir(model) else pipeline.base_model(cfg)
        if stage == "serving":
            table = serving.run(cfg.serve, cfg.evaluate, model, out)
        elif stage == "serving-outage":
            table = outage.run(cfg.serve, model, out)
        else:
            table = serving_peers.run(cfg.serve, model, out)
    elif stage == "dataplane":
        from mgh_ray.benchmarks import dataplane

        table = dataplane.run(out)
    else:
        typer.echo(f"error: unknown stage {stage!r}; use synthesis, synthesis-levers, training, serving, "
                   "serving-peers, serving-outage, pooling, dataplane or cluster",
                   err=True)
        raise typer.Exit(2)
    typer.echo(_table(table))


cluster_app = typer.Typer(no_args_is_help=True, help="A local autoscaling Ray cluster (Ray's fake multi-node "
                          "provider): a CPU: 0 head, CPU workers and GPU-worker stand-ins started on demand.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(local: bool = typer.Option(False, "--local", help="on this machine (the only kind here; "
                                          "a cloud cluster: `ray up cluster.yaml`)"),
               overrides: list[str] = typer.Argument(None, help="LocalClusterConfig overrides, e.g. "
                                                     "cpu_workers=3 idle_timeout_minutes=1")) -> None:
    """Start the local autoscaling cluster: head on 127.0.0.1:6379, Jobs API on 127.0.0.1:8265."""
    from mgh_ray import cluster

    if not local:
        typer.echo("error: only `mgh-ray cluster up --local` is built in; for AWS use `ray up cluster.yaml`",
                   err=True)
        raise typer.Exit(2)
    logs.setup()
    try:
        lc = config.override(cluster.LocalClusterConfig(), overrides or [])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    c = cluster.up(lc)
    auth = (f"token auth on: clients send the token in {lc.token_path or '~/.ray/auth_token'} (`ray job submit` "
            "and ray.init need RAY_AUTH_MODE=token in their environment)" if c.token else "token auth off")
    typer.echo(f"local cluster up ({auth})\n  export RAY_ADDRESS={c.dashboard_url}   # for `ray job submit`\n"
               f"  ray.init(address=\"{c.address}\")\nnode types: {c.config_path}\nstop: mgh-ray cluster down")


@cluster_app.command("down")
def cluster_down(temp_dir: str = typer.Option("/tmp/mgh-ray", help="the temp_dir it was started with")) -> None:
    """Stop the local cluster: every process it started, and nothing else."""
    from mgh_ray import cluster

    n = cluster.down(cluster.LocalClusterConfig(temp_dir=temp_dir))
    typer.echo(f"stopped {n} processes" if n else f"no local cluster runs in {temp_dir}")


@app.command()
def report(scores_csv: Path = typer.Argument(..., help="an evaluation's scores.csv")) -> None:
    """Write report.md and scores.png again beside an evaluation's scores.csv."""
    import pandas as pd

    from mgh_ray import report as report_io

    logs.setup()
    if not scores_csv.is_file():
        typer.echo(f"error: {scores_csv} does not exist (an evaluation writes RUN_DIR/evaluate/scores.csv)",
                   err=True)
        raise typer.Exit(2)
    md, png = report_io.write(pd.read_csv(scores_csv, index_col=0), scores_csv.parent)
    typer.echo(f"report: {md}\nplot:   {png}")


@app.command("check-cluster")
def check_cluster(cluster_file: Path = typer.Argument(..., help="cluster launcher file, e.g. cluster.yaml"),
                  config_path: Path = CONFIG, overrides: list[str] = OVERRIDES) -> None:
    """Does every stage's resource request fit the cluster's node types at their max_workers?"""
    from mgh_ray import pipeline, placement

    try:
        cfg = config.load(pipeline.PipelineConfig, config_path, overrides or [])
        problems = placement.check_file(cfg, cluster_file)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for problem in problems:
        typer.echo(f"does not fit: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"every stage of {config_path} fits {cluster_file}")


if __name__ == "__main__":
    app()
