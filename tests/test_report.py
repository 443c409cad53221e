"""The evaluation report: markdown table (best per row in bold, mean row) and a real PNG chart."""

from __future__ import annotations

import pandas as pd
import pytest

from mgh_ray import report


@pytest.fixture
def table():
    t = pd.DataFrame({"base": [0.5, 0.25], "trained": [0.75, 0.125]},
                     index=["LeeSTS", "BBCHeadlineRetrieval"])
    t.loc["mean"] = t.mean()
    t.index.name = "task"
    return t


def test_markdown_table(table):
    md = report.markdown_table(table, metrics={"LeeSTS": "STS, cosine_spearman"})
    lines = md.splitlines()
    assert lines[0] == "| task | metric | base | trained |"
    assert lines[1] == "|---|---|---:|---:|"
    assert lines[2] == "| LeeSTS | STS, cosine_spearman | 0.5000 | **0.7500** |"
    assert lines[3] == "| BBCHeadlineRetrieval |  | **0.2500** | 0.1250 |"
    assert lines[4] == "| **mean** |  | 0.3750 | **0.4375** |"
    assert report.markdown_table(table[["base"]]).splitlines()[2] == "| LeeSTS | 0.5000 |"  # nothing to bold


def test_missing_score_is_a_dash(table):
    table.loc["LeeSTS", "trained"] = float("nan")
    assert "| LeeSTS | 0.5000 | - |" in report.markdown_table(table)


def test_write_puts_report_and_chart_next_to_results(table, tmp_path):
    md, png = report.write(table, tmp_path / "evaluate", note="2 tasks")
    assert md == tmp_path / "evaluate" / "report.md" and png == tmp_path / "evaluate" / "scores.png"
    text = md.read_text()
    assert "2 tasks" in text and "| **mean** |" in text and "![scores](scores.png)" in text
    import matplotlib.image

    image = matplotlib.image.imread(png)  # a real, readable PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rewrites_the_report_from_a_csv(table, tmp_path):
    table.to_csv(tmp_path / "scores.csv")
    from typer.testing import CliRunner

    from mgh_ray.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path / "scores.csv")])
    assert result.exit_code == 0, result.output
    assert "| **mean** |" in (tmp_path / "report.md").read_text() and (tmp_path / "scores.png").is_file()
