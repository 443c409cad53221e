"""Attention: the recomputed probe attention against the eager attention of the same layer (SmolLM2
with rotary, causal and made bidirectional; MiniLM bidirectional); chunked received attention equals
the unchunked one; the backbone's mask follows `encoder.attention` everywhere the model runs."""

from __future__ import annotations

import pytest
import torch

from mgh_ray import attention
from mgh_ray.pooling import PoolingConfig


def test_attention_probs_respect_causal_and_padding_masks():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    probs = attention.attention_probs(torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4), mask, causal=True)
    assert torch.isfinite(probs).all()
    assert (probs[0, :, :2] == 0).all()  # padding queries
    assert (probs[0, :, :, :2] == 0).all()  # padding keys
    assert (probs[0].triu(1) == 0).all()  # no future keys
    torch.testing.assert_close(probs[0, :, 2:].sum(-1), torch.ones(3, 3))


def _eager(path, bidirectional: bool = False):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    if bidirectional:
        attention.set_attention(model.config, "bidirectional")
        attention.mark_modules(model, "bidirectional")
    return model


@pytest.fixture(scope="module")
def smollm2_eager(smollm2_path):
    return _eager(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_bidirectional_eager(smollm2_path):
    return _eager(smollm2_path, bidirectional=True)


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
@pytest.mark.parametrize("which", ["smollm2", "smollm2_bidirectional", "minilm"])
def test_recomputed_attention_equals_eager_attention(which, layer, left, request):
    model = request.getfixturevalue(f"{which}_eager")
    ids, mask = _ids(model, left)
    pos = attention.positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True,
                    output_hidden_states=True)
        n = len(attention.backbone_layers(model))
        probe = attention.probe_for(model, layer % n, attention.native_attention(model) == "causal")
        got = probe(out.hidden_states[layer % n], mask, pos)
    want = out.attentions[layer % n]  # (batch, heads, seq, seq)
    real = mask.bool()
    assert probe.causal == (which == "smollm2")
    if which == "smollm2_bidirectional":  # the eager layer really attends to later tokens
        assert (want[0].triu(1) > 0).any()
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
    assert attention.chunk_plan(4, 6, 40, budget) == plan
    want = attention.received_attention(attention.attention_probs(q, k, mask, causal), mask, causal, True)
    got = attention.received_from_qk(q, k, mask, causal, True, chunk_mb=budget)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got[mask == 0] == 0).all()


def test_chunk_plan_bounds_the_chunk_and_covers_the_shape():
    # gpu.yaml's training batch: 64 x 3 texts, 512 tokens, 32 heads, in a 1 GiB budget
    b, h, q = attention.chunk_plan(192, 32, 512, 1024)
    assert attention._COPIES * 4 * b * h * q * 512 <= 1024 * 2**20
    assert q == 512 and h == 32 and b >= 1  # whole query rows and heads first
    assert attention.chunk_plan(2, 2, 8, 256) == (2, 2, 8)  # fits: one chunk, the unchunked path
    assert attention.chunk_plan(1, 1, 10**6, 1)[2] >= 1  # a sequence longer than the budget still runs


def test_whole_batch_within_budget_is_bitwise_the_unchunked_path():
    q, k, mask = _qk(3, 4, 4, 16, 8)
    want = attention.received_attention(attention.attention_probs(q, k, mask, True), mask, True, True)
    assert torch.equal(attention.received_from_qk(q, k, mask, True, True, chunk_mb=256), want)


def test_chunked_pooling_keeps_gradients_through_weights():
    q, k, mask = _qk(3, 4, 2, 24, 8, dtype=torch.float64)
    grads = []
    for budget in (None, 0.001):
        qq = q.clone().requires_grad_(True)
        r = attention.received_from_qk(qq, k, mask, True, True, chunk_mb=budget)
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
    assert attention.chunk_plan(3, 9, seq, 1.0) < (3, 9, seq)  # really chunked at this budget
    chunked = enc.encode(texts)
    assert (whole * chunked).sum(-1).min() > 1 - 1e-6
    assert abs(whole - chunked).max() < 1e-6


# ---------------------------------------------------------------- encoder.attention


def test_bidirectional_and_causal_give_different_vectors(smollm2_path):
    from mgh_ray.encoder import Encoder, EncoderConfig

    texts = ["Kenya's runner wins the London marathon", "Shares in the phone maker fell sharply"]
    vecs, first = {}, {}
    for att in ("causal", "bidirectional"):
        enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), attention=att, max_length=32,
                                                pooling={"mode": "mean"}))
        assert enc.config.attention == att and enc.causal == (att == "causal")
        vecs[att] = enc.encode(texts)
        with torch.no_grad():  # the first token's final state, for two texts that differ at the end
            batch = enc.tokenize(["the cat sat on the mat", "the cat sat on the rug"])
            hidden = enc.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        first[att] = (hidden[0, 0] - hidden[1, 0]).abs().max().item()
    assert float((vecs["causal"] * vecs["bidirectional"]).sum(-1).max()) < 0.999
    assert first["causal"] == 0.0  # under a causal mask position 0 sees itself only
    assert first["bidirectional"] > 1e-3  # bidirectional: it sees the whole text


def test_a_folder_is_loaded_only_with_the_attention_it_was_trained_with(smollm2_path, minilm_path, tmp_path):
    from mgh_ray.encoder import Encoder, EncoderConfig

    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), attention="bidirectional",
                                            max_length=32, pooling={"mode": "mean"}))
    enc.save(tmp_path / "model")
    assert Encoder.load(tmp_path / "model").config.attention == "bidirectional"  # recorded in encoder.yaml
    with pytest.raises(ValueError, match="trained with bidirectional attention.*loaded with causal"):
        Encoder.load(tmp_path / "model", attention="causal")
    from mgh_ray import export

    export.write(enc, tmp_path / "export", prompts={"query": "Retrieve the article"})
    merged = tmp_path / "export" / "merged"
    assert '"is_causal": false' in (merged / "config.json").read_text()
    with pytest.raises(ValueError, match="trained with bidirectional attention, but encoder.attention is causal"):
        Encoder.from_config(EncoderConfig(backbone=str(merged), attention="causal"))
    assert Encoder.from_config(EncoderConfig(backbone=str(merged))).config.attention == "bidirectional"
    with pytest.raises(ValueError, match="applies to decoder LLMs only"):
        Encoder.from_config(EncoderConfig(backbone=str(minilm_path), attention="causal"))
