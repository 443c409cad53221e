"""Ray job entrypoint: the whole pipeline, resumable (the main job).

    ray job submit --working-dir . -- python -m jobs.pipeline jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["pipeline", *sys.argv[1:]])
