"""Ray job entrypoint: the paper's schedule and pooling ablations.

    ray job submit --working-dir . -- python -m jobs.ablate jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["ablate", *sys.argv[1:]])
