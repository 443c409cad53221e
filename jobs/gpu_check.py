"""Entrypoint: the GPU check (mgh_ray/gpu_check.py), no Ray needed; prints its table, writes gpu_check.json.

    python -m jobs.gpu_check --prepare runs/gpu_check_inputs/smollm2    # here: SmolLM2 config + tokenizer
    python -m jobs.gpu_check --inputs runs/gpu_check_inputs/smollm2 --out runs/gpu_check   # on the GPU
"""

import argparse
import sys
from pathlib import Path

from mgh_ray import gpu_check, logs


def main() -> int:
    p = argparse.ArgumentParser(description="GPU check of the model code (no Ray, no vLLM)")
    p.add_argument("--inputs", type=Path, help="folder with SmolLM2's config.json and tokenizer files")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a minute on a CPU")
    p.add_argument("--prepare", type=Path, help="copy SmolLM2's config and tokenizer here and stop")
    args = p.parse_args()
    logs.setup()
    if args.prepare:
        from mgh_ray import assets

        sys.stdout.write(f"{gpu_check.prepare_inputs(assets.model_path('smollm2'), args.prepare)}\n")
        return 0
    if args.inputs is None:
        p.error("--inputs is required (make it with --prepare on a machine that has the smollm2 asset)")
    report = gpu_check.run(args.inputs, args.out, args.device, args.tiny)
    sys.stdout.write(gpu_check.table(report) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
