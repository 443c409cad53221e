"""Config loading: defaults <- YAML <- dotlist; unknown keys and wrong types name the key."""

from __future__ import annotations

import pytest
import yaml

from mgh_ray import config
from mgh_ray.config import ConfigError, Section


class Inner(Section):
    lr: float = 1e-4
    levels: list[int] = [1, 2, 3, 4]


class Outer(Section):
    name: str = "x"
    steps: int = 10
    inner: Inner = Inner()


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 20, "inner": {"lr": 0.5}}))
    cfg = config.load(Outer, path, ["inner.levels=[2,3]", "name=run1"])
    assert cfg == Outer(name="run1", steps=20, inner=Inner(lr=0.5, levels=[2, 3]))


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"inner": {"lrr": 0.5}}))
    with pytest.raises(ConfigError, match=r"unknown key 'inner\.lrr'"):
        config.load(Outer, path)
    with pytest.raises(ConfigError, match=r"unknown key 'stepz'"):
        config.load(Outer, None, ["stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"steps: .*integer.*'many'"):
        config.load(Outer, None, ["steps=many"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.load(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Outer, tmp_path / "nope.yaml")


def test_saved_config_loads_back(tmp_path):
    cfg = config.load(Outer, None, ["inner.lr=0.25"])
    saved = config.save(cfg, tmp_path / "out" / "config.yaml")
    assert config.load(Outer, saved) == cfg
