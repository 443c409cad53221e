"""Ray job entrypoint: mined-negative baseline from the reference embedder.

    ray job submit --working-dir . -- python -m jobs.mine jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["mine", *sys.argv[1:]])
