"""Pooling: token states -> one vector. Anchor-Token-Aware (ATA) pooling and its baselines.

ATA (Pan et al., "Negative Matters", ACL 2025) weighs each token by the attention it *receives* in one
layer, so the "anchor" tokens LLMs concentrate attention on (first token, punctuation, final EOS) weigh
more. No parameters.

    r_j = mean over heads of sum over valid queries i of A[h, i, j]    (A: one layer's attention)
    r_j /= #queries that can see j                                       (causal_norm, causal masks only)
    w   = normalise(r ** (1/temperature)) over the pooling mask, optionally top-k only
    e   = mean_mix * mean(h) + (1 - mean_mix) * sum_j w_j h_j

A comes from `attention.AttentionProbe`, which recomputes the probe layer's probabilities under the
mask the backbone runs with (causal, or bidirectional as in LLM2Vec) within `ata_chunk_mb`.

The pooled set: real tokens only (padding never; left and right padding give the same vectors), and
with `exclude_instruction` (the default, as in LLM2Vec and the paper) not the tokens the input
template puts before the text: a query's instruction and the instruct format's markers. They are the
same for every text of a task, so pooling them adds one input-independent vector to every query.

Baselines: mean, last token (EOS), CLS, position-weighted mean. The same `pool` runs in training,
`Encoder.encode`, Serve, MTEB and the sentence-transformers export (`AnchorPooling`, a module of
that folder holding its own copy of the probe layer's weights).

    python -m pytest -q tests/test_pooling.py
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Literal

import torch
from pydantic import Field

from mgh_ray.attention import (
    AttentionProbe,
    backbone_layers,
    native_attention,
    probe_for,
    received_attention,
    rope_cos_sin,
)
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
    # keep what the input template puts before the text (instruction, instruct-format markers) out of
    # the pooled set; counted on the tokenised input itself, so a BPE merge at the boundary is exact
    exclude_instruction: bool = True
    # the token `last` pools when the encoder appends EOS: "text", the text's own final token, or "eos",
    # the appended EOS (E5-mistral's choice). SmolLM2's EOS closes a chat turn (<|im_end|>): its state
    # predicts the template's next token whatever the text (untrained, unrelated texts sit at cosine
    # 0.88, as close as a query and its positive), and contrastive training collapses it instead of
    # teaching it to summarise (docs/method.md; tests/test_training.py)
    last_token: Literal["text", "eos"] = "text"
    grad_through_weights: bool = False  # backprop through the ATA weights (costs the layer's n^2 graph)
    # peak extra memory (MiB) of the ATA weights: received attention is summed over chunks of
    # (batch, heads, query rows) whose float32 intermediates fit this budget; 1 MiB .. 1 TiB
    ata_chunk_mb: float = Field(256.0, ge=1, le=1_048_576)


# ---------------------------------------------------------------- masks and positions


def prefix_mask(attention_mask: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """Mask of real tokens after the first `prefix_len[b]` real tokens (instruction exclusion)."""
    rank = attention_mask.long().cumsum(-1)  # (batch, seq): 1-based rank among real tokens
    return attention_mask.bool() & (rank > prefix_len.view(-1, 1))  # (batch, seq)


# ---------------------------------------------------------------- baselines


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (batch, dim)


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last token of `mask` (the last real one, or the text's own last token when the mask leaves
    the appended EOS out), wherever the padding is."""
    seq = torch.arange(hidden.shape[1], device=hidden.device)  # (seq,)
    idx = (mask.long() * (seq + 1)).argmax(-1)  # (batch,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (batch, dim)


