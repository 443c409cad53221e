"""The record schema's home: shards, the folder check, and the gated view training reads."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from mgh_ray import quality, records
from mgh_ray.layout import RunLayout
from mgh_ray.records import GEN_COLS, LEVELS, RECORD_COLS, SIM_COLS


def _records(n: int, start: int = 0) -> pd.DataFrame:
    rows = []
    for i in range(start, start + n):
        rows.append({"id": f"r{i}", "seed_id": f"s{i}", "mode": "augment", "kind": "short-long", "task": "",
                     "query": f"query {i}", "positive": f"positive {i}", "instruction": "Find it",
                     **{g: f"negative {k} of {i}" for k, g in zip(LEVELS, GEN_COLS)},
                     "attempts": 1, "retries": 0, "gen_tokens": 10, "prompt_version": "v", "model": "m",
                     "sampling": "{}", "sim_pos": 0.9,
                     **{f"sim_{k}": 0.1 * k for k in LEVELS}, **{f"simp_{k}": 0.1 for k in LEVELS}})
    return pd.DataFrame(rows, columns=RECORD_COLS + list(SIM_COLS))


def test_shards_are_content_addressed_and_scanned(tmp_path):
    folder = str(tmp_path)
    a = records.write_shard(_records(3), RunLayout.records(folder))
    assert records.write_shard(_records(3), RunLayout.records(folder)) == a  # same rows, same file
    records.write_shard(_records(2, start=3), RunLayout.records(folder))
    assert records.scan(folder) == {"files": 2, "rows": 5, "unique": 5, "problems": [], "duplicates": []}


def test_a_copied_shard_is_an_error_naming_both_files(tmp_path):
    folder = str(tmp_path)
    a = records.write_shard(_records(3), RunLayout.records(folder))
    shutil.copy(a, tmp_path / "records" / "copy-of-it.parquet")
    with pytest.raises(records.RecordsError, match=r"shard-\w+.parquet repeats 3 id\(s\) of .*copy-of-it.parquet"):
        records.scan(folder)


def test_foreign_and_truncated_files_are_named(tmp_path):
    folder = str(tmp_path)
    good = records.write_shard(_records(3), RunLayout.records(folder))
    pd.DataFrame({"id": ["x"], "other": [1]}).to_parquet(tmp_path / "records" / "foreign.parquet")
    data = open(good, "rb").read()
    (tmp_path / "records" / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(records.RecordsError) as err:
        records.scan(folder)
    text = str(err.value)
    assert "foreign.parquet: lacks column(s) ['query', 'positive'" in text
    assert "cut.parquet: cannot be read as parquet" in text and "delete it and rerun" in text


@pytest.mark.integration
def test_gated_view_is_a_dataset_of_training_columns(tmp_path, ray_cluster):
    folder = str(tmp_path)
    records.write_shard(_records(4), RunLayout.records(folder))
    bad = _records(1, start=4).assign(sim_4=0.95)  # its finest negative scores above the positive
    records.write_shard(bad, RunLayout.records(folder))
    ds = quality.gated(folder, policy="drop")
    df = ds.to_pandas()
    assert sorted(df["id"]) == ["r0", "r1", "r2", "r3"]
    assert df.columns.tolist()[: len(records.TRAIN_COLS)] == records.TRAIN_COLS
    assert (df["neg_1"] == df["id"].str.replace("r", "negative 1 of ", regex=False)).all()
    assert len(quality.gated_frame(folder, policy="keep")) == 5
    # the ablation's reference_levels arm reads this way: a record whose LLM levels run against the
    # reference embedder's similarities comes back with its negatives ordered by those similarities
    swapped = _records(1, start=5).assign(sim_1=0.4, sim_4=0.1)
    records.write_shard(swapped, RunLayout.records(folder))
    relabelled = quality.gated(folder, policy="relabel").to_pandas().set_index("id")
    assert relabelled.columns.tolist()[: len(records.TRAIN_COLS) - 1] == records.TRAIN_COLS[1:]
    assert relabelled.loc["r5", ["neg_1", "neg_4"]].tolist() == ["negative 4 of 5", "negative 1 of 5"]
    assert relabelled.loc["r0", "neg_1"] == "negative 1 of 0"  # already in order: unchanged


@pytest.mark.integration
def test_records_are_read_by_ray_datas_first_parquet_reader(tmp_path, ray_cluster, capsys):
    """`records.read_parquet` turns Ray 2.60's DataSourceV2 off for its own call (a ListFiles task took
    3.5 s to list two small shards; its docstring): one read operator, no ListFiles, the columns asked
    for, and the session's DataContext left as it was."""
    import ray.data

    folder = str(tmp_path)
    files = [records.write_shard(_records(3), RunLayout.records(folder))]
    ray.data.read_parquet(files).explain()  # Ray's default, for contrast
    assert "ListFiles" in capsys.readouterr().out
    ctx = ray.data.DataContext.get_current()
    setting = ctx.use_datasource_v2
    ds = records.read(folder, columns=["id", "query"])
    assert ctx.use_datasource_v2 == setting
    ds.explain()
    plan = capsys.readouterr().out
    assert "ReadParquet" in plan and "ListFiles" not in plan, plan
    df = ds.to_pandas()
    assert df.columns.tolist() == ["id", "query"] and sorted(df["id"]) == ["r0", "r1", "r2"]
