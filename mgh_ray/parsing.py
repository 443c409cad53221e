"""Reading the generator's output back: a tolerant parser of the JSON the MGH prompts ask for.

The parser accepts what small models really write: prose or code fences around the JSON, several
JSON objects, trailing commas, level keys spelled "L1" / "level_1" / "Negative 1", or a list under
"negatives". It rejects, with a reason: no JSON at all (`no_json`), output cut off before the object
closes (`truncated`), unreadable JSON (`bad_json`), a missing level or field (`wrong_keys`), a
non-string value (`wrong_type`), an empty text (`empty`), a negative of fewer than three words, which
is the model echoing the format ("L3", "Ad"; `too_short`), and two negatives that say the same thing
(`duplicate`). Whether a negative is a false negative is the quality gate's call (quality.py), not
the parser's. Pure functions, no state: they run in the engine actors, the benchmark and tests.

    parsed = parsing.parse_negatives(generated_text)      # Parsed(ok, value, reason, detail)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mgh_ray.records import LEVELS

# Parse failure reasons (the failures table and the report group by these).
NO_JSON, TRUNCATED, BAD_JSON = "no_json", "truncated", "bad_json"
WRONG_KEYS, WRONG_TYPE, EMPTY, DUPLICATE = "wrong_keys", "wrong_type", "empty", "duplicate"
TOO_SHORT = "too_short"
REASONS = (NO_JSON, TRUNCATED, BAD_JSON, WRONG_KEYS, WRONG_TYPE, EMPTY, TOO_SHORT, DUPLICATE)
MIN_NEGATIVE_WORDS = 3  # a "negative" like "L3" or "Ad" is the model echoing the format, not a passage


@dataclass(frozen=True)
class Parsed:
    """Result of parsing one model output: `value` when ok, else a `reason` from REASONS."""

    ok: bool
    value: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""


def _fail(reason: str, detail: str = "") -> Parsed:
    return Parsed(False, None, reason, detail)


_FENCE = re.compile(r"```(?:json|JSON)?")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_LEVEL_KEY = re.compile(r"^(?:l|lvl|level|neg|negative|hardnegative|negativepassage|passage)?([1-4])$")
LEVEL_NAMES = {"coarse": 1, "topical": 2, "related": 3, "fine": 4}  # the level names of the prompt files


def _objects(text: str) -> tuple[list[dict[str, Any]], str]:
    """Every JSON object found in `text` (in order), and why none was found when the list is empty."""
    text = _FENCE.sub("", text)
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    starts = [m.start() for m in re.finditer(r"\{", text)]
    if not starts:
        return [], NO_JSON
    pos_done = -1
    unclosed = False
    for start in starts:
        if start < pos_done:
            continue  # inside an object already decoded
        for candidate in (text[start:], _TRAILING_COMMA.sub(r"\1", text[start:])):
            try:
                obj, end = decoder.raw_decode(candidate)
            except json.JSONDecodeError:
                unclosed |= _unclosed(candidate)
                continue
            if isinstance(obj, dict):
                found.append(obj)
                pos_done = start + end
            break
    if found:
        return found, ""
    return [], TRUNCATED if unclosed else BAD_JSON


def _unclosed(text: str) -> bool:
    """True when `text` (starting at a '{') ends inside a string or with brackets still open."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return False  # closed (the error is elsewhere)
    return in_string or depth > 0