def without_final(mask: torch.Tensor) -> torch.Tensor:
    """`mask` without each row's last true position (an appended EOS), unless that leaves it empty."""
    seq = torch.arange(mask.shape[1], device=mask.device)  # (seq,)
    last = (mask.long() * (seq + 1)).argmax(-1, keepdim=True)  # (batch, 1)
    out = mask.bool() & (seq[None, :] != last)  # (batch, seq)
    return torch.where(out.any(-1, keepdim=True), out, mask.bool())


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
    pool_mask: (batch, seq) tokens allowed into the pool (default: all real ones; `last` takes its final
    token, `cls` ignores it);
    for `ata` either probs: (batch, heads, seq, seq) one layer's attention, or received: (batch, seq)
    its received attention as `received_from_qk` / `AttentionProbe.received` give it (bounded memory).
    """
    mask = attention_mask.bool() if pool_mask is None else pool_mask.bool() & attention_mask.bool()
    if cfg.mode == "mean":
        return mean_pool(hidden, mask)
    if cfg.mode == "last":
        return last_pool(hidden, mask)
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


# ---------------------------------------------------------------- sentence-transformers module


class AnchorPooling(torch.nn.Module):
    """The pooling of this module as a sentence-transformers module (after a Transformer module that
    outputs `all_layer_embeddings`). For ATA it owns a copy of the probe layer's norm and q/k weights
    (merged LoRA included), so the exported folder needs nothing from mgh_ray's training side."""

    config_keys = ["pooling", "hidden_size", "heads", "kv_heads", "head_dim", "causal", "norm_eps",
                   "qk_bias", "rope_scaling", "has_rope", "layer_index", "eos_appended"]
    forward_kwargs: set[str] = set()
    save_in_root = False

    def __init__(self, pooling: dict[str, Any], hidden_size: int, heads: int = 0, kv_heads: int = 0,
                 head_dim: int = 0, causal: bool = True, norm_eps: float | None = None, qk_bias: bool = False,
                 rope_scaling: float = 1.0, has_rope: bool = False, layer_index: int = -1,
                 eos_appended: bool = False) -> None:
        super().__init__()
        self.pooling, self.cfg = pooling, PoolingConfig.model_validate(pooling)
        self.hidden_size, self.heads, self.kv_heads, self.head_dim = hidden_size, heads, kv_heads, head_dim
        self.causal, self.norm_eps, self.qk_bias = causal, norm_eps, qk_bias
        self.rope_scaling, self.has_rope, self.layer_index = rope_scaling, has_rope, layer_index
        self.eos_appended = eos_appended  # the tokenizer ends every text with EOS (see `last_token`)
        if self.cfg.mode == "ata":
            self.norm = torch.nn.RMSNorm(hidden_size, eps=norm_eps) if norm_eps is not None else None
            self.q = torch.nn.Linear(hidden_size, heads * head_dim, bias=qk_bias)
            self.k = torch.nn.Linear(hidden_size, kv_heads * head_dim, bias=qk_bias)
            self.register_buffer("inv_freq", torch.zeros(head_dim // 2) if has_rope else torch.zeros(0))

    @classmethod
    def from_backbone(cls, cfg: PoolingConfig, model: torch.nn.Module,
                      eos_appended: bool = False) -> AnchorPooling:
        """Copy the probe layer of a (merged) base backbone into a standalone module."""
        hidden = model.config.hidden_size
        if cfg.mode != "ata":
            return cls(cfg.model_dump(), hidden, eos_appended=eos_appended)
        layers = backbone_layers(model)
        index = cfg.layer % len(layers)
        probe = probe_for(model, index, causal=native_attention(model) == "causal")
        norm_eps = getattr(probe.norm, "variance_epsilon", getattr(probe.norm, "eps", None))
        rotary = getattr(model, "rotary_emb", None)
        if rotary is not None and getattr(rotary, "rope_type", "default") == "dynamic":
            raise ValueError("dynamic rope cannot be exported into a static probe")
        mod = cls(cfg.model_dump(), hidden, probe.heads, probe.kv_heads, probe.head_dim, probe.causal,
                  None if probe.norm is None else float(norm_eps), probe.q.bias is not None,
                  float(getattr(rotary, "attention_scaling", 1.0)), rotary is not None, index, eos_appended)
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
        if self.cfg.mode == "last" and self.cfg.last_token == "text" and self.eos_appended:
            pool_mask = without_final(attention_mask if pool_mask is None else pool_mask)
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
