"""The exported encoder as a vLLM pooling model: the same vectors as `Encoder.encode`, on vLLM's engine.

vLLM serves an exported `merged/` folder (`export.write`: config.json names the architecture `ARCH`) with
`runner="pooling"` once this module is registered in every process vLLM starts: `register` is the
project's `vllm.general_plugins` entry point (pyproject.toml), which vLLM loads in its front end, its
engine core and its workers.

`MghRayEncoder` is vLLM's Llama made a pooling model (`as_embedding_model`): attention is causal or
bidirectional as the folder's config.json says (`is_causal`, which vLLM's Llama reads), and the pooler
is the folder's own (`mgh_ray_encoder.yaml`): mean, last or ATA, through `pooling.pool`, L2-normalised
as `Encoder` normalises. ATA weighs tokens by the attention they receive in the probe layer, which
vLLM's kernels never return: the model returns, beside each token's final state, the probe layer's
queries and keys (its input, taken with vLLM's EAGLE-3 hook, through the layer's own norm, QKV
projection and rotary embedding), and the pooler recomputes the received attention per sequence with
`attention.received_from_qk`, within `pooling.ata_chunk_mb`.

What the pooler needs from a request: the whole prompt at once (chunked prefill and prefix caching
off: the class declares MEAN pooling so vLLM turns both off, and the pooler refuses a partial prompt),
and, where the text follows a template prefix that is not pooled (`exclude_instruction`), its length in
tokens: `PoolingParams(task="embed", extra_kwargs={"prefix_len": n})`. The caller tokenises (the
encoder's tokenizer, truncation and prefix count, `Encoder.tokenize`), so prompts reach vLLM as token
ids and both engines read the same tokens.

    register()    # or the entry point, in every vLLM process
    llm = LLM(model="runs/tiny/train/export/merged", runner="pooling", dtype="float32", enforce_eager=True)
    llm.embed([{"prompt_token_ids": ids}], pooling_params=[PoolingParams(extra_kwargs={"prefix_len": 4})])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mgh_ray import attention, pooling

if TYPE_CHECKING:
    from mgh_ray.encoder import EncoderConfig

ARCH = "MghRayEncoder"  # the architecture name an export writes into config.json
CONFIG_FILE = "mgh_ray_encoder.yaml"  # the encoder's resolved config, beside the merged weights

log = logging.getLogger(__name__)


def pool_sequence(cfg: EncoderConfig, h: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None,
                  prefix_len: int, heads: int, kv_heads: int, head_dim: int,
                  normalize: bool = True) -> torch.Tensor:
    """One whole prompt's vector, as the pooler computes it in vLLM's flat batch: `pooling.pool` over the
    sequence's final states `h` (seq, hidden), ATA weighing tokens by the probe layer's received attention
    from its queries `q` (seq, heads * head_dim) and keys `k` (seq, kv_heads * head_dim), the first
    `prefix_len` tokens (the template's prefix) left out, then L2 normalisation where the encoder
    normalises. Pure torch (no vLLM), so the GPU check runs this very function. Returns (hidden,) float32."""
    pcfg = cfg.pooling
    causal = cfg.attention != "bidirectional"
    n = h.shape[0]
    mask = torch.ones(1, n, dtype=torch.long, device=h.device)  # (1, seq): one whole prompt
    pool_mask = pooling.prefix_mask(mask, torch.tensor([prefix_len], device=h.device)) if prefix_len else None
    if pool_mask is not None and not pool_mask.any():
        pool_mask = None  # a text cut away by truncation: the whole sequence, as Encoder does
    if pcfg.mode == "last" and pcfg.last_token == "text" and cfg.append_eos:
        pool_mask = pooling.without_final(mask if pool_mask is None else pool_mask)
    received = None
    if pcfg.mode == "ata":
        qh = q.float().view(n, heads, head_dim).transpose(0, 1)[None]  # (1, heads, seq, d)
        kh = k.float().view(n, kv_heads, head_dim).transpose(0, 1)[None]  # (1, kv_heads, seq, d)
        received = attention.received_from_qk(qh, kh, mask, causal, pcfg.causal_norm,
                                              pcfg.ata_chunk_mb)  # (1, seq)
    vec = pooling.pool(pcfg, h.float()[None], mask, pool_mask, None, causal,
                       received=received)[0]  # (hidden,)
    return F.normalize(vec, dim=-1) if cfg.normalize and normalize else vec


def register() -> None:
    """vLLM plugin entry point: make `ARCH` resolve to this module's model class (lazily imported)."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, f"{__name__}:MghRayEncoder")


def __getattr__(name: str) -> Any:
    # the classes subclass vLLM's and are built on first use, so importing this module (the plugin
    # entry point does, in every vLLM process; the GPU check does, without vLLM) imports no vLLM
    if name in ("MghRayEncoder", "EncoderPooler"):
        model_cls, pooler_cls = _build()
        globals().update(MghRayEncoder=model_cls, EncoderPooler=pooler_cls)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build() -> tuple[type, type]:
    from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
    from vllm.model_executor.models.adapters import as_embedding_model
    from vllm.model_executor.models.interfaces_base import default_pooling_type
    from vllm.model_executor.models.llama import LlamaForCausalLM

    from mgh_ray import config as config_io
    from mgh_ray.encoder import EncoderConfig

    class EncoderPooler(Pooler):
        """Per sequence: `pooling.pool` over the sequence's final states (ATA from its probe q/k), the
        template's prefix left out, then L2 normalisation. No parameters of its own."""

        def __init__(self, cfg: EncoderConfig, hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
            super().__init__()
            self.cfg, self.pcfg = cfg, cfg.pooling
            self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim

        def get_supported_tasks(self) -> set[str]:
            return {"embed"}

        def get_pooling_updates(self, task: str) -> PoolingParamsUpdate:
            return PoolingParamsUpdate()

        def forward(self, hidden_states: torch.Tensor, pooling_metadata: Any) -> list[torch.Tensor]:
            cursor = pooling_metadata.get_pooling_cursor()
            if cursor.is_partial_prefill():
                raise RuntimeError("mgh_ray's pooler needs each prompt whole: run vLLM with "
                                   "enable_chunked_prefill=False and enable_prefix_caching=False")
            lens = cursor.num_scheduled_tokens_cpu.tolist()
            ata = self.pcfg.mode == "ata"
            qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
            if ata:
                states, q_all, k_all = hidden_states.split([self.hidden, qd, kd], dim=-1)  # (T, ...) each
            else:
                states, q_all, k_all = hidden_states, hidden_states, hidden_states
            out = []
            for h, q, k, params in zip(states.split(lens), q_all.split(lens), k_all.split(lens),
                                       pooling_metadata.pooling_params, strict=True):
                extra = (params.extra_kwargs or {}) if params is not None else {}
                normalize = params is None or params.use_activation is not False
                out.append(pool_sequence(self.cfg, h, q if ata else None, k if ata else None,
                                         int(extra.get("prefix_len", 0)), self.heads, self.kv_heads,
                                         self.head_dim, normalize))
            return out

    @default_pooling_type(seq_pooling_type="MEAN")  # vLLM then keeps chunked prefill and prefix caching off
    class MghRayEncoder(as_embedding_model(LlamaForCausalLM)):
        """vLLM's Llama with the pooling of the folder it serves (see the module doc)."""

        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            folder = Path(vllm_config.model_config.model)
            if not (folder / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: serve the merged/ folder that "
                                        "`Encoder.export` writes")
            self.encoder_cfg = config_io.load(EncoderConfig, folder / CONFIG_FILE)
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            hf = vllm_config.model_config.hf_config
            recorded = attention.recorded_attention(hf) or "causal"
            if (self.encoder_cfg.attention or "causal") != recorded:
                raise ValueError(f"{folder}: config.json says {recorded} attention, {CONFIG_FILE} says "
                                 f"{self.encoder_cfg.attention}; export the folder again")
            self.ata = self.encoder_cfg.pooling.mode == "ata"
            if self.ata:
                self.probe = self.encoder_cfg.pooling.layer % len(self.model.layers)
                self.model._set_aux_hidden_state_layers((self.probe,))  # returns the probe layer's input

        def _init_pooler(self, vllm_config: Any, prefix: str = "") -> Pooler:
            hf = vllm_config.model_config.hf_config
            heads = hf.num_attention_heads
            head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
            return EncoderPooler(self.encoder_cfg, hf.hidden_size, heads,
                                 getattr(hf, "num_key_value_heads", heads), head_dim)

        def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: Any = None,
                    inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
            out = self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
            if not self.ata:
                return out  # (tokens, hidden)
            hidden, (x,) = out  # x: (tokens, hidden), the probe layer's input
            layer = self.model.layers[self.probe]
            attn = layer.self_attn
            qkv, _ = attn.qkv_proj(layer.input_layernorm(x))
            q, k, _ = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)  # the layer's own rotary, at each token's position
            return torch.cat([hidden, q, k], dim=-1)  # (tokens, hidden + q + k): the pooler splits them

    MghRayEncoder.__name__ = MghRayEncoder.__qualname__ = ARCH
    return MghRayEncoder, EncoderPooler
