"""Ray job entrypoint: deploy the embedder on Ray Serve and check parity.

    ray job submit --working-dir . -- python -m jobs.serve jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]])
