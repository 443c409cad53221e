"""MTEB evaluation through Ray Serve: encode batches spread over replicas, tasks fanned out as Ray tasks.

For every named model (an encoder folder, or the URL of a running endpoint), `evaluate`:
1. skips the tasks whose results already sit in `out_dir/results` for this model revision and task
   size (mteb's own result folder format, `results/<model>/<revision>/<task>.json`);
2. deploys the folder as a handle-only Serve app with `num_replicas` replicas (a URL is used as is);
3. runs each remaining task as one Ray task calling `mteb.evaluate` with a `mteb_adapters.ServedEncoder`: it cuts
   the texts into `batch_size` requests and keeps up to `concurrency` in flight, so they spread over
   the replicas (a `DeploymentHandle` inside the cluster, HTTP outside);
4. saves each result as it lands, removes the app, and finally writes `report.md` and `scores.png`.

Intervals: each task also saves mteb's predictions, from which `resampling.replicates` draws
`bootstrap` resamples of the task's rows (queries, pairs, test items, documents) and recomputes the main
score on each; the replicates are kept in `bootstrap/<model>/<revision>/<task>.json`, and report.md gives
the 95% interval of every task and of every mean (a mean's replicate is the mean of its tasks'
replicates). The intervals measure how much a score would move on other rows like these; the spread over
training seeds (the ablation's) is another question.

Instructions follow `tasks.instruction` for served and in-process encoders alike. `score_in_process`
runs the same tasks on an in-process encoder, for parity checks and baselines.

Long texts (full BBC articles run to ~25,000 characters): `EvalConfig.truncation` is the policy for
texts longer than the model reads, "truncate" by default (cut at the model's token limit, as the
encoders of the MTEB leaderboard do) or "error" (the run stops, naming the text). It goes to the
evaluation deployment and the in-process encoder alike, and report.md states it.

    mgh-ray evaluate jobs/configs/tiny.yaml --model base=runs/tiny/base --model trained=runs/tiny/train/model
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from mgh_ray.config import MAX_COUNT, Precision, Section
from mgh_ray.report import MEAN_LIKE, MEAN_UNLIKE, TASK_NAMES
from mgh_ray.serving import ServeConfig

if TYPE_CHECKING:  # mteb loads where tasks run, not where configs are read
    from mgh_ray.mteb_adapters import MtebAdapter

log = logging.getLogger(__name__)
# what precision=auto means, in report.md
AUTO_NOTE = " (bfloat16 autocast where the device does bf16 natively)"

class EvalConfig(Section):
    """Which tasks, how big, and how the work spreads over the cluster.

    `tasks` names the project's tasks (tasks.py) and any task of mteb's registry (`STS12`, ...);
    `benchmark` names an mteb benchmark (`mteb.get_benchmark`, e.g. "MTEB(eng, v2)") whose tasks are
    evaluated too: alone when `tasks` is not given, else after them. Registry tasks run as mteb defines
    them (`max_rows` caps only the project's tables) and need their datasets in the local Hugging Face
    cache or the hub within reach; `evaluate_model` checks that before any replica starts."""

    tasks: list[str] = Field(default_factory=lambda: list(TASK_NAMES))
    benchmark: str | None = None
    max_rows: int | None = Field(40, ge=1, strict=True)  # seeded rows per table (None: all); ~4 min per SmolLM2 model here
    # per-task exceptions to max_rows, e.g. {LeeSTS: null}: every row of a small table
    max_rows_per_task: dict[str, int | None] = Field(default_factory=dict)
    bootstrap: int = Field(1000, ge=0, strict=True)  # resamples behind each 95% interval (0: no intervals)
    seed: int = Field(0, strict=True)
    batch_size: int = Field(32, ge=1, strict=True)  # texts per request to the deployment
    concurrency: int = Field(4, ge=1, strict=True)  # requests in flight per task
    num_replicas: int = Field(2, ge=1, le=MAX_COUNT, strict=True)  # replicas of the evaluation deployment
    # logical CPUs per evaluation replica (torch still gets one thread at least); None: the serve
    # config's num_cpus. Half a CPU lets 2 replicas fit beside a running serve app on a 2-CPU machine.
    replica_num_cpus: float | None = Field(0.5, ge=0)
    # the replicas' inference engine (ServeConfig.engine: torch or vllm); None: the serve config's
    engine: Literal["torch", "vllm"] | None = None
    # how the torch engine's replicas compute (ServeConfig.precision): "auto" is bfloat16 autocast where
    # the replica's device does bf16 natively (this CPU: 1.7x faster evaluation; the tiny demo's scores
    # moved by up to 0.013 a task, 0.004 on the mean, docs/benchmarks.md), float32 weights either way.
    # Results are kept per precision; the ablation uses float32 unless this is set. `score_in_process`
    # computes in the weights' dtype
    precision: Precision = "auto"
    task_num_cpus: float = Field(0.0, ge=0)  # per Ray task: they mostly wait on replicas, so never block
    # tasks running at once (each a Ray task whose worker process imports mteb, seconds of CPU):
    # None: one per replica, enough to keep the replicas busy; the next task reuses a finished one's worker
    tasks_in_flight: int | None = Field(None, ge=1, strict=True)
    overwrite: bool = False  # True: rerun tasks that already have results
    # texts longer than the model's token limit: cut there, or fail the task naming the text
    truncation: Literal["truncate", "error"] = "truncate"

    @field_validator("max_rows_per_task")
    @classmethod
    def _rows(cls, v: dict[str, int | None]) -> dict[str, int | None]:
        bad = {k: n for k, n in v.items() if n is not None and n < 1}
        if bad:
            raise ValueError(f"max_rows_per_task needs row counts >= 1 (or null for all), got {bad}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _benchmark(cls, data: Any) -> Any:
        # expanded once, on the raw values: a saved config (tasks already expanded) loads back the same
        if isinstance(data, dict) and data.get("benchmark"):
            from mgh_ray import tasks

            names = tasks.benchmark_tasks(data["benchmark"])
            explicit = list(data.get("tasks") or [])
            data = {**data, "tasks": list(dict.fromkeys([*explicit, *names]))}
        return data

    def rows(self, task: str) -> int | None:
        """The row cap of one task's tables."""
        return self.max_rows_per_task.get(task, self.max_rows)


def run_task(encoder: MtebAdapter, task_name: str, cfg: EvalConfig
             ) -> tuple[Any, dict[str, int], dict[str, Any] | None]:
    """One task through mteb's own evaluator; returns its TaskResult, the replicas that answered and,
    when `cfg.bootstrap`, the bootstrap replicates of its main score (`intervals.Bootstrap` as JSON)."""
    import tempfile

    import mteb

    from mgh_ray import resampling, tasks

    task = tasks.build(task_name, max_rows=cfg.rows(task_name), seed=cfg.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = mteb.evaluate(encoder, task, cache=None, overwrite_strategy="always", co2_tracker=False,
                            show_progress_bar=False, encode_kwargs={"batch_size": cfg.batch_size},
                            prediction_folder=tmp if cfg.bootstrap else None)
        boot = None
        if cfg.bootstrap and resampling.supports(task):
            # a task object mteb has evaluated cannot replay its clustering draws: build it afresh
            fresh = tasks.build(task_name, max_rows=cfg.rows(task_name), seed=cfg.seed)
            try:
                boot = resampling.replicates(fresh, Path(tmp) / task.prediction_file_name, cfg.bootstrap,
                                             cfg.seed).to_json()
            except resampling.NoBootstrap as exc:  # a registry task's metric or splits: scored, no interval
                log.info("%s: no bootstrap interval (%s)", task_name, exc)
        elif cfg.bootstrap:
            log.info("%s: no bootstrap interval for a %s task", task_name, task.metadata.type)
    log.info("%s on %s: %.4f in %.1f s (replicas %s)", encoder.mteb_model_meta.name, task_name,
             res.task_results[0].get_score(), time.perf_counter() - start, dict(encoder.replicas))
    return res.task_results[0], dict(encoder.replicas), boot


def score_in_process(cfg: EvalConfig, encoder: Any, name: str = "local") -> dict[str, float]:
    """Main score per task of an in-process encoder (no Serve, no Ray), same tasks and instructions, in
    the weights' dtype (`cfg.precision` is the replicas'): the reference a float32 evaluation matches."""
    from mgh_ray.mteb_adapters import LocalEncoder

    adapter = LocalEncoder(encoder, name, batch_size=cfg.batch_size, truncation=cfg.truncation)
    return {t: float(run_task(adapter, t, cfg)[0].get_score()) for t in cfg.tasks}


def bootstrap_file(out_dir: Path, name: str, revision: str, task: str) -> Path:
    """Where the bootstrap replicates of one model's task live (beside mteb's `results/`)."""
    return Path(out_dir) / "bootstrap" / name / revision / f"{task}.json"


def bootstraps(out_dir: Path, name: str, revision: str, task_names: list[str]) -> dict[str, Any]:
    """{task: intervals.Bootstrap} of one evaluated model (the tasks that have replicates)."""
    import json

    from mgh_ray.intervals import Bootstrap

    out = {}
    for t in task_names:
        path = bootstrap_file(out_dir, name, revision, t)
        if path.is_file():
            out[t] = Bootstrap.from_json(json.loads(path.read_text()))
    return out


def finished(cache: Any, task: Any, meta: Any) -> Any:
    """The stored result of `task` for this model if it is complete and of the same dataset revision."""
    old = cache.load_task_result(task.metadata.name, meta)
    if old is None or old.dataset_revision != task.metadata.revision or old.get_missing_evaluations(task):
        return None
    return old


def endpoint_url(model: Path | str) -> str | None:
    """The URL if `model` names a running endpoint (also after `Path("http://h")` ate a slash), else None."""
    match = re.match(r"^(https?):/+(.*)$", str(model))
    return f"{match.group(1)}://{match.group(2)}" if match else None


def eval_serve_config(cfg: EvalConfig, serve_cfg: ServeConfig) -> ServeConfig:
    """The serve config of an evaluation deployment: `num_replicas` fixed replicas of `replica_num_cpus`,
    with the evaluation's truncation policy (a full BBC article is longer than any model reads) and
    precision (the vLLM engine computes in its own dtype whatever the precision: "auto" leaves it that)."""
    update: dict[str, Any] = {
        "num_replicas": cfg.num_replicas, "autoscaling": None,
        "num_cpus": serve_cfg.num_cpus if cfg.replica_num_cpus is None else cfg.replica_num_cpus}
    if "truncation" in type(serve_cfg).model_fields:
        update["truncation"] = cfg.truncation
    if cfg.engine is not None:
        update["engine"] = cfg.engine
    update["precision"] = cfg.precision
    # validated as a whole: precision=bfloat16 on the vLLM engine is refused, naming the fix
    return type(serve_cfg).model_validate({**serve_cfg.model_dump(), **update})


def result_revision(cfg: EvalConfig, folder: Path | str) -> str:
    """The key of an encoder folder's results and replicates: the folder's revision, with the precision
    unless float32 (scores computed under bf16 autocast are other numbers, never reused for float32's)."""
    from mgh_ray import serving

    revision = serving.model_revision(folder)
    return revision if cfg.precision == "float32" else f"{revision}-{cfg.precision}"


def evaluate_model(cfg: EvalConfig, name: str, model: Path | str, out_dir: Path,
                   serve_cfg: ServeConfig | None = None, app: str | None = None
                   ) -> tuple[dict[str, Any], dict[str, int], str]:
    """Evaluate one model: an encoder folder (deployed here for the run, unless `app` names a Serve app
    already serving it) or an endpoint URL. Returns {task: TaskResult}, requests per replica, and the
    model's revision (the key of its results and replicates)."""
    import ray
    from mteb.cache import ResultCache

    from mgh_ray import mteb_adapters, serving, tasks

    serve_cfg = serve_cfg or ServeConfig()
    url = endpoint_url(model)
    if url:
        with serving.EmbeddingClient(url, serving.api_key(serve_cfg)) as client:
            card = client.models()[0]
        revision = card["revision"]
    else:
        revision = result_revision(cfg, model)
    cache = ResultCache(out_dir)
    results, todo, built = {}, [], {}
    for t in cfg.tasks:
        task = built[t] = tasks.build(t, max_rows=cfg.rows(t), seed=cfg.seed)
        old = None if cfg.overwrite else finished(cache, task, mteb_adapters.model_meta(name, revision, 0))
        if old is not None and cfg.bootstrap and not bootstrap_file(out_dir, name, revision, t).is_file():
            old = None  # finished before intervals were kept: run it again for its replicates
        if old is not None:
            results[t] = old
        else:
            todo.append(t)
    if results:
        log.info("%s: %d task(s) already finished, skipped: %s", name, len(results), ", ".join(results))
    if not todo:
        return results, {}, revision
    tasks.check_available(todo)  # a registry task whose data cannot be had fails here, before any replica
    if not ray.is_initialized():
        ray.init()
    own_app = url is None and app is None
    replicas: Counter[str] = Counter()
    try:
        if url is not None:
            encoder = mteb_adapters.ServedEncoder(name, revision, int(card["dim"]), url=url,
                                    api_key=serving.api_key(serve_cfg), batch_size=cfg.batch_size,
                                    concurrency=cfg.concurrency)
        else:
            if own_app:
                app = f"eval-{name}"
                serving.start_app(eval_serve_config(cfg, serve_cfg), str(model), app, route_prefix=None)
            from ray import serve

            info = serve.get_app_handle(app).info.remote().result()
            log.info("%s: %d replica(s) of the %s engine on %s, computing in %s", name, cfg.num_replicas,
                     info["engine"], info["device"], info["compute"])
            if info["revision"] != (folder_revision := serving.model_revision(model)):
                raise ValueError(f"Serve app {app!r} serves revision {info['revision']}, not {model} "
                                 f"({folder_revision})")
            encoder = mteb_adapters.ServedEncoder(name, revision, int(info["dim"]), app=app, batch_size=cfg.batch_size,
                                    concurrency=cfg.concurrency)
        remote = ray.remote(run_task).options(num_cpus=cfg.task_num_cpus, max_retries=1)
        waiting, pending = list(todo), {}
        in_flight = cfg.tasks_in_flight or cfg.num_replicas
        while waiting or pending:  # save each result as it lands, so an interrupted run keeps what it finished
            while waiting and len(pending) < in_flight:
                t = waiting.pop(0)
                pending[remote.remote(encoder, t, cfg)] = t
            done, _ = ray.wait(list(pending), num_returns=1)
            task_name = pending.pop(done[0])
            result, seen, boot = ray.get(done[0])
            if boot is not None:  # first, so that a saved result always has its replicates
                path = bootstrap_file(out_dir, name, revision, task_name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(boot))
            cache.save_to_cache(result, encoder.mteb_model_meta, encode_kwargs={"batch_size": cfg.batch_size})
            # as saved (mteb keeps 6 decimals): a score is the same number now and when a later run reuses it
            results[task_name] = finished(cache, built[task_name], mteb_adapters.model_meta(name, revision, 0)) or result
            replicas.update(seen)
    finally:
        if own_app and app is not None:
            serving.undeploy(app)
    return results, dict(replicas), revision


def scores_table(results: dict[str, dict[str, Any]], task_names: list[str],
                 like_seeds: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Main score per task (rows, in `task_names` order) and model (columns), plus a 'mean' row; when
    some tasks are shaped like the training seeds (`like_seeds`) and some are not, the mean of each
    group too (does the gain carry over to data unlike the seeds?)."""
    table = pd.DataFrame({m: {t: float(r[t].get_score()) for t in task_names if t in r}
                          for m, r in results.items()}).reindex(task_names)
    for name, group in mean_groups(task_names, like_seeds).items():
        table.loc[name] = table.loc[group].mean(axis=0)
    table.index.name = "task"
    return table


def mean_groups(task_names: list[str], like_seeds: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The means a table reports and their tasks: "mean" over all, and when some tasks are shaped like
    the training seeds and some are not, the mean of each group."""
    like = [t for t in task_names if t in like_seeds]
    unlike = [t for t in task_names if t not in like_seeds]
    return {"mean": list(task_names), **({MEAN_LIKE: like, MEAN_UNLIKE: unlike} if like and unlike else {})}


def interval_table(boots: dict[str, dict[str, Any]], task_names: list[str],
                   like_seeds: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """95% bootstrap intervals, long: one row per (model, task or mean) with point, low, high.

    boots: {model: {task: intervals.Bootstrap}}; a mean's interval needs every one of its tasks."""
    from mgh_ray import intervals

    rows = []
    for model, per_task in boots.items():
        for t in task_names:
            if t in per_task:
                iv = per_task[t].interval()
                rows.append({"model": model, "row": t, "point": iv.point, "low": iv.low, "high": iv.high})
        for name, group in mean_groups(task_names, like_seeds).items():
            if group and all(t in per_task for t in group):
                iv = intervals.mean_interval([per_task[t].values for t in group], [per_task[t].point for t in group])
                rows.append({"model": model, "row": name, "point": iv.point, "low": iv.low, "high": iv.high})
    return pd.DataFrame(rows, columns=["model", "row", "point", "low", "high"])


def evaluate(cfg: EvalConfig, models: dict[str, Path], out_dir: Path,
             serve_cfg: ServeConfig | None = None, like_seeds: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Evaluate every named model on `cfg.tasks` through Serve; write results, report.md (with the 95%
    bootstrap intervals), intervals.csv and scores.png. `like_seeds`: the tasks shaped like the training
    seeds (the table gets a mean for each group)."""
    from mgh_ray import report, tasks

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, boots = {}, {}
    for name, model in models.items():
        results[name], seen, revision = evaluate_model(cfg, name, model, out_dir, serve_cfg)
        boots[name] = bootstraps(out_dir, name, revision, cfg.tasks)
        if seen:
            log.info("%s: encode requests per replica %s", name, seen)
    table = scores_table(results, cfg.tasks, like_seeds)
    ivs = interval_table(boots, cfg.tasks, like_seeds)
    ivs.to_csv(out_dir / "intervals.csv", index=False)
    metas = {t: tasks.build(t).metadata for t in cfg.tasks}
    metrics = {t: f"{m.type}, {m.main_score}" for t, m in metas.items()}
    sizes = ", ".join(f"{t} {cfg.rows(t) or 'all'}" for t in cfg.tasks if cfg.rows(t) != cfg.max_rows)
    note = (f"{len(cfg.tasks)} offline tasks, max_rows={cfg.max_rows}{f' ({sizes})' if sizes else ''}, "
            f"seed={cfg.seed}, truncation={cfg.truncation} (texts longer than the model's token limit are "
            f"{'cut there' if cfg.truncation == 'truncate' else 'an error'}), precision={cfg.precision}"
            f"{AUTO_NOTE if cfg.precision == 'auto' else ''}; {time.perf_counter() - start:.0f} s.")
    if MEAN_LIKE in table.index:
        like = ", ".join(t for t in cfg.tasks if t in like_seeds)
        note += f" Shaped like the training seeds (held out of the same corpora): {like}; the rest are unlike them."
    report.write(table, out_dir, metrics=metrics, note=note, intervals=ivs, n_boot=cfg.bootstrap)
    log.info("main scores (%s):\n%s", out_dir, report.markdown_table(table))
    return table
