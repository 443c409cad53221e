"""Pooling: token states -> one vector. Anchor-Token-Aware (ATA) pooling and its baselines.

ATA (Pan et al., "Negative Matters", ACL 2025) weighs each token by the attention it *receives* in one layer, so the "anchor"
tokens LLMs concentrate attention on (first token, punctuation, final EOS) weigh more. No parameters.

    r_j = mean over heads of sum over valid queries i of A[h, i, j]    (A: one layer's attention)
    r_j /= #queries that can see j                                       (causal_norm, decoders only)
    w   = normalise(r ** (1/temperature)) over the pooling mask, optionally top-k only
    e   = mean_mix * mean(h) + (1 - mean_mix) * sum_j w_j h_j

Fast kernels (SDPA, FlashAttention) never return probabilities, and `output_attentions=True` forces
eager attention in *every* layer. So `AttentionProbe` recomputes softmax(QK^T/sqrt(d) + mask) for the
one layer from that layer's own input and projections (rotary included for Llama-style models);
its input is `hidden_states[layer]` of the backbone output.

Memory: the full (batch, heads, seq, seq) float32 probabilities of a 7B model's training batch
(192 texts x 512 tokens x 32 heads) take 6.4 GB a copy. `received_from_qk` never holds them: softmax
rows are independent, so r is summed over chunks of (batch, heads, query rows) sized to
`PoolingConfig.ata_chunk_mb`; when everything fits in one chunk it is the unchunked computation
itself (same numbers), otherwise the sums agree to float32 rounding (tests/test_pooling.py).

Baselines: mean, last token (EOS), CLS, position-weighted mean. The same `pool` runs in training,
`Encoder.encode`, Serve, MTEB and the sentence-transformers export (`AnchorPooling`, a module of
that folder holding its own copy of the probe layer's weights). Padding is never pooled; left and
right padding give the same vectors.

    python -m pytest -q tests/test_pooling.py
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from mgh_ray.config import Section

log = logging.getLogger(__name__)

Mode = Literal["ata", "mean", "last", "cls", "weighted_mean"]


class PoolingConfig(Section):
    """How token states become one vector. Only `mode` matters for the baselines."""

    mode: Mode = "ata"
    layer: int = Field(-1, strict=True)  # whose attention gives the ATA weights; python index over layers (-1 = last)
    causal_norm: bool = True  # divide received attention by how many queries can see the token
    temperature: float = Field(1.0, gt=0)  # w ~ r^(1/T): T < 1 sharpens toward anchors, T > 1 flattens
    top_k: int | None = Field(None, ge=1, strict=True)  # pool only the k tokens that receive most attention
    mean_mix: float = Field(0.0, ge=0, le=1)  # a in e = a * mean + (1 - a) * ata
    exclude_instruction: bool = False  # keep query-instruction tokens out of the pooled set
    grad_through_weights: bool = False  # backprop through the ATA weights (costs the layer's n^2 graph)
    # peak extra memory (MiB) of the ATA weights: received attention is summed over chunks of
    # (batch, heads, query rows) whose float32 intermediates fit this budget; 1 MiB .. 1 TiB
    ata_chunk_mb: float = Field(256.0, ge=1, le=1_048_576)


# ---------------------------------------------------------------- masks and positions


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens, so left padding gives the positions right padding gives."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, seq)


def prefix_mask(attention_mask: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """Mask of real tokens after the first `prefix_len[b]` real tokens (instruction exclusion)."""
    rank = attention_mask.long().cumsum(-1)  # (batch, seq): 1-based rank among real tokens
    return attention_mask.bool() & (rank > prefix_len.view(-1, 1))  # (batch, seq)


# ---------------------------------------------------------------- baselines


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (batch, dim)


def last_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last real token (EOS for decoders), wherever the padding is."""
    seq = torch.arange(hidden.shape[1], device=hidden.device)  # (seq,)
    idx = (attention_mask.long() * (seq + 1)).argmax(-1)  # (batch,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (batch, dim)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first real token ([CLS] for BERT-style encoders)."""
    idx = attention_mask.long().argmax(-1)  # (batch,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (batch, dim)


