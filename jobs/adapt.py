"""Ray job entrypoint: MNTP adaptation of a bidirectional encoder (LLM2Vec), before `train`.

    ray job submit --working-dir . -- python -m jobs.adapt jobs/configs/small.yaml train.encoder.attention=bidirectional
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["adapt", *sys.argv[1:]])
