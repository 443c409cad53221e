"""Ray job entrypoint: fetch, verify and cache the pinned models and data.

    ray job submit --working-dir . -- python -m jobs.fetch jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["fetch", *sys.argv[1:]])
