"""Benchmark jobs, one module per stage. Each compares against a baseline in the same run and
prints and saves a table (ratios, not absolute times): `mgh-ray benchmark <config> --stage NAME`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def save(out_dir: str | Path, name: str, md: str, payload: Any) -> None:
    """Write `benchmark_<name>.md` (the printed table and its notes) and `.json` (the numbers) into
    `out_dir`, and log the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"benchmark_{name}.md").write_text(md)
    (out_dir / f"benchmark_{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    log.info("%s benchmark:\n%s", name, md)
