"""Encoder: backbone + LoRA (peft) + pooling + L2 norm; the one object that trains, encodes and serves.

Texts are read in the backbone's input format (`FORMATS`: SmolLM2's ChatML user turn, closed by the
EOS the tokenizer appends): queries with their instruction, documents without (symmetric tasks give
both sides one). What the template puts before the text stays out of the pool (`exclude_instruction`),
counted on the tokenised input itself. The backbone attends causally or bidirectionally
(`attention`); a bidirectional one starts from its MNTP adaptation adapter (`base_adapter`, merged
at load). A folder written by `save` holds the resolved `EncoderConfig` (encoder.yaml: attention and
templates as run) and the adapter (or full weights when LoRA is off), with a copy of the adaptation
adapter; the backbone is named in the config (a pinned asset name such as "smollm2", a local folder
or a hub id), so `Encoder.load(folder)` needs nothing else. `export.write` makes the merged and
sentence-transformers folders of one.

Device and dtype: `from_config`/`load` put the model on `devices.device()` unless told otherwise
(cuda in a Ray worker granted a GPU, or outside Ray when torch sees one; cpu otherwise), in
`EncoderConfig.dtype` ("auto": bf16 on GPUs, fp32 on CPUs), and log which. So Serve and evaluation
replicas, export and training workers follow their Ray resources without code of their own.

Long inputs: the model reads at most `max_tokens` tokens per text (`max_length`, capped by the
backbone's positions). `encode(..., truncation="truncate")` cuts longer texts there (first to
`max_chars` characters, a bound derived from the token limit that never removes a character the
model would read); `truncation="error"` raises `InputTooLong` instead, naming the text.

    enc = Encoder.from_config(EncoderConfig())
    docs = enc.encode(["Kenya wins the marathon"])                            # (1, 576) float32
    qs = enc.encode(["who won?"], instruction="Retrieve the news article")    # formatted as a query
    enc.save("runs/x/model"); Encoder.load("runs/x/model")          # on cuda when Ray granted a GPU
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from mgh_ray import attention, backbone, devices, pooling
from mgh_ray import config as config_io
from mgh_ray.attention import Attention
from mgh_ray.backbone import LoraConfig
from mgh_ray.config import Section
from mgh_ray.inputs import (  # noqa: F401  (InputTooLong, FORMATS: part of the encoder's interface)
    FORMATS,
    Inputs,
    InputTooLong,
    _per_text,
    load_tokenizer,
    prefix_tokens,
    resolve_templates,
)
from mgh_ray.pooling import PoolingConfig

log = logging.getLogger(__name__)

DTYPES = devices.DTYPES
Truncation = Literal["truncate", "error"]
CONFIG_FILE = "encoder.yaml"
BASE_ADAPTER = "base_adapter"  # the folder a saved encoder keeps its adaptation (MNTP) adapter in


class EncoderConfig(Section):
    backbone: str = "smollm2"  # asset name (assets.model_path), local folder or hub id
    # decoder backbones: causal (as pretrained) or bidirectional (every token sees every real token,
    # LLM2Vec); None: the backbone's own (causal decoders, bidirectional BERT-style encoders). A saved
    # folder records the resolved value, and loading it under the other one is refused.
    attention: Attention | None = None
    # an adaptation adapter (the `adapt` stage's MNTP LoRA, path or URI) merged into the backbone
    # before this encoder's own LoRA; a saved folder keeps a copy (relative "base_adapter")
    base_adapter: str | None = None
    pooling: PoolingConfig = Field(default_factory=PoolingConfig)
    max_length: int = Field(128, ge=4, strict=True)  # tokens per text, EOS included
    lora: LoraConfig = Field(default_factory=LoraConfig)
    normalize: bool = True
    # how texts are wrapped (FORMATS); auto: chatml when the tokenizer's chat template is ChatML, else plain
    prompt_format: Literal["auto", "chatml", "plain"] = "auto"
    query_template: str | None = None  # overrides the format's; must contain {instruction}, end with {text}
    document_template: str | None = None  # overrides the format's; must end with {text}
    dtype: devices.DTypeName = "auto"  # auto: bfloat16 on GPUs, float32 on CPUs (devices.pick_dtype)
    padding_side: Literal["right", "left"] = "right"
    append_eos: bool = True  # decoders: end every text with EOS (last-token pooling's summary token, T9)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False  # non-reentrant: the reentrant kind breaks DDP + LoRA (parameters marked ready twice)

    @field_validator("query_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is not None and ("{instruction}" not in v or not v.endswith("{text}")):
            raise ValueError("query_template must contain {instruction} and end with {text}, "
                             "e.g. 'Instruct: {instruction}\\nQuery: {text}'")
        return v

    @field_validator("document_template")
    @classmethod
    def _doc_template(cls, v: str | None) -> str | None:
        if v is not None and (not v.endswith("{text}") or "{instruction}" in v):
            raise ValueError("document_template must end with {text} and hold no {instruction}, "
                             "e.g. '{text}'")
        return v


class Encoder(torch.nn.Module):
    """Texts -> unit vectors. `forward` is the differentiable path training wraps in DDP.

    `config` is the resolved one (attention and input templates as this backbone runs them), so the
    folder `save` writes records them."""

    def __init__(self, cfg: EncoderConfig, backbone: torch.nn.Module, tokenizer,
                 base_adapter: Path | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = backbone  # PeftModel when LoRA is on, else the headless transformers model
        self.tokenizer = tokenizer
        self.base_adapter = base_adapter  # merged into the backbone already; `save` keeps a copy
        self.causal = cfg.attention == "causal"
        self.num_layers = len(attention.backbone_layers(self.base_model))
        # every text ends with the tokenizer's EOS (decoders; see `PoolingConfig.last_token`)
        self.eos_appended = cfg.append_eos and attention.is_decoder(self.base_model)
        self.inputs = Inputs(cfg, tokenizer, self.max_tokens, self.eos_appended)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: EncoderConfig, weights: str | Path | None = None,
                    device: str | torch.device | None = None) -> Encoder:
        """Fresh encoder (new LoRA adapter) or, with `weights`, one restored from a `save` folder.

        `device`: None/"auto" follows this process's Ray resources (`devices.device`); or "cpu", "cuda:N"."""
        from mgh_ray import assets, driver

        driver.check_model_load(f"encoder {cfg.backbone}")

        dev = devices.device(None if device is None else str(device))
        dtype = devices.dtype(cfg.dtype, dev)
        full = Path(weights) / "backbone" if weights is not None else None
        saved_full = full is not None and full.is_dir()  # LoRA off: adaptation already in these weights
        source = full if saved_full else assets.model_path(cfg.backbone)
        model, chosen = backbone.load(source, cfg.attention, cfg.attn_implementation, dtype)
        decoder = attention.is_decoder(model)
        base_adapter = None if saved_full else backbone.base_adapter_dir(cfg.base_adapter, weights)
        if base_adapter is not None:
            model = backbone.merge_base_adapter(model, base_adapter, chosen)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model = backbone.add_lora(model, cfg.lora)
            if weights is not None:
                backbone.load_adapter(model, Path(weights) / "adapter")
        tok = load_tokenizer(source, decoder, cfg)
        fmt, query, document = resolve_templates(cfg, tok)
        resolved = cfg.model_copy(update={"attention": chosen, "prompt_format": fmt, "query_template": query,
                                          "document_template": document})
        enc = cls(resolved, model, tok, base_adapter).to(dev)
        log.info("encoder %s: %s attention%s, %s pooling, %s format, %d layers, dim %d, %s, on %s in %s",
                 cfg.backbone, chosen, " + adaptation adapter" if base_adapter is not None else "",
                 cfg.pooling.mode, fmt, enc.num_layers, enc.dim,
                 "LoRA r=%d" % cfg.lora.r if cfg.lora.enabled else "full weights", dev,
                 str(dtype).removeprefix("torch."))
        return enc

    def load_adapter(self, folder: str | Path) -> None:
        """Put the LoRA weights of a `save` folder into this encoder (same LoRA config), in place."""
        backbone.load_adapter(self.backbone, Path(folder) / "adapter")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None,
             attention: Attention | None = None) -> Encoder:
        """The encoder a `save(folder)` wrote (config, adapter/weights); eval mode, on `device`
        (default: the one this process's Ray resources grant, see `devices`). `folder` may be a URI:
        it is then copied once into this node's cache (storage.local_dir). `attention`: the attention
        the caller expects; a folder trained with the other one is refused, naming both."""
        from mgh_ray import storage

        folder = storage.local_dir(str(folder))
        cfg = config_io.load(EncoderConfig, folder / CONFIG_FILE)
        if attention is not None and cfg.attention is not None and cfg.attention != attention:
            raise ValueError(f"{folder} holds an encoder trained with {cfg.attention} attention; it cannot "
                             f"be loaded with {attention} attention (its weights were trained for the other "
                             "mask)")
        return cls.from_config(cfg, weights=folder, device=device).eval()

    def save(self, folder: str | Path) -> Path:
        """Self-describing folder: encoder.yaml (the resolved config) + adapter/ (LoRA, and a copy of
        the adaptation adapter in base_adapter/ when there is one) or backbone/ (full weights)."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        if self.config.lora.enabled:
            self.backbone.save_pretrained(folder / "adapter")
            if self.base_adapter is not None:
                if self.base_adapter.resolve() != (folder / BASE_ADAPTER).resolve():
                    shutil.copytree(self.base_adapter, folder / BASE_ADAPTER, dirs_exist_ok=True)
                cfg = cfg.model_copy(update={"base_adapter": BASE_ADAPTER})
        else:  # the adaptation is merged into these weights
            self.backbone.save_pretrained(folder / "backbone")
            self.tokenizer.save_pretrained(folder / "backbone")
            cfg = cfg.model_copy(update={"base_adapter": None})
        config_io.save(cfg, folder / CONFIG_FILE)  # last: its presence marks a complete folder
        return folder

    # ------------------------------------------------------------ properties

    @property
    def base_model(self) -> torch.nn.Module:
        """The headless transformers model (under the LoRA wrapper if any)."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    @property
    def dim(self) -> int:
        return int(self.base_model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per text (EOS and a query's instruction included)."""
        positions = getattr(self.base_model.config, "max_position_embeddings", None)
        return min(self.config.max_length, int(positions)) if positions else self.config.max_length

    @property
    def max_chars(self) -> int:
        return self.inputs.max_chars

    def token_counts(self, texts: list[str], instruction: str | list[str] | None = None) -> list[int]:
        return self.inputs.token_counts(texts, instruction)

    # ------------------------------------------------------------ text -> tensors (inputs.Inputs)

    def prefix(self, instruction: str | None) -> str:
        return self.inputs.prefix(instruction)

    def format(self, texts: list[str], instruction: str | list[str] | None) -> list[str]:
        return self.inputs.format(texts, instruction)

    def tokenize(self, texts: list[str],
                 instruction: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        return self.inputs.tokenize(texts, instruction)


    # ------------------------------------------------------------ tensors -> vectors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, dim) embeddings (unit length when config.normalize)."""
        cfg = self.config.pooling
        positions = attention.positions_from_mask(attention_mask)  # (batch, seq): padding-side independent
        ata = cfg.mode == "ata"
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            output_hidden_states=ata, return_dict=True)
        hidden = out.last_hidden_state  # (batch, seq, dim)
        r = None
        if ata:
            index = cfg.layer % self.num_layers
            x = out.hidden_states[index]  # (batch, seq, dim): input of the probe layer
            probe = attention.probe_for(self.base_model, index, self.causal)
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.grad_through_weights):
                # (batch, seq), never the whole (batch, heads, seq, seq) at once beyond ata_chunk_mb
                r = probe.received(x, attention_mask, positions, cfg.causal_norm, cfg.ata_chunk_mb)
        emb = pooling.pool(cfg, hidden, attention_mask, pool_mask, None, self.causal,
                           received=r)  # (batch, dim)
        emb = emb.float()
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    @torch.no_grad()
    def anchor_shares(self, texts: list[str], instruction: str | None = None,
                      batch_size: int = 32) -> dict[str, float]:
        """Where ATA's weights go when nothing is excluded: the mean share of position 0, of the rest of
        what the template puts before the text (the instruction and format markers) and of the text
        itself (its EOS included), over `texts` read with `instruction`. A diagnostic of the probe layer's
        attention (the pooled set leaves the prefix out under `exclude_instruction`); any pooling mode."""
        cfg = self.config.pooling
        index = cfg.layer % self.num_layers
        probe = attention.probe_for(self.base_model, index, self.causal)
        total = {"position_0": 0.0, "instruction": 0.0, "text": 0.0}
        for start in range(0, len(texts), batch_size):
            part = texts[start:start + batch_size]
            prefixes = [self.prefix(i) for i in _per_text(instruction, len(part))]
            batch = self.tokenizer([p + t for p, t in zip(prefixes, part, strict=True)], truncation=True,
                                   max_length=self.max_tokens, padding=True, return_tensors="pt",
                                   return_offsets_mapping=True)
            mask = batch["attention_mask"]  # (batch, seq)
            n = prefix_tokens(batch["offset_mapping"], mask, [len(p) for p in prefixes])  # (batch,)
            positions = attention.positions_from_mask(mask)
            dev = self.device
            out = self.backbone(input_ids=batch["input_ids"].to(dev), attention_mask=mask.to(dev),
                                position_ids=positions.to(dev), output_hidden_states=True, return_dict=True)
            r = probe.received(out.hidden_states[index], mask.to(dev), positions.to(dev), cfg.causal_norm,
                               cfg.ata_chunk_mb)  # (batch, seq)
            w = pooling.anchor_weights(r.float().cpu(), mask, cfg)  # (batch, seq): over every real token
            rank = mask.long().cumsum(-1)  # (batch, seq): 1-based rank among real tokens
            first = mask.bool() & (rank == 1)
            prefix = mask.bool() & (rank <= n[:, None]) & ~first
            text = mask.bool() & ~prefix & ~first
            for key, where in (("position_0", first), ("instruction", prefix), ("text", text)):
                total[key] += float((w * where).sum())
        return {k: v / max(1, len(texts)) for k, v in total.items()}

    @torch.no_grad()
    def encode(self, texts: list[str], *, instruction: str | list[str] | None = None,
               batch_size: int = 32, truncation: Truncation = "truncate") -> np.ndarray:
        """float32 (n, dim); `instruction` (one, or one per text) makes the texts queries, None documents.

        Texts longer than `max_tokens` are cut there ("truncate"), or raise `InputTooLong` ("error")."""
        texts = self.inputs.cut(texts, instruction, truncation)
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = self.device
        try:
            for start in range(0, len(texts), batch_size):
                idx = order[start:start + batch_size]
                inst = instruction if instruction is None or isinstance(instruction, str) else \
                    [instruction[i] for i in idx]
                batch = self.tokenize([texts[i] for i in idx], inst)
                emb = self(**{k: v.to(device) for k, v in batch.items()})  # (batch, dim)
                out[idx] = emb.float().cpu().numpy()
        finally:
            self.train(was_training)
        return out
