"""Attention: one layer's attention probabilities, recomputed, and the backbone's attention mask.

ATA pooling (`pooling.py`) weighs each token by the attention it receives in one layer. Fast kernels
(SDPA, FlashAttention) never return probabilities, and `output_attentions=True` forces eager
attention in *every* layer. So `AttentionProbe` recomputes softmax(QK^T/sqrt(d) + mask) for the one
layer from that layer's own input (`hidden_states[layer]` of the backbone output) and projections,
rotary included for Llama-style models.

Memory: the full (batch, heads, seq, seq) float32 probabilities of a 7B model's training batch
(192 texts x 512 tokens x 32 heads) take 6.4 GB a copy. `received_from_qk` never holds them: softmax
rows are independent, so r is summed over chunks of (batch, heads, query rows) sized to a budget in
MiB; when everything fits in one chunk it is the unchunked computation itself (same numbers),
otherwise the sums agree to float32 rounding (tests/test_attention.py).

Causal or bidirectional. A decoder LLM attends causally; LLM2Vec (the base of the paper's method)
makes it bidirectional: every token attends to every real token. `set_attention` does that through
the config key that transformers' mask builder and vLLM's Llama both read (`is_causal`), so a saved
folder carries the choice; the probe then recomputes the same mask. Under a causal mask the first
token's final state depends on that token alone (the same vector for every text), which is why the
choice matters for ATA, whose heaviest anchor is usually that token.

    probe = probe_for(model, layer=-1, causal=False)
    r = probe.received(hidden_states[-1], attention_mask, None, causal_norm=False, chunk_mb=256)  # (b, seq)

    python -m pytest -q tests/test_attention.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

Attention = Literal["causal", "bidirectional"]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens, so left padding gives the positions right padding gives."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq)



def attention_probs(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor,
                    causal: bool) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + mask), the probabilities an eager kernel would return.

    q: (batch, heads, seq, d); k: (batch, kv_heads, seq, d) (grouped-query keys are repeated).
    Rows of padding queries are zero (they never count as receivers' sources).
    """
    b, h, s, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)  # (batch, heads, seq, d)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(d)  # (batch, heads, seq, seq)
    valid = attention_mask.bool()  # (batch, seq)
    allowed = valid[:, None, None, :].expand(b, 1, s, s)  # (batch, 1, query, key)
    if causal:
        tri = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()  # (query, key)
        allowed = allowed & tri
    # finite fill, not -inf: padding query rows under left padding see no key at all
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1) * allowed  # (batch, heads, seq, seq)
    return probs * valid[:, None, :, None]  # zero padding query rows


def received_attention(probs: torch.Tensor, attention_mask: torch.Tensor, causal: bool,
                       causal_norm: bool) -> torch.Tensor:
    """r_j: attention token j receives, summed over real queries, averaged over heads."""
    m = attention_mask.to(probs.dtype)
    r = (probs.mean(1) * m[:, :, None]).sum(1)  # (batch, seq): queries of padding rows never count
    return _causal_normalise(r, attention_mask, causal, causal_norm)


def _causal_normalise(r: torch.Tensor, attention_mask: torch.Tensor, causal: bool,
                      causal_norm: bool) -> torch.Tensor:
    if causal and causal_norm:
        m = attention_mask.to(r.dtype)
        seen_by = m.flip(-1).cumsum(-1).flip(-1)  # (batch, seq): real queries i >= j
        r = r / seen_by.clamp(min=1)
    return r


# float32 (query, key) intermediates alive at once in `_received_block`: scores, masked scores,
# softmax, masked probabilities. The budget is divided by this so that it bounds the peak.
_COPIES = 4


