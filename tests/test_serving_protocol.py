"""The request model on its own (no cluster): OpenAI's fields, our limits, messages that name the fix."""

from __future__ import annotations

import pytest

from mgh_ray import serving

CFG = serving.ServeConfig(max_inputs=4, max_instruction_chars=16)


def _status(body):
    with pytest.raises(serving.RequestError) as info:
        serving.parse_request(body, CFG, "m", 8)
    return info.value.status, info.value.message


def test_a_valid_request_keeps_openai_defaults():
    req = serving.parse_request({"input": "hi", "user": "u1", "unknown_openai_field": 1}, CFG, "m", 8)
    assert req.input == ["hi"] and req.encoding_format == "float" and req.dimensions is None
    assert serving.parse_request({"input": ["a", "b"], "encoding_format": None}, CFG, "m", 8).encoding_format == "float"


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"input": "x", "encoding_format": 0}, 400, "'encoding_format' must be 'float' or 'base64', not 0"),
    ({"input": "x", "encoding_format": False}, 400, "not False"),
    ({"input": "x", "encoding_format": {}}, 400, "not {}"),
    ({"input": ["ok", "bad \ud800"]}, 400, "input[1] is not valid Unicode"),
    ({"input": "x", "instruction": "\udfff"}, 400, "'instruction' is not valid Unicode"),
    ({"input": "x", "instruction": "y" * 17}, 400, "17 characters; at most 16"),
    ({"input": ["a"] * 5}, 400, "5 items; at most 4"),
    ({"input": "x", "dimensions": 9}, 400, "1..8"),
    ({"input": "x", "model": "other"}, 404, "not served here"),
    ({"input": "x", "user": 5}, 400, "'user' must be a string"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_name_the_problem(body, status, words):
    got, message = _status(body)
    assert got == status and words in message


def test_the_schema_is_openais_plus_instruction():
    props = serving.EmbeddingRequest.model_json_schema()["properties"]
    assert set(props) == {"input", "model", "encoding_format", "dimensions", "user", "instruction"}
    assert set(serving.EmbeddingResponse.model_json_schema()["properties"]) == {"object", "data", "model", "usage"}
