"""mgh_ray: multi-granularity hard negatives, curriculum training and ATA pooling on Ray.

Importing the package is cheap on purpose (no torch, no ray): every Ray worker imports it.
Stages live in their own modules: assets, corpora, prompts, synthesis, quality, pooling,
encoder, losses, curriculum, training, serving, tasks, evaluation, pipeline.
"""

__version__ = "0.1.0"
