"""Ray job entrypoint: offline MTEB tasks spread over Serve replicas, with the report.

    ray job submit --working-dir . -- python -m jobs.evaluate jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])