def chunk_plan(batch: int, heads: int, seq: int, budget_mb: float) -> tuple[int, int, int]:
    """(batch, heads, query rows) per chunk so that `_COPIES` float32 (chunk, seq) tensors fit the budget.

    Query rows are cut first (a whole row is the unit softmax needs), then heads, then batch."""
    rows = max(1, int(budget_mb * 2**20) // (_COPIES * 4 * seq))  # (query, key) rows that fit
    q_rows = min(seq, rows)
    h = max(1, min(heads, rows // q_rows))
    b = max(1, min(batch, rows // (q_rows * h)))
    return b, h, q_rows


def _received_block(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, start: int,
                    causal: bool) -> torch.Tensor:
    """Attention received by every key from the query rows start.. of q, summed over queries and heads.

    q: (batch, heads, rows, d); k: (batch, heads, seq, d); valid: (batch, seq) real tokens."""
    rows, seq, d = q.shape[2], k.shape[2], q.shape[3]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(d)  # (batch, heads, rows, seq)
    allowed = valid[:, None, None, :]  # (batch, 1, 1, seq)
    if causal:
        qpos = torch.arange(start, start + rows, device=q.device)[:, None]  # (rows, 1)
        allowed = allowed & (torch.arange(seq, device=q.device)[None, :] <= qpos)  # (batch, 1, rows, seq)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)  # finite: see attention_probs
    probs = scores.softmax(-1) * allowed  # (batch, heads, rows, seq)
    probs = probs * valid[:, None, start:start + rows, None]  # padding queries give nothing
    return probs.sum(2).sum(1)  # (batch, seq)


def received_from_qk(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor, causal: bool,
                     causal_norm: bool, chunk_mb: float | None = None) -> torch.Tensor:
    """`received_attention(attention_probs(q, k, ...))` without holding all probabilities at once.

    q: (batch, heads, seq, d); k: (batch, kv_heads, seq, d). `chunk_mb`: memory budget of the float32
    intermediates (None: no bound). When the whole batch fits, this is exactly the unchunked path.
    Under autograd each chunk is checkpointed, so backward also holds one chunk at a time."""
    b, h, s, _ = q.shape
    plan = (b, h, s) if chunk_mb is None else chunk_plan(b, h, s, chunk_mb)
    if plan == (b, h, s):
        return received_attention(attention_probs(q, k, attention_mask, causal), attention_mask, causal,
                                  causal_norm)
    bc, hc, qc = plan
    group = h // k.shape[1]  # grouped-query attention: query head i reads key head i // group
    valid = attention_mask.bool()  # (batch, seq)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for b0 in range(0, b, bc):
        acc = q.new_zeros(min(bc, b - b0), s, dtype=torch.float32)  # (batch chunk, seq)
        for h0 in range(0, h, hc):
            heads = torch.arange(h0, min(h0 + hc, h), device=k.device) // group
            kb = k[b0:b0 + bc].index_select(1, heads)  # (batch chunk, head chunk, seq, d)
            for i0 in range(0, s, qc):
                args = (q[b0:b0 + bc, h0:h0 + hc, i0:i0 + qc], kb, valid[b0:b0 + bc], i0, causal)
                if grad:
                    acc = acc + checkpoint(_received_block, *args, use_reentrant=False)
                else:
                    acc += _received_block(*args)
        parts.append(acc)
    r = torch.cat(parts) / h  # (batch, seq): mean over heads
    return _causal_normalise(r, attention_mask, causal, causal_norm)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Static rotary tables (default/linear/llama3 rope), as the backbone's own rotary module makes them."""
    freqs = positions[..., None].float() * inv_freq.float().to(x.device)  # (batch, seq, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, d)
    return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


@dataclass
class AttentionProbe:
    """Recomputes one layer's attention probabilities from that layer's input hidden states.

    Holds references to the layer's live modules (LoRA-wrapped projections included), so the
    weights follow training. `rotary(x, positions) -> (cos, sin)` or None (absolute positions).
    """

    q: Callable[[torch.Tensor], torch.Tensor]
    k: Callable[[torch.Tensor], torch.Tensor]
    norm: Callable[[torch.Tensor], torch.Tensor] | None
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool

    def project(self, x: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's queries (batch, heads, seq, d) and keys (batch, kv_heads, seq, d), rotary applied."""
        b, s, _ = x.shape  # x: (batch, seq, hidden), the layer's input
        h = self.norm(x) if self.norm is not None else x
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (batch, heads, seq, d)
        k = self.k(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # (batch, kv_heads, seq, d)
        if self.rotary is not None:
            pos = positions if positions is not None else positions_from_mask(attention_mask)
            cos, sin = self.rotary(x, pos)  # (batch, seq, d) each
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return q, k

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.project(x, attention_mask, positions)
        return attention_probs(q, k, attention_mask, self.causal)  # (batch, heads, seq, seq)

    def received(self, x: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None,
                 causal_norm: bool, chunk_mb: float | None) -> torch.Tensor:
        """(batch, seq) received attention of this layer, in chunks within `chunk_mb` MiB."""
        q, k = self.project(x, attention_mask, positions)
        return received_from_qk(q, k, attention_mask, self.causal, causal_norm, chunk_mb)


def backbone_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a base (headless) backbone."""
    if hasattr(model, "layers"):  # Llama, Mistral, Qwen2 ...
        return model.layers
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):  # BERT family
        return model.encoder.layer
    raise ValueError(f"ATA pooling does not know the layer layout of {type(model).__name__}")


def probe_for(model: torch.nn.Module, layer: int, causal: bool | None = None) -> AttentionProbe:
    """An `AttentionProbe` over layer `layer` of a base backbone (LlamaModel-like or BertModel-like).

    `causal`: the mask the backbone runs with (None: its native one, `native_attention`); a decoder
    made bidirectional (`set_attention`) is probed without the causal mask."""
    cfg = model.config
    block = backbone_layers(model)[layer]
    if hasattr(block, "self_attn") and hasattr(block.self_attn, "q_proj"):
        attn = block.self_attn
        if hasattr(attn, "q_norm"):
            raise ValueError(f"{type(attn).__name__} normalises q/k per head; the ATA probe does not "
                             "support that yet")
        heads, head_dim = cfg.num_attention_heads, attn.head_dim
        kv_heads = getattr(cfg, "num_key_value_heads", heads)
        rotary = model.rotary_emb if hasattr(model, "rotary_emb") else None
        return AttentionProbe(attn.q_proj, attn.k_proj, block.input_layernorm,
                              (lambda x, p: rotary(x, p)) if rotary is not None else None,
                              heads, kv_heads, head_dim, causal=True if causal is None else causal)
    if hasattr(block, "attention") and hasattr(block.attention, "self"):
        sa = block.attention.self
        native = bool(getattr(sa, "is_causal", False))
        return AttentionProbe(sa.query, sa.key, None, None, sa.num_attention_heads, sa.num_attention_heads,
                              sa.attention_head_size, causal=native if causal is None else causal)
    raise ValueError(f"ATA pooling does not know the attention layout of {type(block).__name__}")


def native_attention(model: torch.nn.Module) -> Attention:
    """The attention a backbone was built with: "causal" for decoder LLMs, "bidirectional" for
    BERT-style encoders, and for a decoder whose config says `is_causal: false` (a folder this
    project exported from a bidirectional encoder)."""
    if getattr(model.config, "is_causal", True) is False:
        return "bidirectional"
    try:
        return "causal" if probe_for(model, -1).causal else "bidirectional"
    except ValueError:
        return "bidirectional" if hasattr(model, "encoder") else "causal"


def is_decoder(model: torch.nn.Module) -> bool:
    """Whether the backbone is a decoder LLM (its mask is a setting) rather than a BERT-style encoder."""
    layers = backbone_layers(model)
    return hasattr(layers[0], "self_attn")


def recorded_attention(config: Any) -> Attention | None:
    """The attention a model folder's config.json states (`is_causal`), None when it says nothing
    (every hub decoder: causal by construction)."""
    value = config.to_dict().get("is_causal") if hasattr(config, "to_dict") else None
    return None if value is None else ("causal" if value else "bidirectional")


def set_attention(config: Any, attention: Attention) -> None:
    """Make a decoder config build causal or bidirectional attention (before the model is built).

    transformers' mask builder reads `config.is_causal` (False: every token attends to every real
    token, LLM2Vec's mask) and vLLM's Llama reads the same key, so a saved folder carries it too."""
    config.is_causal = attention == "causal"


def mark_modules(model: torch.nn.Module, attention: Attention) -> None:
    """Set `is_causal` on every attention module too: SDPA and FlashAttention take it as their causal
    flag whenever transformers hands them no explicit mask (a batch without padding)."""
    for block in backbone_layers(model):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "is_causal"):
            attn.is_causal = attention == "causal"
