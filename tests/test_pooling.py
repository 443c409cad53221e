"""Pooling: every mode against a naive loop reference; padding never pooled; instruction tokens kept out
of the pool when asked (the probe's attention itself: tests/test_attention.py)."""

from __future__ import annotations

import pytest
import torch

from mgh_ray import attention, pooling
from mgh_ray.pooling import PoolingConfig

torch.manual_seed(0)


def _batch(left: bool):
    """3 sequences of lengths 5, 3, 1 in a (3, 6) batch, padded left or right."""
    lengths = [5, 3, 1]
    mask = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, 6 - n:] = 1
        else:
            mask[b, :n] = 1
    hidden = torch.randn(3, 6, 4, dtype=torch.float64)
    probs = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    return hidden, mask, probs


def _ref(cfg: PoolingConfig, hidden, mask, probs, pool_mask, causal):
    """Plain loops, straight from the formulas in pooling.py's docstring."""
    out = []
    for b in range(hidden.shape[0]):
        real = [j for j in range(hidden.shape[1]) if mask[b, j]]
        pool_set = [j for j in real if pool_mask is None or pool_mask[b, j]]
        if cfg.mode == "last":
            out.append(hidden[b, pool_set[-1]])  # the last pooled token (the last real one by default)
            continue
        if cfg.mode == "cls":
            out.append(hidden[b, real[0]])
            continue
        mean = sum(hidden[b, j] for j in pool_set) / len(pool_set)
        if cfg.mode == "mean":
            out.append(mean)
            continue
        if cfg.mode == "weighted_mean":
            w = {j: real.index(j) + 1 for j in pool_set}
            out.append(sum(w[j] * hidden[b, j] for j in pool_set) / sum(w.values()))
            continue
        heads = probs.shape[1]
        r = {}
        for j in real:
            r[j] = sum(probs[b, h, i, j] for h in range(heads) for i in real) / heads
            if causal and cfg.causal_norm:
                r[j] = r[j] / len([i for i in real if i >= j])
        cand = pool_set
        if cfg.top_k is not None:
            cand = sorted(pool_set, key=lambda j: -r[j])[: cfg.top_k]
        z = sum(r[j] ** (1 / cfg.temperature) for j in cand)
        ata = sum(r[j] ** (1 / cfg.temperature) / z * hidden[b, j] for j in cand)
        out.append(cfg.mean_mix * mean + (1 - cfg.mean_mix) * ata)
    return torch.stack(out)


CONFIGS = [
    PoolingConfig(mode="mean"), PoolingConfig(mode="last"), PoolingConfig(mode="cls"),
    PoolingConfig(mode="weighted_mean"), PoolingConfig(mode="ata"),
    PoolingConfig(mode="ata", causal_norm=False),
    PoolingConfig(mode="ata", temperature=0.5), PoolingConfig(mode="ata", top_k=2),
    PoolingConfig(mode="ata", mean_mix=0.3, temperature=2.0),
]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-T{c.temperature}-k{c.top_k}-a{c.mean_mix}")
def test_each_mode_matches_the_loop_reference(cfg, left):
    hidden, mask, probs = _batch(left)
    # probabilities as a real layer gives them: padding columns are zero
    probs = probs * mask[:, None, None, :]
    got = pooling.pool(cfg, hidden, mask, None, probs, causal=True)
    torch.testing.assert_close(got, _ref(cfg, hidden, mask, probs, None, causal=True))


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "ata", "last"])
def test_excluded_instruction_tokens_are_not_pooled(mode):
    hidden, mask, probs = _batch(left=True)
    probs = probs * mask[:, None, None, :]
    keep = pooling.prefix_mask(mask, torch.tensor([2, 1, 0]))
    assert keep.sum(-1).tolist() == [3, 2, 1]
    cfg = PoolingConfig(mode=mode)
    got = pooling.pool(cfg, hidden, mask, keep, probs, causal=False)
    torch.testing.assert_close(got, _ref(cfg, hidden, mask, probs, keep, causal=False))


def test_padding_gets_zero_weight_and_never_changes_the_vector():
    hidden, mask, probs = _batch(left=False)
    probs = attention.attention_probs(torch.randn(3, 2, 6, 8), torch.randn(3, 1, 6, 8), mask, causal=True)
    r = attention.received_attention(probs, mask, causal=True, causal_norm=True)
    w = pooling.anchor_weights(r, mask, PoolingConfig())
    assert (w[mask == 0] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    garbage = hidden.clone()
    garbage[mask == 0] = 1e6
    for cfg in CONFIGS:
        torch.testing.assert_close(pooling.pool(cfg, garbage, mask, None, probs.double()),
                                   pooling.pool(cfg, hidden, mask, None, probs.double()))


def test_gradient_flows_through_weights_only_when_asked():
    hidden, mask, _ = _batch(left=False)
    logits = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    for grad_through, expect in [(False, False), (True, True)]:
        cfg = PoolingConfig(grad_through_weights=grad_through)
        probs = logits.softmax(-1) * mask[:, None, None, :]
        pooling.pool(cfg, hidden.requires_grad_(True), mask, None, probs).sum().backward()
        assert (logits.grad is not None and logits.grad.abs().sum() > 0) == expect
        logits.grad = None


def test_without_final_drops_each_rows_last_real_token_unless_it_is_the_only_one():
    _, mask, _ = _batch(left=True)  # lengths 5, 3, 1, left padded
    out = pooling.without_final(mask)
    assert out.sum(-1).tolist() == [4, 2, 1]
    assert not out[0, -1] and not out[1, -1] and out[2, -1]  # the one-token text keeps its token
