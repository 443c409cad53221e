"""python -m mgh_ray.serving MODEL_DIR [KEY=VALUE ...]: deploy, check parity, stay up until Ctrl-C."""

from mgh_ray.serving.lifecycle import main

main()
