"""Losses: InfoNCE over in-batch and explicit hard negatives, with candidates gathered across DDP workers.

For query i with positive p_i and hard negatives n_i1..n_iK, the candidates are every positive and every
hard negative of the *global* batch (all workers):

    loss_i = -log( exp(s(q_i, p_i)/t) / sum_c exp(s(q_i, c)/t) ),   s = dot product (unit vectors: cosine)

Temperature trap: with unit vectors the logits live in [-1/t, 1/t]; t = 0.05 (default, E5/GTE) gives
a range of +-20. A t near 1 leaves the softmax almost flat and the model barely learns.

Across workers: `all_gather` with autograd (torch.distributed.nn), so gradients reach the worker that
produced each candidate; worker r's query i has its positive at column r * B + i (B = per-worker batch,
equal on every worker). Getting this offset wrong trains anchors toward someone else's positive or
their own negatives. The per-worker loss is the mean over its local
queries, so DDP's gradient average equals the gradient of the single-process loss on the global batch
(tests/test_losses.py checks this with 2 gloo processes). Candidates that are the same text as a
query's positive (keys equal) but not its label are masked out: they are false negatives.

    python -m pytest -q tests/test_losses.py
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from mgh_ray.config import Section

log = logging.getLogger(__name__)


class LossConfig(Section):
    temperature: float = Field(0.05, gt=0)
    gather: bool = True  # candidates from every DDP worker (else: this worker's batch only)
    mask_duplicates: bool = True  # drop candidates whose text equals the query's positive
    # False: in-batch negatives only (the ablation's "no hard negative" arm); the curriculum then
    # still advances but its negatives are never embedded
    hard_negatives: bool = True


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (dim 0) over all workers, in rank order; gradients flow back to each owner."""
    if not distributed():
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def gather_plain(x: torch.Tensor) -> torch.Tensor:
    """`gather` for tensors without gradients (ids)."""
    if not distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, *, temperature: float = 0.05,
             do_gather: bool = True, p_keys: torch.Tensor | None = None,
             n_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE over this worker's queries.

    q, p: (B, dim) query and positive embeddings; n: (B, K, dim) hard negatives (K may be 0 or None);
    p_keys (B,), n_keys (B, K): int64 text keys for duplicate masking (None: no masking).
    Every worker must pass the same B and K (all_gather needs equal shapes).
    """
    b, dim = q.shape
    k = 0 if n is None else n.shape[1]
    cands = [p] + ([n.reshape(b * k, dim)] if k else [])  # local candidates, positives first
    keys = None
    if p_keys is not None:
        keys = [p_keys] + ([n_keys.reshape(b * k)] if k else [])
    offset = 0
    if do_gather and distributed():
        world, rank = dist.get_world_size(), dist.get_rank()
        cands = [gather(c) for c in cands]  # (W*B, dim), (W*B*K, dim)
        keys = [gather_plain(c) for c in keys] if keys is not None else None
        offset = rank * b
        log.debug("InfoNCE: %d queries vs %d candidates from %d workers", b, sum(len(c) for c in cands),
                  world)
    cand = torch.cat(cands, dim=0)  # (C, dim)
    logits = q @ cand.T / temperature  # (B, C)
    labels = torch.arange(b, device=q.device) + offset  # (B,): own positive among all positives
    if keys is not None:
        cand_keys = torch.cat(keys)  # (C,)
        own = p_keys.view(-1, 1) == cand_keys.view(1, -1)  # (B, C): same text as my positive
        own[torch.arange(b, device=q.device), labels] = False  # ... except the label itself
        logits = logits.masked_fill(own, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits.float(), labels)


def text_keys(texts: list[str]) -> torch.Tensor:
    """Stable int64 keys of texts (same on every worker: no Python hash randomisation)."""
    import hashlib

    digests = [hashlib.blake2b(t.encode(), digest_size=8).digest() for t in texts]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.long)


class InfoNCE(torch.nn.Module):
    """`info_nce` with its settings from `LossConfig`."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None,
                p_keys: torch.Tensor | None = None, n_keys: torch.Tensor | None = None) -> torch.Tensor:
        if not self.cfg.mask_duplicates:
            p_keys = n_keys = None
        return info_nce(q, p, n, temperature=self.cfg.temperature, do_gather=self.cfg.gather,
                        p_keys=p_keys, n_keys=n_keys)
