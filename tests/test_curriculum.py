"""Curriculum: stage order per mode, stage lengths, and a restored cursor continuing the same stream."""

from __future__ import annotations

import json

import pytest

from mgh_ray.config import ConfigError, load
from mgh_ray.curriculum import Curriculum, CurriculumConfig


def _levels_by_step(cur: Curriculum, steps: int, n: int = 6) -> list[list[int]]:
    out = []
    for _ in range(steps):
        out.append(cur.levels(n).tolist())
        cur.advance()
    return out


@pytest.mark.parametrize("mode, expected", [
    ("curriculum", [1, 1, 2, 2, 3, 3, 4, 4]),
    ("reverse", [4, 4, 3, 3, 2, 2, 1, 1]),
    ("single", [2] * 8),
])
def test_single_level_stages_in_order(mode, expected):
    cur = Curriculum(CurriculumConfig(mode=mode), total_steps=8)
    got = _levels_by_step(cur, 8)
    assert [{lv for row in s for lv in row} for s in got] == [{k} for k in expected]
    assert all(len(row) == 1 for s in got for row in s)  # one hard negative per example


def test_cumulative_stage_k_uses_every_level_up_to_k_together():
    cur = Curriculum(CurriculumConfig(mode="cumulative"), total_steps=8, seed=3)
    got = _levels_by_step(cur, 8, n=5)
    for step, levels in enumerate(got):
        k = step // 2 + 1
        assert levels == [list(range(1, k + 1))] * 5  # every example: levels 1..k, all at once


def test_random_draws_one_level_per_example_from_all_levels():
    rnd = _levels_by_step(Curriculum(CurriculumConfig(mode="random"), total_steps=4), 4, n=64)
    assert all(len(row) == 1 for s in rnd for row in s)
    assert all({row[0] for row in s} == {1, 2, 3, 4} for s in rnd)  # 64 draws cover every level
    assert len({tuple(r[0] for r in s) for s in rnd}) == 4  # a new draw each step


def test_stage_weights_set_stage_lengths():
    cur = Curriculum(CurriculumConfig(stage_weights=[1, 1, 2, 4]), total_steps=16)
    assert [p["stop"] - p["start"] for p in cur.plan()] == [2, 2, 4, 8]
    assert [s[0][0] for s in _levels_by_step(cur, 16, n=1)] == [1] * 2 + [2] * 2 + [3] * 4 + [4] * 8


@pytest.mark.parametrize("mode", ["random", "cumulative"])
def test_restored_cursor_continues_mid_stage_with_the_same_stream(mode):
    cfg = CurriculumConfig(mode=mode, stage_weights=[1, 1, 1, 1] if mode == "cumulative" else None)
    straight = Curriculum(cfg, total_steps=20, seed=7)
    want = _levels_by_step(straight, 20)

    first = Curriculum(cfg, total_steps=20, seed=7)
    head = _levels_by_step(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint file
    assert state["step"] == 13 and state["stage"] == (2 if mode == "cumulative" else 0)
    resumed = Curriculum(cfg, total_steps=20, seed=999)  # seed is overwritten by the cursor
    resumed.load_state_dict(state)
    assert head + _levels_by_step(resumed, 7) == want


def test_cursor_refuses_another_schedule():
    cur = Curriculum(CurriculumConfig(), total_steps=20)
    _levels_by_step(cur, 6)
    with pytest.raises(ValueError, match="stage"):
        Curriculum(CurriculumConfig(), total_steps=40).load_state_dict(cur.state_dict())
    with pytest.raises(ValueError, match="curriculum"):
        Curriculum(CurriculumConfig(mode="reverse"), total_steps=20).load_state_dict(cur.state_dict())


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="stage_weights"):
        load(CurriculumConfig, None, ["stage_weights=[1,2]"])
    with pytest.raises(ConfigError, match="level"):
        load(CurriculumConfig, None, ["mode=single", "level=5"])
    assert load(CurriculumConfig, None, ["mode=single", "level=3"]).level == 3
