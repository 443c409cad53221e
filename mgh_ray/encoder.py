"""Encoder: backbone + LoRA (peft) + pooling + L2 norm; the one object that trains, encodes and serves.

Queries get an E5-style instruction (`query_template`), documents none. A folder written by `save`
holds the resolved `EncoderConfig` (encoder.yaml) and the adapter (or full weights when LoRA is
off); the backbone is named in the config (a pinned asset name such as "smollm2", a local folder or a
hub id), so `Encoder.load(folder)` needs nothing else. `export` writes `merged/` (LoRA merged into the
backbone; also a sentence-transformers folder, pooled by `pooling.AnchorPooling` for ATA, which
sentence-transformers >= 6 loads only with `trust_remote_code=True`) and `adapter/` (peft only).

    enc = Encoder.from_config(EncoderConfig())
    docs = enc.encode(["Kenya wins the marathon"])                            # (1, 576) float32
    qs = enc.encode(["who won?"], instruction="Retrieve the news article")    # formatted as a query
    enc.save("runs/x/model"); Encoder.load("runs/x/model")
    enc.export("runs/x/export"); SentenceTransformer("runs/x/export/merged", trust_remote_code=True)
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from mgh_ray import config as config_io
from mgh_ray import pooling
from mgh_ray.config import Section
from mgh_ray.pooling import PoolingConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG_FILE = "encoder.yaml"


class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(16, ge=1, strict=True)
    alpha: int = Field(32, ge=1, strict=True)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" works for any backbone (peft skips the output head); or a list of module names
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # adapt only the top N blocks (None: all). Backward then stops at the lowest adapted block, which
    # makes CPU training several times cheaper; the ATA probe layer should be among them.
    top_layers: int | None = Field(None, ge=1, strict=True)


class EncoderConfig(Section):
    backbone: str = "smollm2"  # asset name (assets.model_path), local folder or hub id
    pooling: PoolingConfig = Field(default_factory=PoolingConfig)
    max_length: int = Field(128, ge=4, strict=True)  # tokens per text, EOS included
    lora: LoraConfig = Field(default_factory=LoraConfig)
    normalize: bool = True
    query_template: str = "Instruct: {instruction}\nQuery: {text}"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    padding_side: Literal["right", "left"] = "right"
    append_eos: bool = True  # decoders: end every text with EOS (last-token pooling's summary token, T9)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False  # non-reentrant (DDP + LoRA safe, ANCHORS R11)

    @field_validator("query_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{instruction}" not in v or not v.endswith("{text}"):
            raise ValueError("query_template must contain {instruction} and end with {text}, "
                             "e.g. 'Instruct: {instruction}\\nQuery: {text}'")
        return v


def _load_backbone(cfg: EncoderConfig, source: str | Path) -> torch.nn.Module:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source), dtype=DTYPES[cfg.dtype],
                                      attn_implementation=cfg.attn_implementation)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler is never used: its LoRA/params would be unused under DDP
    return model


def _load_tokenizer(source: str | Path, causal: bool, cfg: EncoderConfig):
    from transformers import AutoTokenizer

    kwargs = {"add_eos_token": True} if causal and cfg.append_eos else {}
    tok = AutoTokenizer.from_pretrained(str(source), **kwargs)
    if causal and cfg.append_eos and tok("a")["input_ids"][-1] != tok.eos_token_id:
        raise ValueError(f"tokenizer of {source} does not append EOS; set encoder.append_eos=false")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = cfg.padding_side
    return tok


class Encoder(torch.nn.Module):
    """Texts -> unit vectors. `forward` is the differentiable path training wraps in DDP."""

    def __init__(self, cfg: EncoderConfig, backbone: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = backbone  # PeftModel when LoRA is on, else the headless transformers model
        self.tokenizer = tokenizer
        self.causal = pooling.is_causal(self.base_model)
        self.num_layers = len(pooling.backbone_layers(self.base_model))
        self._prefix_cache: dict[str, int] = {}

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: EncoderConfig, weights: str | Path | None = None) -> Encoder:
        """Fresh encoder (new LoRA adapter) or, with `weights`, one restored from a `save` folder."""
        from mgh_ray import assets

        full = Path(weights) / "backbone" if weights is not None else None
        source = full if full is not None and full.is_dir() else assets.model_path(cfg.backbone)
        model = _load_backbone(cfg, source)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        causal = pooling.is_causal(model)
        if cfg.lora.enabled:
            import peft

            targets, extra = cfg.lora.target_modules, {}
            if cfg.lora.top_layers is not None:
                blocks = pooling.backbone_layers(model)
                n = len(blocks)
                if targets == "all-linear":  # peft wants names when layers are restricted
                    targets = sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules()
                                      if isinstance(m, torch.nn.Linear)})
                extra = {"layers_to_transform": list(range(max(0, n - cfg.lora.top_layers), n)),
                         "layers_pattern": "layers" if hasattr(model, "layers") else "layer"}
            lcfg = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                   target_modules=targets, bias="none", **extra)
            model = peft.get_peft_model(model, lcfg)
            if weights is not None:
                _load_adapter(model, Path(weights) / "adapter")
        enc = cls(cfg, model, _load_tokenizer(source, causal, cfg))
        log.info("encoder %s: %s pooling, %d layers, dim %d, %s", cfg.backbone, cfg.pooling.mode,
                 enc.num_layers, enc.dim, "LoRA r=%d" % cfg.lora.r if cfg.lora.enabled else "full weights")
        return enc

    def load_adapter(self, folder: str | Path) -> None:
        """Put the LoRA weights of a `save` folder into this encoder (same LoRA config), in place."""
        _load_adapter(self.backbone, Path(folder) / "adapter")

    @classmethod
    def load(cls, folder: str | Path) -> Encoder:
        """The encoder a `save(folder)` wrote (config, adapter/weights); eval mode."""
        folder = Path(folder)
        cfg = config_io.load(EncoderConfig, folder / CONFIG_FILE)
        return cls.from_config(cfg, weights=folder).eval()

    def save(self, folder: str | Path) -> Path:
        """Self-describing folder: encoder.yaml + adapter/ (LoRA) or backbone/ (full weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.config.lora.enabled:
            self.backbone.save_pretrained(folder / "adapter")
        else:
            self.backbone.save_pretrained(folder / "backbone")
            self.tokenizer.save_pretrained(folder / "backbone")
        config_io.save(self.config, folder / CONFIG_FILE)  # last: its presence marks a complete folder
        return folder

    def export(self, folder: str | Path) -> Path:
        """`merged/` (HF + sentence-transformers folder, LoRA merged) and `adapter/` (peft only)."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer

        folder = Path(folder)
        merged_dir = folder / "merged"
        if self.config.lora.enabled:
            self.backbone.save_pretrained(folder / "adapter")
            merged = copy.deepcopy(self.backbone).merge_and_unload()
        else:
            merged = copy.deepcopy(self.base_model)
        ata = self.config.pooling.mode == "ata"
        merged.config.output_hidden_states = ata  # AnchorPooling reads the probe layer's input
        merged.save_pretrained(merged_dir)
        tok = copy.deepcopy(self.tokenizer)
        tok.padding_side = "right"  # sentence-transformers passes no position ids: keep real tokens first
        tok.save_pretrained(merged_dir)
        # text modality only: the backbone's chat template must not wrap texts into chat messages
        text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
        modules = [Transformer(str(merged_dir), max_seq_length=self.config.max_length,
                               config_kwargs={"output_hidden_states": ata}, modality_config=text_only,
                               module_output_name="token_embeddings"),
                   _st_pooling(self.config.pooling, merged)]
        if self.config.normalize:
            modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(merged_dir))
        config_io.save(self.config, merged_dir / "mgh_ray_encoder.yaml")
        log.info("exported %s (merged + sentence-transformers) and adapter", merged_dir)
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

    # ------------------------------------------------------------ text -> tensors

    def format(self, texts: list[str], instruction: str | list[str] | None) -> list[str]:
        if instruction is None:
            return list(texts)
        inst = [instruction] * len(texts) if isinstance(instruction, str) else instruction
        template = self.config.query_template
        return [template.format(instruction=i, text=t) for i, t in zip(inst, texts, strict=True)]

    def instruction_length(self, instruction: str) -> int:
        """Tokens of the instruction prefix, counted as sentence-transformers counts a prompt
        (prefix tokenised alone, trailing special token dropped), so export and encode agree."""
        prefix = self.config.query_template.format(instruction=instruction, text="")
        if prefix not in self._prefix_cache:
            ids = self.tokenizer(prefix)["input_ids"]
            trailing_special = bool(ids) and ids[-1] in self.tokenizer.all_special_ids
            self._prefix_cache[prefix] = len(ids) - int(trailing_special)
        return self._prefix_cache[prefix]

    def tokenize(self, texts: list[str],
                 instruction: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (batch, seq) and pool_mask (tokens pooled; no instruction if excluded).

        `instruction`: one for all texts, one per text, or None (documents)."""
        batch = self.tokenizer(self.format(texts, instruction), truncation=True,
                               max_length=self.config.max_length, padding=True, return_tensors="pt")
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if instruction is not None and self.config.pooling.exclude_instruction:
            inst = [instruction] * len(texts) if isinstance(instruction, str) else instruction
            n = torch.tensor([self.instruction_length(i) for i in inst])
            keep = pooling.prefix_mask(out["attention_mask"], n)
            # a text cut away by truncation would pool nothing: fall back to the whole sequence
            empty = ~keep.any(-1, keepdim=True)
            out["pool_mask"] = torch.where(empty, out["attention_mask"].bool(), keep)
        return out

    # ------------------------------------------------------------ tensors -> vectors

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, dim) embeddings (unit length when config.normalize)."""
        cfg = self.config.pooling
        positions = pooling.positions_from_mask(attention_mask)  # (batch, seq): padding-side independent
        ata = cfg.mode == "ata"
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            output_hidden_states=ata, return_dict=True)
        hidden = out.last_hidden_state  # (batch, seq, dim)
        probs = None
        if ata:
            index = cfg.layer % self.num_layers
            x = out.hidden_states[index]  # (batch, seq, dim): input of the probe layer
            probe = pooling.probe_for(self.base_model, index)
            with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.grad_through_weights):
                probs = probe(x, attention_mask, positions)  # (batch, heads, seq, seq)
        emb = pooling.pool(cfg, hidden, attention_mask, pool_mask, probs, self.causal)  # (batch, dim)
        emb = emb.float()
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str], *, instruction: str | list[str] | None = None,
               batch_size: int = 32) -> np.ndarray:
        """float32 (n, dim); `instruction` (one, or one per text) makes the texts queries, None documents."""
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


def _st_pooling(cfg: pooling.PoolingConfig, merged: torch.nn.Module) -> torch.nn.Module:
    """sentence-transformers' own Pooling where it computes the same thing (the folder then loads with a
    plain `SentenceTransformer(path)`); `AnchorPooling` for ATA (load with `trust_remote_code=True`,
    sentence-transformers >= 6 asks that for any module class outside its namespace)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    builtin = {"mean": "mean", "last": "lasttoken", "cls": "cls", "weighted_mean": "weightedmean"}
    if cfg.mode in builtin:
        return Pooling(merged.config.hidden_size, pooling_mode=builtin[cfg.mode],
                       include_prompt=not cfg.exclude_instruction)
    return pooling.AnchorPooling.from_backbone(cfg, merged)


def _load_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Load adapter weights into a fresh peft model; refuse a silent partial load (ANCHORS T6)."""
    import peft
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_model.safetensors; "
                                "was it written by Encoder.save?")
    state = load_file(str(path))
    result = peft.set_peft_model_state_dict(model, state)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if result.unexpected_keys or len(state) != len(expected):
        raise ValueError(f"adapter in {folder} does not fit this LoRA config: {len(state)} tensors for "
                         f"{len(expected)} LoRA parameters, unexpected {list(result.unexpected_keys)[:3]}")
