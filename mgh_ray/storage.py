"""Storage: one way to address run folders, seed files and records, local or on object storage.

Every location in mgh_ray is a string that is either a local path (`runs/tiny`, `/mnt/shared/run`) or
a URI (`file:///...`, `s3://bucket/run`, `gs://bucket/run`). This module resolves it through
pyarrow.fs, the same filesystem layer Ray Data and Ray Train use, so a run folder on S3 works for
readers, writers, checkpoints and model folders alike. S3 endpoints and credentials come from the
usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., or an instance role).

Local paths are written with tmp-file + rename (a reader never sees half a file); object stores
publish a file whole when its upload completes, so a killed writer leaves nothing behind there.

Models are folders too: `local_dir(uri)` downloads a remote model folder once per node into a cache
keyed by the folder's content manifest (`_manifest.json`, written by `upload_dir`), so every Serve
replica or evaluation task on a node shares one copy, and a new model revision gets a new copy.

    loc = storage.join("s3://bucket/run", "train", "model")
    storage.write_text(storage.join(loc, "note.txt"), "hi")
    storage.check_writable("s3://no-such-bucket/run")   # StorageError naming the URI and the fix
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "hdfs://")


class StorageError(OSError):
    """A location cannot be used; the message names the location and the fix."""


def is_uri(loc: str | Path) -> bool:
    return "://" in str(loc)


def is_remote(loc: str | Path) -> bool:
    return str(loc).startswith(REMOTE_SCHEMES)


def normalize(loc: str | Path) -> str:
    """A local path made absolute (`file://` stripped); URIs unchanged but without a trailing slash.

    Absolute, because Ray workers run in other working directories than the driver."""
    s = str(loc)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if is_uri(s):
        return s.rstrip("/")
    return str(Path(s).expanduser().absolute())


def join(loc: str | Path, *parts: str) -> str:
    base = normalize(loc)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def resolve(loc: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location."""
    s = normalize(loc)
    if not is_uri(s):
        return pafs.LocalFileSystem(), s
    try:
        return pafs.FileSystem.from_uri(s)
    except Exception as exc:  # unknown scheme, bad URI, missing library
        raise StorageError(f"cannot open {s}: {exc}. Use a local path or an s3:// / gs:// URI") from None


def _explain(loc: str, exc: Exception) -> StorageError:
    text = str(exc)
    hint = "check the URI and that the bucket exists"
    low = text.lower()
    if "credential" in low or "access denied" in low or "accessdenied" in low or "forbidden" in low:
        hint = ("set credentials for it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role; "
                "AWS_ENDPOINT_URL for an S3-compatible server)")
    elif "bucket" in low and ("not found" in low or "does not exist" in low or "nosuchbucket" in low):
        hint = "create the bucket first, or fix its name"
    return StorageError(f"{loc}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}; {hint}")


def info(loc: str | Path) -> pafs.FileInfo:
    fs, path = resolve(loc)
    try:
        return fs.get_file_info(path)
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None


def exists(loc: str | Path) -> bool:
    return info(loc).type != pafs.FileType.NotFound


def is_file(loc: str | Path) -> bool:
    return info(loc).type == pafs.FileType.File


def is_dir(loc: str | Path) -> bool:
    """A folder (on object stores: a prefix with at least one object under it)."""
    fs, path = resolve(loc)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            return True
        if is_remote(loc):
            return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None
    return False


def makedirs(loc: str | Path) -> None:
    fs, path = resolve(loc)
    try:
        fs.create_dir(path, recursive=True)
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None