def _norm_key(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def _clean(value: Any, field: str) -> tuple[str | None, Parsed | None]:
    if not isinstance(value, str):
        return None, _fail(WRONG_TYPE, f"{field} is {type(value).__name__}, not a string")
    value = " ".join(value.split())
    if not value:
        return None, _fail(EMPTY, f"{field} is empty")
    return value, None


def _levels(obj: dict[str, Any]) -> dict[int, Any]:
    """Level -> raw value, from level keys or from a 'negatives' list."""
    out: dict[int, Any] = {}
    for key, value in obj.items():
        m = _LEVEL_KEY.match(_norm_key(key))
        if m:
            out.setdefault(int(m.group(1)), value)
        elif _norm_key(key) in LEVEL_NAMES:
            out.setdefault(LEVEL_NAMES[_norm_key(key)], value)
    negs = next((v for k, v in obj.items() if _norm_key(k) in ("negatives", "hardnegatives")), None)
    if not out and isinstance(negs, list):
        for i, item in enumerate(negs[: len(LEVELS)], start=1):
            if isinstance(item, dict):  # [{"level": 1, "text": "..."}]
                level = item.get("level", i)
                text = next((item[k] for k in ("text", "passage", "negative") if k in item), None)
                out.setdefault(int(level) if str(level).isdigit() else i, text)
            else:
                out[i] = item
    return out


def _negatives(obj: dict[str, Any]) -> Parsed:
    raw = _levels(obj)
    missing = [f"L{k}" for k in LEVELS if k not in raw]
    if missing:
        return _fail(WRONG_KEYS, f"missing {', '.join(missing)}; keys were {list(obj)[:8]}")
    negs: dict[str, str] = {}
    for k in LEVELS:
        text, err = _clean(raw[k], f"L{k}")
        if err:
            return err
        if len(text.split()) < MIN_NEGATIVE_WORDS:  # type: ignore[union-attr]
            return _fail(TOO_SHORT, f"L{k} has fewer than {MIN_NEGATIVE_WORDS} words: {text!r}")
        negs[f"L{k}"] = text  # type: ignore[assignment]
    seen: dict[str, str] = {}
    for key, text in negs.items():
        norm = text.casefold().strip(" .")
        if norm in seen:
            return _fail(DUPLICATE, f"{key} repeats {seen[norm]}")
        seen[norm] = key
    return Parsed(True, negs)


def _best(text: str, accept) -> Parsed:
    """Parse every object in `text` with `accept`; the first success wins, else the first error."""
    objs, why = _objects(text)
    if not objs:
        return _fail(why, text[-120:])
    first: Parsed | None = None
    for obj in objs:
        result = accept(obj)
        if result.ok:
            return result
        first = first or result
    return first  # type: ignore[return-value]


def parse_negatives(text: str) -> Parsed:
    """Four graded negatives {"L1".."L4": str} from an augment answer."""
    return _best(text, _negatives)


def parse_task(text: str) -> Parsed:
    """{"task": str} from a brainstorm answer (also takes "instruction" or a "tasks" list)."""

    def accept(obj: dict[str, Any]) -> Parsed:
        keys = {_norm_key(k): v for k, v in obj.items()}
        value = next((keys[k] for k in ("task", "instruction", "taskdescription") if k in keys), None)
        if value is None and isinstance(keys.get("tasks"), list) and keys["tasks"]:
            value = keys["tasks"][0]
        if value is None:
            return _fail(WRONG_KEYS, f"no 'task'; keys were {list(obj)[:8]}")
        task, err = _clean(value, "task")
        return err or Parsed(True, {"task": task})

    return _best(text, accept)


def parse_example(text: str) -> Parsed:
    """{"query", "positive", "L1".."L4"} from a generate answer."""

    def accept(obj: dict[str, Any]) -> Parsed:
        keys = {_norm_key(k): v for k, v in obj.items()}
        query = next((keys[k] for k in ("query", "userquery") if k in keys), None)
        positive = next((keys[k] for k in ("positive", "positivedocument", "pos", "document") if k in keys),
                        None)
        if query is None or positive is None:
            return _fail(WRONG_KEYS, f"missing query or positive; keys were {list(obj)[:8]}")
        q, err = _clean(query, "query")
        if err:
            return err
        p, err = _clean(positive, "positive")
        if err:
            return err
        negs = _negatives(obj)
        if not negs.ok:
            return negs
        if q.casefold() == p.casefold():  # type: ignore[union-attr]
            return _fail(DUPLICATE, "positive repeats the query")
        return Parsed(True, {"query": q, "positive": p, **negs.value})  # type: ignore[dict-item]

    return _best(text, accept)
