"""The GPU check script stays runnable: its whole path at toy sizes on the CPU, in a process where
Ray and vLLM cannot be imported (as on the GPU machine's image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mgh_ray import gpu_check

ROOT = Path(__file__).parents[1]

BLOCKED = ("import sys, runpy; sys.modules.update(ray=None, vllm=None); "  # `import ray` now raises
           "sys.argv = ['jobs.gpu_check'] + sys.argv[1:]; "
           "runpy.run_module('jobs.gpu_check', run_name='__main__')")


def test_gpu_check_runs_on_cpu_without_ray(smollm2_path, tmp_path):
    inputs = gpu_check.prepare_inputs(smollm2_path, tmp_path / "inputs")
    assert not list(inputs.glob("*.safetensors"))  # config and tokenizer only: the weights stay here
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    args = ["--inputs", str(inputs), "--out", str(tmp_path / "out"), "--device", "cpu", "--tiny"]
    proc = subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all ok: True" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["ok"]
    assert report["train"]["lora_tensors_moved"] == report["train"]["lora_tensors"] > 0
    assert report["train"]["base_unchanged"]
    unchunked, chunked = report["ata_mem"]["rows"]
    assert chunked["peak_mb"] < unchunked["peak_mb"] and chunked["max_abs_diff"] < 1e-6
    assert report["parity"]["documents_dtype"] == "bfloat16"
    assert report["parity"]["documents_min_cosine"] >= gpu_check.MIN_COSINE
    pooler = report["pooler"]  # the vLLM engine's pooler function, fed as vLLM feeds it
    assert pooler["float32_dtype"] == "float32" and pooler["native_dtype"] == "bfloat16"
    assert pooler["float32_min_cosine"] >= gpu_check.MIN_COSINE_FP32
    assert pooler["native_min_cosine"] >= gpu_check.MIN_COSINE
    assert report["encode"]["ata_texts_per_s"] > 0 and report["encode"]["mean_texts_per_s"] > 0


def test_the_script_modules_never_import_ray():
    code = ("import sys; import jobs.gpu_check, mgh_ray.gpu_check; "
            "bad = [m for m in ('ray', 'vllm', 'sentence_transformers') if m in sys.modules]; "
            "assert not bad, bad")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