def list_files(loc: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Full locations (sorted) of the files under a folder, hidden ones (`.x`, `_x`) left out."""
    fs, path = resolve(loc)
    try:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None
    base = normalize(loc)
    out = []
    for f in found:
        if f.type != pafs.FileType.File or f.base_name.startswith((".", "_")) or not f.base_name.endswith(suffix):
            continue
        rel = f.path[len(path):].lstrip("/")
        out.append(join(base, rel))
    return sorted(out)


def read_bytes(loc: str | Path) -> bytes:
    fs, path = resolve(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as exc:
        if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
            raise FileNotFoundError(normalize(loc)) from None
        raise _explain(normalize(loc), exc) from None


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: str | Path, data: bytes) -> str:
    """Write a whole file: tmp + rename on local disk, one upload on object stores."""
    s = normalize(loc)
    if not is_uri(s):
        p = Path(s)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(data)
        tmp.replace(p)
        return s
    fs, path = resolve(s)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except Exception as exc:
        raise _explain(s, exc) from None
    return s


def write_text(loc: str | Path, text: str) -> str:
    return write_bytes(loc, text.encode("utf-8"))


def delete_dir(loc: str | Path) -> None:
    fs, path = resolve(loc)
    if exists(loc):
        fs.delete_dir(path)


def check_writable(loc: str | Path) -> None:
    """Fail now, with the location and the fix named, if `loc` cannot take files (bucket missing,
    credentials missing or wrong, read-only disk) - before any engine or worker starts."""
    probe = join(loc, f"_probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"ok")
        fs, path = resolve(probe)
        fs.delete_file(path)
    except StorageError as exc:
        raise StorageError(f"cannot write to {normalize(loc)}: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot write to {normalize(loc)}: {exc}") from None


def check_readable(loc: str | Path, what: str = "file") -> None:
    if not exists(loc):
        raise StorageError(f"{what} {normalize(loc)} does not exist; check the path or URI")


# ------------------------------------------------------------------ folders (models, checkpoints)


def manifest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in a local folder."""
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def upload_dir(local: str | Path, loc: str | Path) -> str:
    """Copy a local folder to `loc` (replacing what is there) with a content manifest; returns `loc`.

    The manifest is written last: a folder is complete when its manifest is there."""
    local, dest = Path(local), normalize(loc)
    files = manifest(local)
    if not is_uri(dest) and Path(dest).resolve() == local.resolve():
        write_text(join(dest, MANIFEST), json.dumps(files, indent=0, sort_keys=True))
        return dest
    if exists(dest):
        delete_dir(dest)
    if not is_uri(dest):
        tmp = Path(dest).parent / f".{Path(dest).name}.{uuid.uuid4().hex[:8]}.tmp"
        shutil.copytree(local, tmp)
        (tmp / MANIFEST).write_text(json.dumps(files, indent=0, sort_keys=True))
        tmp.replace(dest)
        return dest
    fs, path = resolve(dest)
    try:
        pafs.copy_files(str(local), path, destination_filesystem=fs)
    except Exception as exc:
        raise _explain(dest, exc) from None
    write_text(join(dest, MANIFEST), json.dumps(files, indent=0, sort_keys=True))
    return dest


def copy_into(local: str | Path, loc: str | Path) -> str:
    """Copy a local folder's files into `loc`, overwriting same-named files and keeping the others."""
    fs, path = resolve(loc)
    try:
        pafs.copy_files(str(local), path, destination_filesystem=fs)
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None
    return normalize(loc)


def download_dir(loc: str | Path, local: str | Path) -> Path:
    local = Path(local)
    fs, path = resolve(loc)
    local.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as exc:
        raise _explain(normalize(loc), exc) from None
    return local


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_home() -> Path:
    """The project's node-local cache: `$MGH_RAY_CACHE`, default ~/.cache/mgh_ray (models and data in
    assets, folders copied from object storage below, vLLM exports)."""
    root = Path(os.environ.get("MGH_RAY_CACHE", Path.home() / ".cache" / "mgh_ray")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_root() -> Path:
    return cache_home() / "folders"


def local_dir(loc: str | Path) -> Path:
    """A local folder with the contents of `loc`: itself when it is local, else a node-local copy
    keyed by its manifest's hash, downloaded once (concurrent callers on a node race safely: each
    downloads into its own tmp folder and the first rename wins)."""
    s = normalize(loc)
    if not is_uri(s):
        return Path(s)
    try:
        man = read_bytes(join(s, MANIFEST))
    except FileNotFoundError:
        raise StorageError(f"{s} is not a complete model folder (no {MANIFEST}); it is written last by "
                           "upload_dir, so the upload was interrupted or this is not a model folder") from None
    key = hashlib.sha256(s.encode() + b"\0" + man).hexdigest()[:16]
    dest = cache_root() / key
    if (dest / MANIFEST).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    download_dir(s, tmp)
    try:
        tmp.replace(dest)
    except OSError:  # another process on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s into the node cache %s", s, dest)
    return dest
