"""Ray job entrypoint: MGH synthesis: vLLM engine actors mapped over seed shards with Ray Data.

    ray job submit --working-dir . -- python -m jobs.synthesize jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["synthesize", *sys.argv[1:]])
