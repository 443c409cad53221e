"""Storage and run layout: local paths and URIs (a loopback S3 server) behave the same."""

from __future__ import annotations

import json

import pytest

from mgh_ray import storage
from mgh_ray.layout import RunLayout, load_config_dict, save_config
from mgh_ray.synthesis import SynthesisConfig


def test_layout_places_every_stage_under_run_dir(tmp_path):
    run = RunLayout("s3://bucket/run/")
    assert run.run_dir == "s3://bucket/run"
    assert run.model == "s3://bucket/run/train/model" and run.export == "s3://bucket/run/train/export"
    assert run.mine == "s3://bucket/run/mine" and run.arm("schedule", "x-s0") == "s3://bucket/run/ablation/schedule/x-s0"
    assert RunLayout.records(run.synthesize) == "s3://bucket/run/synthesize/records"
    local = RunLayout("runs/tiny")
    assert local.run_dir.startswith("/") and local.train.endswith("runs/tiny/train")  # absolute for workers
    assert RunLayout(f"file://{tmp_path}").evaluate == f"{tmp_path}/evaluate"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_files_and_folders_round_trip(kind, tmp_path, request):
    root = str(tmp_path / "r") if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/r"
    loc = storage.join(root, "a", "b.txt")
    storage.write_text(loc, "hello")
    assert storage.read_text(loc) == "hello" and storage.is_file(loc) and storage.is_dir(storage.join(root, "a"))
    assert storage.list_files(root, recursive=True) == [loc]
    assert not storage.exists(storage.join(root, "nope"))
    save_config(SynthesisConfig(num_seeds=3), storage.join(root, "stage"))
    assert load_config_dict(storage.join(root, "stage"))["num_seeds"] == 3

    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "w.bin").write_bytes(b"\0" * 1000)
    (model / "sub" / "c.json").write_text("{}")
    dest = storage.upload_dir(model, storage.join(root, "model"))
    copy = storage.local_dir(dest)
    assert (copy / "w.bin").read_bytes() == b"\0" * 1000 and (copy / "sub" / "c.json").is_file()
    assert json.loads((copy / storage.MANIFEST).read_text()) == storage.manifest(model)
    if kind == "s3":
        assert storage.local_dir(dest) == copy  # one download per node, keyed by content
        (model / "w.bin").write_bytes(b"\1" * 1000)
        assert storage.local_dir(storage.upload_dir(model, dest)) != copy  # a new revision, a new copy


def test_missing_bucket_fails_naming_the_uri_and_the_fix(s3_server):
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-here/run.*bucket"):
        storage.check_writable("s3://no-such-bucket-here/run")


def test_incomplete_remote_model_folder_is_refused(s3_bucket):
    storage.write_text(f"s3://{s3_bucket}/m/encoder.yaml", "x: 1")
    with pytest.raises(storage.StorageError, match="not a complete model folder"):
        storage.local_dir(f"s3://{s3_bucket}/m")
