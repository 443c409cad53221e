"""Pooling: every mode against a naive loop reference; the recomputed probe attention against the eager
attention of the same layer (SmolLM2 with rotary, MiniLM bidirectional); padding never pooled."""

from __future__ import annotations

import pytest
import torch

from mgh_ray import pooling
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
            out.append(hidden[b, real[-1]])
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


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "ata"])
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
    probs = pooling.attention_probs(torch.randn(3, 2, 6, 8), torch.randn(3, 1, 6, 8), mask, causal=True)
    r = pooling.received_attention(probs, mask, causal=True, causal_norm=True)
    w = pooling.anchor_weights(r, mask, PoolingConfig())
    assert (w[mask == 0] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    garbage = hidden.clone()
    garbage[mask == 0] = 1e6
    for cfg in CONFIGS:
        torch.testing.assert_close(pooling.pool(cfg, garbage, mask, None, probs.double()),
                                   pooling.pool(cfg, hidden, mask, None, probs.double()))


def test_attention_probs_respect_causal_and_padding_masks():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    probs = pooling.attention_probs(torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4), mask, causal=True)
    assert torch.isfinite(probs).all()
    assert (probs[0, :, :2] == 0).all()  # padding queries
    assert (probs[0, :, :, :2] == 0).all()  # padding keys
    assert (probs[0].triu(1) == 0).all()  # no future keys
    torch.testing.assert_close(probs[0, :, 2:].sum(-1), torch.ones(3, 3))


def test_gradient_flows_through_weights_only_when_asked():
    hidden, mask, _ = _batch(left=False)
    logits = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    for grad_through, expect in [(False, False), (True, True)]:
        cfg = PoolingConfig(grad_through_weights=grad_through)
        probs = logits.softmax(-1) * mask[:, None, None, :]
        pooling.pool(cfg, hidden.requires_grad_(True), mask, None, probs).sum().backward()
        assert (logits.grad is not None and logits.grad.abs().sum() > 0) == expect
        logits.grad = None


def _eager(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def smollm2_eager(smollm2_path):
    return _eager(smollm2_path)


@pytest.fixture(scope="module")
def minilm_eager(minilm_path):
    return _eager(minilm_path)


def _ids(model, left: bool):
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    if left:
        mask[1, :3] = 0
    else:
        mask[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("layer", [-1, 3])
@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_recomputed_attention_equals_eager_attention(which, layer, left, request):
    model = request.getfixturevalue(f"{which}_eager")
    ids, mask = _ids(model, left)
    pos = pooling.positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True,
                    output_hidden_states=True)
        n = len(pooling.backbone_layers(model))
        probe = pooling.probe_for(model, layer % n)
        got = probe(out.hidden_states[layer % n], mask, pos)
    want = out.attentions[layer % n]  # (batch, heads, seq, seq)
    real = mask.bool()
    assert probe.causal == (which == "smollm2")
    for b in range(2):
        rows = real[b]
        torch.testing.assert_close(got[b][:, rows][:, :, rows], want[b][:, rows][:, :, rows],
                                   atol=1e-5, rtol=1e-4)
        assert (got[b][:, :, ~rows] == 0).all()


# ---------------------------------------------------------------- chunked received attention


def _qk(b, h, kv, s, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, kv, s, d, generator=g, dtype=dtype)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, :s // 3] = 0  # left padding
    mask[2, s - s // 2:] = 0  # right padding
    return q, k, mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("budget,plan", [(0.01, (1, 1, 16)), (0.1, (1, 4, 40)), (0.4, (2, 6, 40))])
def test_chunked_received_attention_equals_unchunked(causal, budget, plan):
    q, k, mask = _qk(4, 6, 2, 40, 8)  # grouped-query: 3 query heads per key head
    # budgets (MiB) that cut query rows, heads, and batch in turn
    assert pooling.chunk_plan(4, 6, 40, budget) == plan
    want = pooling.received_attention(pooling.attention_probs(q, k, mask, causal), mask, causal, True)
    got = pooling.received_from_qk(q, k, mask, causal, True, chunk_mb=budget)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got[mask == 0] == 0).all()


def test_chunk_plan_bounds_the_chunk_and_covers_the_shape():
    # gpu.yaml's training batch: 64 x 3 texts, 512 tokens, 32 heads, in a 1 GiB budget
    b, h, q = pooling.chunk_plan(192, 32, 512, 1024)
    assert pooling._COPIES * 4 * b * h * q * 512 <= 1024 * 2**20
    assert q == 512 and h == 32 and b >= 1  # whole query rows and heads first
    assert pooling.chunk_plan(2, 2, 8, 256) == (2, 2, 8)  # fits: one chunk, the unchunked path
    assert pooling.chunk_plan(1, 1, 10**6, 1)[2] >= 1  # a sequence longer than the budget still runs


def test_whole_batch_within_budget_is_bitwise_the_unchunked_path():
    q, k, mask = _qk(3, 4, 4, 16, 8)
    want = pooling.received_attention(pooling.attention_probs(q, k, mask, True), mask, True, True)
    assert torch.equal(pooling.received_from_qk(q, k, mask, True, True, chunk_mb=256), want)


def test_chunked_pooling_keeps_gradients_through_weights():
    q, k, mask = _qk(3, 4, 2, 24, 8, dtype=torch.float64)
    grads = []
    for budget in (None, 0.001):
        qq = q.clone().requires_grad_(True)
        r = pooling.received_from_qk(qq, k, mask, True, True, chunk_mb=budget)
        (r * torch.arange(24.0, dtype=r.dtype)).sum().backward()
        grads.append(qq.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-8)


def test_encoder_vectors_do_not_change_with_the_chunk_budget(smollm2_path):
    from mgh_ray.encoder import Encoder, EncoderConfig

    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=128))
    texts = ["Kenya's runner wins the London marathon in a record time, ahead of the champion. " * 8,
             "Minister resigns", "Shares in the mobile phone maker fell sharply after a profit warning."]
    whole = enc.encode(texts)
    enc.config.pooling = PoolingConfig(ata_chunk_mb=1.0)
    seq = enc.tokenize(texts)["input_ids"].shape[1]
    assert pooling.chunk_plan(3, 9, seq, 1.0) < (3, 9, seq)  # really chunked at this budget
    chunked = enc.encode(texts)
    assert (whole * chunked).sum(-1).min() > 1 - 1e-6
    assert abs(whole - chunked).max() < 1e-6
