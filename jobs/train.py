"""Ray job entrypoint: Ray Train DDP contrastive training with LoRA, ATA pooling and the curriculum.

    ray job submit --working-dir . -- python -m jobs.train jobs/configs/tiny.yaml [KEY=VALUE ...]
"""

import sys

from mgh_ray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
