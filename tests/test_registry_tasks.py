"""mteb's registry tasks by name: the project's tasks in mteb's own lookup, a benchmark's task list, a
registry task evaluated end to end offline (`mgh-ray evaluate` with `evaluate.tasks=[STS12, LeeSTS]`)
from a Hugging Face datasets cache this test builds, and the error when no cache holds the dataset.

The STS12 rows below are made up for the test: they are NOT the real STS12 dataset, only rows in its
layout (sentence1, sentence2, score 0-5) under its name and revision."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import mteb
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from mgh_ray import evaluation, tasks

ROOT = Path(__file__).resolve().parents[1]

MADE_UP_PAIRS = [  # (sentence1, sentence2, score): written for this test, not STS12's text
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing an onion.", "Someone is cutting an onion.", 4.2),
    ("The cat sleeps on the sofa.", "A cat is asleep on a couch.", 4.5),
    ("Stocks fell sharply on Monday.", "Share prices dropped at the start of the week.", 3.9),
    ("The team won the final.", "The club lost the cup match.", 1.6),
    ("A child is riding a bike.", "A kid rides a bicycle down the street.", 3.7),
    ("The weather is sunny today.", "It is raining heavily.", 0.8),
    ("He opened the window.", "The window was opened by him.", 4.9),
    ("The government raised taxes.", "A dog is barking in the yard.", 0.0),
    ("A plane is taking off.", "An aircraft departs from the runway.", 4.0),
    ("She is reading a novel.", "A woman reads a book.", 3.8),
    ("The bank cut interest rates.", "The river bank was muddy.", 0.6),
    ("Two men are playing chess.", "Two people play a board game.", 3.2),
    ("The concert was cancelled.", "The show was called off.", 4.6),
    ("A boy kicks a ball.", "The stock market closed higher.", 0.2),
    ("The museum opens at nine.", "The gallery doors open at 9 am.", 4.1),
]


def build_hf_cache(hf_home: Path, path: str, revision: str, splits: dict[str, pd.DataFrame],
                   config: str = "default") -> Path:
    """A Hugging Face datasets cache that `load_dataset(path, revision=...)` reads offline: with the hub
    out of reach, datasets falls back to its cached builder, which reads
    `$HF_HOME/datasets/<ns>___<name>/<config>/0.0.0/<hash>/` (dataset_info.json and one Arrow file per
    split). Offline, the revision is not checked (the folder name is free)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase, filenames_for_dataset_split

    namespace, _, name = path.rpartition("/")
    dataset_name = camelcase_to_snakecase(name)
    folder = Path(hf_home) / "datasets" / f"{namespace}___{dataset_name}" / config / "0.0.0" / revision
    folder.mkdir(parents=True, exist_ok=True)
    split_dict = datasets.SplitDict(dataset_name=dataset_name)
    features = None
    for split, df in splits.items():
        ds = datasets.Dataset.from_pandas(df, preserve_index=False)
        features = features or ds.features
        (fname,) = filenames_for_dataset_split(str(folder), dataset_name=dataset_name, split=split,
                                               filetype_suffix="arrow")
        with ArrowWriter(path=fname, features=ds.features) as writer:
            writer.write_table(ds.data.table)
            rows, size = writer.finalize()
        split_dict.add(datasets.SplitInfo(name=split, num_bytes=size, num_examples=rows,
                                          dataset_name=dataset_name))
    datasets.DatasetInfo(features=features, splits=split_dict, builder_name="parquet", dataset_name=dataset_name,
                         config_name=config, version="0.0.0").write_to_directory(str(folder))
    return folder


def test_project_tasks_are_in_mteb_registry_and_benchmarks_resolve():
    assert type(mteb.get_task("LeeSTS")) is tasks.TASKS["LeeSTS"]  # mteb's own lookup finds ours
    assert isinstance(tasks.build("STS12"), type(mteb.get_task("STS12")))
    with pytest.raises(KeyError, match="neither one of the project's"):
        tasks.build("NoSuchTask")
    names = evaluation.EvalConfig(benchmark="MTEB(eng, v2)").tasks
    assert len(names) > 20 and "STS12" in names and "LeeSTS" not in names  # the benchmark alone
    both = evaluation.EvalConfig(tasks=["LeeSTS"], benchmark="MTEB(eng, v2)").tasks
    assert both[0] == "LeeSTS" and both[1:] == names
    with pytest.raises(ValueError, match="unknown mteb benchmark"):
        evaluation.EvalConfig(benchmark="NoSuchBenchmark")


def test_a_registry_task_without_its_data_fails_saying_what_to_do(tmp_path, monkeypatch):
    # this process reads no STS12 anywhere (conftest sets the hub offline): nothing to load
    with pytest.raises(tasks.DataUnavailable) as err:
        tasks.check_available(["LeeSTS", "STS12"])
    message = str(err.value)
    assert "mteb/sts12-sts" in message and "HF_HOME" in message and "load_data()" in message
    with pytest.raises(tasks.DataUnavailable):  # evaluate_model checks before it deploys anything
        evaluation.evaluate_model(evaluation.EvalConfig(tasks=["STS12"]), "m", tmp_path / "no-model", tmp_path)


@pytest.mark.integration
def test_a_registry_task_evaluates_end_to_end_offline_from_a_built_cache(tmp_path, minilm_dir):
    from mgh_ray.encoder import Encoder

    meta = mteb.get_task("STS12").metadata.dataset
    rows = pd.DataFrame(MADE_UP_PAIRS, columns=["sentence1", "sentence2", "score"])
    build_hf_cache(tmp_path / "hf", meta["path"], meta["revision"], {"test": rows})
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mgh_ray.cli", "evaluate", str(ROOT / "jobs/configs/tiny.yaml"),
           "--model", f"minilm={minilm_dir}", f"run_dir={run_dir}", "ray.address=local", "ray.num_cpus=2",
           "ray.include_dashboard=false", "serve.port=18761", "evaluate.tasks=[STS12,LeeSTS]",
           "evaluate.max_rows=16", "evaluate.num_replicas=1", "evaluate.bootstrap=100"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    scores = pd.read_csv(io.StringIO((run_dir / "evaluate" / "scores.csv").read_text()), index_col=0)
    # the main score (cosine Spearman) of the made-up pairs, recomputed here from in-process vectors
    enc = Encoder.load(minilm_dir)
    a, b = enc.encode(rows.sentence1.tolist()), enc.encode(rows.sentence2.tolist())
    want = spearmanr((a * b).sum(-1), rows.score).statistic
    assert scores.loc["STS12", "minilm"] == pytest.approx(want, abs=1e-4)
    assert np.isfinite(scores.loc["LeeSTS", "minilm"])
    assert "STS12" in (run_dir / "evaluate" / "report.md").read_text()
