"""Prompt file loading, rendering and the tolerant parser (pure functions, no engine)."""

from __future__ import annotations

import json

import pytest

from mgh_ray import parsing
from mgh_ray import prompts as P

GOOD = {"L1": "A report on farm subsidies in France.", "L2": "Oil prices rose after the OPEC meeting.",
        "L3": "Yukos shares fell as the court case dragged on.",
        "L4": "Yukos unit buyer wins a loan claim in Moscow."}


@pytest.fixture(scope="module")
def ps():
    return P.load()


def test_load_has_four_levels_and_all_kinds(ps):
    assert ps.version == P.DEFAULT_VERSION == "mgh_v2"
    assert sorted(ps.levels) == [1, 2, 3, 4]
    assert {"short-long", "long-short", "short-short", "long-long", "sts"} <= set(ps.kinds)
    assert ps.kinds["sts"].symmetric and not ps.kinds["short-long"].symmetric
    assert len(ps.topics) >= 10


def test_load_rejects_unknown_version_and_bad_file(tmp_path):
    with pytest.raises(P.PromptError, match="no prompt set"):
        P.load("mgh_v999")
    bad = tmp_path / "p.yaml"
    bad.write_text("version: x\nsystem: s\nlevels: {1: {name: a, definition: b}}\n")
    with pytest.raises(P.PromptError, match="lacks section"):
        P.load(bad)


def test_load_rejects_a_template_with_an_unknown_placeholder(tmp_path):
    text = (P.resources.files("mgh_ray") / "prompts" / "mgh_v1.yaml").read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("${query}", "${qurey}", 1))
    with pytest.raises(P.PromptError, match="qurey"):
        P.load(bad)


def test_augment_messages_carry_seed_and_every_level_definition(ps):
    msgs = P.augment_messages(ps, "Yukos unit buyer faces loan claim", "The owners of Yukos ... " * 3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]  # worked example first
    user = msgs[-1]["content"]
    assert "Yukos unit buyer faces loan claim" in user
    for k in P.LEVELS:
        assert ps.levels[k] in user
    assert "${" not in user


def test_augment_clips_long_positive_at_a_word(ps):
    user = P.augment_messages(ps, "q", "word " * 1000, max_chars=100)[-1]["content"]
    assert "word " * 19 in user and "word " * 30 not in user


def test_generate_mode_prompts_name_kind_topic_and_task(ps):
    b = P.brainstorm_messages(ps, "long-short", "space")[1]["content"]
    assert "space" in b and ps.kinds["long-short"].description in b
    g = P.generate_messages(ps, "sts", "Retrieve sentences that mean the same")[1]["content"]
    assert "Retrieve sentences that mean the same" in g and ps.kinds["sts"].query_length in g


def test_worked_example_is_a_valid_answer_and_v1_has_none(ps):
    msgs = P.augment_messages(ps, "q", "p")
    shot = parsing.parse_negatives(msgs[2]["content"])
    assert shot.ok and shot.value == {k: ps.example[k] for k in P.LEVEL_KEYS}
    assert ps.example["query"] in msgs[1]["content"]
    lo, hi = ps.negative_chars
    assert all(lo <= len(ps.example[k]) <= hi for k in P.LEVEL_KEYS)  # the example obeys its own bounds
    v1 = P.load("mgh_v1")
    assert v1.example is None and [m["role"] for m in P.augment_messages(v1, "q", "p")] == ["system", "user"]


@pytest.mark.parametrize("version", ["mgh_v1", "mgh_v2", "mgh_v3"])
def test_every_shipped_version_stays_loadable(version):
    loaded = P.load(version)
    assert loaded.version == version and sorted(loaded.levels) == [1, 2, 3, 4]
    assert P.symmetric_kinds(version) == {"sts"}


def _content_words(text: str) -> set[str]:
    stop = {"the", "a", "an", "on", "of", "in", "near", "to", "that", "at", "and", "for", "find", "said"}
    return {w.strip(".,'s").casefold() for w in text.split()} - stop


def test_v3_worked_example_follows_the_level_definitions():
    """mgh_v2's example contradicted its levels (L1 off-domain, L2 sharing no key term; L4's definition
    without "condition"); mgh_v3 fixes that."""
    v3 = P.load("mgh_v3")
    assert "condition" in v3.levels[4] and "entities" in v3.levels[2]
    ex = v3.example
    query = _content_words(ex["query"])
    assert len(query & _content_words(ex["L2"])) >= 3  # L2 shares the key terms (moon, south, pole)
    assert not query & _content_words(ex["L1"])  # L1: same broad domain, none of the query's terms
    assert "space" in ex["L1"].casefold() or "planet" in ex["L1"].casefold()  # ... but still space science
    v2 = P.load("mgh_v2").example
    assert not query & _content_words(v2["L2"])  # the contradiction v3 was made to fix