def weighted_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): the k-th real token weighs k, so later, better-informed tokens
    of a causal model count more."""
    rank = attention_mask.long().cumsum(-1).to(hidden.dtype) * mask.to(hidden.dtype)  # (batch, seq)
    w = rank / rank.sum(-1, keepdim=True).clamp(min=1e-9)  # (batch, seq)
    return (w.unsqueeze(-1) * hidden).sum(1)  # (batch, dim)


# ---------------------------------------------------------------- ATA


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


def anchor_weights(r: torch.Tensor, mask: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """Normalised ATA weights over `mask` (padding and excluded tokens get exactly zero)."""
    mask = mask.bool()
    logits = torch.log(r.clamp(min=1e-12)) / cfg.temperature  # (batch, seq)
    if cfg.top_k is not None:
        kth = logits.masked_fill(~mask, float("-inf")).topk(min(cfg.top_k, r.shape[1]), -1).values[:, -1:]
        mask = mask & (logits >= kth)
    logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1).nan_to_num(0.0)  # (batch, seq)


def pool(cfg: PoolingConfig, hidden: torch.Tensor, attention_mask: torch.Tensor,
         pool_mask: torch.Tensor | None = None, probs: torch.Tensor | None = None,
         causal: bool = True, received: torch.Tensor | None = None) -> torch.Tensor:
    """One vector per sequence (not normalised).

    hidden: (batch, seq, dim) final states; attention_mask: (batch, seq) real tokens;
    pool_mask: (batch, seq) tokens allowed into the pool (default: all real ones; `last`/`cls` ignore it);
    for `ata` either probs: (batch, heads, seq, seq) one layer's attention, or received: (batch, seq)
    its received attention as `received_from_qk` / `AttentionProbe.received` give it (bounded memory).
    """
    mask = attention_mask.bool() if pool_mask is None else pool_mask.bool() & attention_mask.bool()
    if cfg.mode == "mean":
        return mean_pool(hidden, mask)
    if cfg.mode == "last":
        return last_pool(hidden, attention_mask)
    if cfg.mode == "cls":
        return cls_pool(hidden, attention_mask)
    if cfg.mode == "weighted_mean":
        return weighted_mean_pool(hidden, attention_mask, mask)
    if received is not None:
        r = received
    elif probs is not None:
        r = received_attention(probs, attention_mask, causal, cfg.causal_norm)
    else:
        raise ValueError("ATA pooling needs the probe layer's attention (probs= or received=)")
    if not cfg.grad_through_weights:
        r = r.detach()
    w = anchor_weights(r, mask, cfg).to(hidden.dtype)  # (batch, seq)
    ata = (w.unsqueeze(-1) * hidden).sum(1)  # (batch, dim)
    if cfg.mean_mix > 0:
        ata = cfg.mean_mix * mean_pool(hidden, mask) + (1 - cfg.mean_mix) * ata
    return ata


# ---------------------------------------------------------------- probe: one layer's attention


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


def probe_for(model: torch.nn.Module, layer: int) -> AttentionProbe:
    """An `AttentionProbe` over layer `layer` of a base backbone (LlamaModel-like or BertModel-like)."""
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
                              heads, kv_heads, head_dim, causal=True)
    if hasattr(block, "attention") and hasattr(block.attention, "self"):
        sa = block.attention.self
        return AttentionProbe(sa.query, sa.key, None, None, sa.num_attention_heads, sa.num_attention_heads,
                              sa.attention_head_size, causal=bool(getattr(sa, "is_causal", False)))
    raise ValueError(f"ATA pooling does not know the attention layout of {type(block).__name__}")


def is_causal(model: torch.nn.Module) -> bool:
    """Whether the backbone attends causally (decoder LLM) or bidirectionally (BERT-style encoder)."""
    try:
        return probe_for(model, -1).causal
    except ValueError:
        return not hasattr(model, "encoder")


# ---------------------------------------------------------------- sentence-transformers module


class AnchorPooling(torch.nn.Module):
    """The pooling of this module as a sentence-transformers module (after a Transformer module that
    outputs `all_layer_embeddings`). For ATA it owns a copy of the probe layer's norm and q/k weights
    (merged LoRA included), so the exported folder needs nothing from mgh_ray's training side."""

    config_keys = ["pooling", "hidden_size", "heads", "kv_heads", "head_dim", "causal", "norm_eps",
                   "qk_bias", "rope_scaling", "has_rope", "layer_index"]
    forward_kwargs: set[str] = set()
    save_in_root = False

    def __init__(self, pooling: dict[str, Any], hidden_size: int, heads: int = 0, kv_heads: int = 0,
                 head_dim: int = 0, causal: bool = True, norm_eps: float | None = None, qk_bias: bool = False,
                 rope_scaling: float = 1.0, has_rope: bool = False, layer_index: int = -1) -> None:
        super().__init__()
        self.pooling, self.cfg = pooling, PoolingConfig.model_validate(pooling)
        self.hidden_size, self.heads, self.kv_heads, self.head_dim = hidden_size, heads, kv_heads, head_dim
        self.causal, self.norm_eps, self.qk_bias = causal, norm_eps, qk_bias
        self.rope_scaling, self.has_rope, self.layer_index = rope_scaling, has_rope, layer_index
        if self.cfg.mode == "ata":
            self.norm = torch.nn.RMSNorm(hidden_size, eps=norm_eps) if norm_eps is not None else None
            self.q = torch.nn.Linear(hidden_size, heads * head_dim, bias=qk_bias)
            self.k = torch.nn.Linear(hidden_size, kv_heads * head_dim, bias=qk_bias)
            self.register_buffer("inv_freq", torch.zeros(head_dim // 2) if has_rope else torch.zeros(0))

    @classmethod
    def from_backbone(cls, cfg: PoolingConfig, model: torch.nn.Module) -> AnchorPooling:
        """Copy the probe layer of a (merged) base backbone into a standalone module."""
        hidden = model.config.hidden_size
        if cfg.mode != "ata":
            return cls(cfg.model_dump(), hidden)
        layers = backbone_layers(model)
        index = cfg.layer % len(layers)
        probe = probe_for(model, index)
        norm_eps = getattr(probe.norm, "variance_epsilon", getattr(probe.norm, "eps", None))
        rotary = getattr(model, "rotary_emb", None)
        if rotary is not None and getattr(rotary, "rope_type", "default") == "dynamic":
            raise ValueError("dynamic rope cannot be exported into a static probe")
        mod = cls(cfg.model_dump(), hidden, probe.heads, probe.kv_heads, probe.head_dim, probe.causal,
                  None if probe.norm is None else float(norm_eps), probe.q.bias is not None,
                  float(getattr(rotary, "attention_scaling", 1.0)), rotary is not None, index)
        with torch.no_grad():
            mod.q.load_state_dict(probe.q.state_dict())
            mod.k.load_state_dict(probe.k.state_dict())
            if mod.norm is not None:
                mod.norm.weight.copy_(probe.norm.weight)
            if rotary is not None:
                mod.inv_freq.copy_(rotary.inv_freq)
        return mod.float()

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        hidden = features["token_embeddings"]  # (batch, seq, dim)
        attention_mask = features["attention_mask"]  # (batch, seq)
        pool_mask = None
        if self.cfg.exclude_instruction and features.get("prompt_length"):
            pl = features["prompt_length"]
            n = int(pl[0].item()) if isinstance(pl, torch.Tensor) else int(pl)
            pool_mask = prefix_mask(attention_mask, torch.full((hidden.shape[0],), n, device=hidden.device))
        r = None
        if self.cfg.mode == "ata":
            x = features["all_layer_embeddings"][self.layer_index]  # (batch, seq, hidden): probe layer input
            rotary = None
            if self.has_rope:
                rotary = lambda t, p: rope_cos_sin(t, p, self.inv_freq, self.rope_scaling)  # noqa: E731
            probe = AttentionProbe(self.q, self.k, self.norm, rotary, self.heads, self.kv_heads,
                                   self.head_dim, self.causal)
            r = probe.received(x.to(self.q.weight.dtype), attention_mask, None, self.cfg.causal_norm,
                               self.cfg.ata_chunk_mb)  # (batch, seq)
        features["sentence_embedding"] = pool(self.cfg, hidden, attention_mask, pool_mask, None, self.causal,
                                              received=r)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.hidden_size

    def get_embedding_dimension(self) -> int:
        return self.hidden_size

    def get_config_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.config_keys}

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, "config.json"), "w") as f:
            json.dump(self.get_config_dict(), f, indent=1)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if state:
            save_file(state, os.path.join(output_path, "model.safetensors"))

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> AnchorPooling:
        from safetensors.torch import load_file

        folder = os.path.join(model_name_or_path, subfolder)
        with open(os.path.join(folder, "config.json")) as f:
            mod = cls(**json.load(f))
        weights = os.path.join(folder, "model.safetensors")
        if os.path.isfile(weights):
            mod.load_state_dict(load_file(weights))
        return mod
