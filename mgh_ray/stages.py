"""The resumable stage runner every pipeline stage and ablation arm goes through.

A stage writes into its own folder (a path or a URI) and marks completion with a `_SUCCESS` file that
holds a fingerprint of the config its output depends on: the stage's sections without their
`runtime_fields` (how a stage runs, such as log_every or keep_rows, not what it makes). `run_stage`
skips a stage whose marker matches, runs it otherwise (the stage resumes from its own partial output),
refuses to mix in a finished stage made with a different config, and runs it again when a node was lost
under it. `stage_dir` and `publish` give stages whose tools write local files only (mteb's result cache)
a local folder that is uploaded when run_dir is on object storage.

    stages.run_stage(run.train, "train", stages.fingerprint(cfg.train), lambda: ..., node_loss_retries=2)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgh_ray import storage
from mgh_ray.config import Section
from mgh_ray.layout import RunLayout

log = logging.getLogger(__name__)


class StaleStageError(RuntimeError):
    """A finished stage in the run folder was made with a different config."""


def digest(parts: list[Any]) -> str:
    """A short stable hash of JSON-able parts: the form every stage fingerprint takes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(*sections: Section) -> str:
    """What a stage's output depends on: its sections' settings, without their `runtime_fields`."""
    return digest([s.model_dump(mode="json", exclude=set(s.runtime_fields)) for s in sections])


def lost_node(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says a node, or an actor with its node, died."""
    import ray.exceptions as rex

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # an ActorDiedError says so only in its text, and Ray Data re-raises it wrapped
        if isinstance(exc, (rex.NodeDiedError, rex.LocalRayletDiedError)) or "its node has died" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_stage(folder: str, name: str, print_: str, fn: Callable[[], object], node_loss_retries: int = 0) -> bool:
    """Run `fn` unless `folder` (path or URI) holds a matching _SUCCESS; returns True if it ran.

    A failure caused by a lost node runs `fn` again (up to `node_loss_retries` times): stages resume
    from their own partial output, and Ray Data or Ray Train do not retry every such loss themselves
    (a parquet footer reader placed on a node the autoscaler is removing fails the read)."""
    marker = RunLayout.success(folder)
    if storage.is_file(marker):
        done = storage.read_text(marker).strip()
        if done == print_:
            log.info("stage %s: done earlier, reusing %s", name, folder)
            return False
        raise StaleStageError(
            f"stage {name!r} in {folder} was finished with a different config (fingerprint {done}, now "
            f"{print_}). Use a new run_dir=..., or delete {folder} (and the stages after it) to redo it.")
    storage.makedirs(folder)
    start = time.time()
    log.info("stage %s: running into %s", name, folder)
    for attempt in range(node_loss_retries + 1):
        try:
            fn()
            break
        except Exception as exc:
            if attempt == node_loss_retries or not lost_node(exc):
                raise
            log.warning("stage %s: a node was lost (%s); running the stage again, resuming from %s",
                        name, str(exc).strip().splitlines()[-1][:200], folder)
    storage.write_text(marker, print_)
    log.info("stage %s: finished in %.0f s", name, time.time() - start)
    return True



def stage_dir(loc: str) -> Path:
    """A local folder for a stage whose tools write local files only (mteb's result cache): the folder
    itself when run_dir is local, else a node-local staging copy (downloaded first, so a rerun
    resumes) that `publish` uploads."""
    if not storage.is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)
        return Path(loc)
    local = storage.cache_root() / "stage" / hashlib.sha256(loc.encode()).hexdigest()[:16]
    if storage.is_dir(loc):
        storage.download_dir(loc, local)
    local.mkdir(parents=True, exist_ok=True)
    return local


def publish(local: Path, loc: str) -> None:
    """Upload a `stage_dir` folder to its run_dir location (nothing to do when run_dir is local)."""
    if storage.is_uri(loc):
        storage.copy_into(local, loc)
