"""The encoder's backbone and its adapters: the headless transformer loaded under the attention the
encoder runs (causal or bidirectional; a folder that records its attention loads only under it), the
adaptation (MNTP) adapter merged into it, and the LoRA adapter that training learns (peft), fresh or
restored from a saved folder. `Encoder.from_config` composes these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from mgh_ray import attention
from mgh_ray.attention import Attention
from mgh_ray.config import Section

ADAPTED_FILE = "adapted.yaml"  # beside an adaptation adapter: the attention it was adapted under


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


def load(source: str | Path, wanted: Attention | None, attn_implementation: str,
         dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Attention]:
    """The headless backbone under the `wanted` attention (None: its own), and that attention, resolved.

    A folder that records its attention (`is_causal` in config.json: an export of this project) loads
    only under that attention: its weights were trained for it."""
    from transformers import AutoConfig, AutoModel

    hf_config = AutoConfig.from_pretrained(str(source))
    recorded = attention.recorded_attention(hf_config)
    if recorded is not None and wanted is not None and wanted != recorded:
        raise ValueError(f"{source} was trained with {recorded} attention, but encoder.attention is "
                         f"{wanted}: set encoder.attention={recorded} (or null) to load it")
    model = AutoModel.from_pretrained(str(source), config=hf_config, dtype=dtype,
                                      attn_implementation=attn_implementation)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler is never used: its LoRA/params would be unused under DDP
    native = attention.native_attention(model)
    if not attention.is_decoder(model):
        if wanted == "causal":
            raise ValueError(f"{source} is a bidirectional encoder ({type(model).__name__}); "
                             "encoder.attention=causal applies to decoder LLMs only")
        return model, "bidirectional"
    chosen: Attention = wanted or native
    attention.set_attention(model.config, chosen)
    attention.mark_modules(model, chosen)
    return model, chosen


def base_adapter_dir(base_adapter: str | None, weights: str | Path | None) -> Path | None:
    """Local folder of an encoder config's adaptation adapter (`base_adapter`): relative to a saved
    folder's `weights`, else a path or URI (copied once into this node's cache)."""
    if base_adapter is None:
        return None
    from mgh_ray import storage

    relative = not storage.is_uri(base_adapter) and not Path(base_adapter).is_absolute()
    if weights is not None and relative:
        return Path(weights) / base_adapter
    return storage.local_dir(base_adapter)


def merge_base_adapter(model: torch.nn.Module, folder: Path, chosen: Attention) -> torch.nn.Module:
    """Merge an adaptation adapter (MNTP) into the backbone's weights; refuse one adapted under the
    other attention (the adapt stage records it beside the adapter)."""
    import peft
    import yaml

    meta = folder / ADAPTED_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{folder} holds no {ADAPTED_FILE}; is it an adapter the adapt stage wrote?")
    adapted = yaml.safe_load(meta.read_text())["attention"]
    if adapted != chosen:
        raise ValueError(f"the adapter in {folder} was adapted with {adapted} attention, but this encoder "
                         f"runs {chosen} attention: set encoder.attention={adapted}")
    return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """The backbone wrapped in a fresh peft LoRA adapter (`lora.top_layers`: only the top blocks)."""
    import peft

    targets, extra = lora.target_modules, {}
    if lora.top_layers is not None:
        blocks = attention.backbone_layers(model)
        n = len(blocks)
        if targets == "all-linear":  # peft wants names when layers are restricted
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in blocks[0].named_modules()
                              if isinstance(m, torch.nn.Linear)})
        extra = {"layers_to_transform": list(range(max(0, n - lora.top_layers), n)),
                 "layers_pattern": "layers" if hasattr(model, "layers") else "layer"}
    lcfg = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=targets, bias="none", **extra)
    return peft.get_peft_model(model, lcfg)


def load_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Load adapter weights into a fresh peft model; refuse a silent partial load (peft warns and goes on with
    missing keys, which would serve an untrained adapter)."""
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