@pytest.mark.integration
def test_v3_worked_example_is_ordered_by_the_reference_embedder(minilm_path):
    from sentence_transformers import SentenceTransformer

    ex = P.load("mgh_v3").example
    st = SentenceTransformer(str(minilm_path), device="cpu")
    v = st.encode([ex["query"], *(ex[k] for k in P.LEVEL_KEYS), ex["positive"]], normalize_embeddings=True)
    sims = (v[1:] @ v[0]).tolist()  # L1, L2, L3, L4, positive
    assert sims == sorted(sims) and len(set(sims)) == 5, sims


def test_load_rejects_a_bad_example_or_bounds(tmp_path):
    text = (P.resources.files("mgh_ray") / "prompts" / "mgh_v2.yaml").read_text()
    bad = tmp_path / "ex.yaml"
    bad.write_text(text.replace("  L2: Engineers are testing", "  L9: Engineers are testing", 1))
    with pytest.raises(P.PromptError, match="example lacks"):
        P.load(bad)
    bad.write_text(text.replace("negative_chars: [40, 240]", "negative_chars: [240, 40]", 1))
    with pytest.raises(P.PromptError, match="negative_chars"):
        P.load(bad)


def test_schemas_require_every_field(ps):
    assert P.negatives_schema()["required"] == ["L4", "L3", "L2", "L1"]  # finest written first
    assert P.example_schema()["required"] == ["query", "positive", "L4", "L3", "L2", "L1"]
    assert P.task_schema()["required"] == ["task"]
    bounded = P.negatives_schema(ps)["properties"]["L1"]
    assert (bounded["minLength"], bounded["maxLength"]) == ps.negative_chars
    assert P.example_schema(ps)["properties"]["query"] == {"type": "string", "minLength": 1}


def test_parse_valid_json(ps):
    r = parsing.parse_negatives(json.dumps(GOOD))
    assert r.ok and r.value == GOOD


@pytest.mark.parametrize("text", [
    "Sure! Here are the passages:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps.",
    "Answer: " + json.dumps(GOOD) + " -- done",
    json.dumps(GOOD)[:-1] + ",}",  # trailing comma
    json.dumps({"level_1": GOOD["L1"], "Level 2": GOOD["L2"], "negative_3": GOOD["L3"], "l4": GOOD["L4"]}),
    json.dumps({"negatives": [GOOD[k] for k in P.LEVEL_KEYS]}),
    json.dumps({"note": "x"}) + " then " + json.dumps(GOOD),  # first object lacks the keys, second is right
])
def test_parse_tolerates_prose_fences_commas_and_key_spellings(text):
    r = parsing.parse_negatives(text)
    assert r.ok, r
    assert r.value == GOOD


@pytest.mark.parametrize("text, reason", [
    (json.dumps(GOOD)[:60], parsing.TRUNCATED),
    ('{"L1": "a b c", "L2": ', parsing.TRUNCATED),
    ("I cannot help with that.", parsing.NO_JSON),
    ('{"L1": tomorrow}', parsing.BAD_JSON),
    (json.dumps({"L1": GOOD["L1"], "L2": GOOD["L2"], "L3": GOOD["L3"]}), parsing.WRONG_KEYS),
    (json.dumps({"a": 1, "b": 2}), parsing.WRONG_KEYS),
    (json.dumps({**GOOD, "L2": ["a", "list"]}), parsing.WRONG_TYPE),
    (json.dumps({**GOOD, "L3": "   "}), parsing.EMPTY),
    (json.dumps({**GOOD, "L3": "L3"}), parsing.TOO_SHORT),
    (json.dumps({**GOOD, "L4": GOOD["L1"].upper() + " "}), parsing.DUPLICATE),
])
def test_parse_rejects_with_reason(text, reason):
    r = parsing.parse_negatives(text)
    assert not r.ok and r.value is None
    assert r.reason == reason, r


def test_parse_task_and_example():
    assert parsing.parse_task('ok {"task": "Given a recipe title, retrieve the recipe"}').value == {
        "task": "Given a recipe title, retrieve the recipe"}
    assert parsing.parse_task('{"tasks": ["Retrieve a match"]}').value == {"task": "Retrieve a match"}
    assert parsing.parse_task('{"title": "x"}').reason == parsing.WRONG_KEYS
    ex = {"query": "best pasta sauce", "positive": "A slow tomato sauce with basil and garlic.", **GOOD}
    assert parsing.parse_example(json.dumps(ex)).value == ex
    assert parsing.parse_example(json.dumps({**ex, "query": ""})).reason == parsing.EMPTY
    assert parsing.parse_example(json.dumps({**ex, "positive": ex["query"]})).reason == parsing.DUPLICATE
    assert parsing.parse_example(json.dumps(GOOD)).reason == parsing.WRONG_KEYS
