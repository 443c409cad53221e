"""Ray job entrypoint: speed benchmarks against a same-run baseline (--stage synthesis|training|serving).

    ray job submit --working-dir . -- python -m jobs.benchmark jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["benchmark", *sys.argv[1:]])
