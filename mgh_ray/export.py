"""Export: an encoder as folders other tools load, with the vectors `Encoder.encode` gives.

`write(encoder, folder)` makes `merged/` (the LoRA, and any adaptation adapter, merged into the backbone;
a Hugging Face folder that is also a sentence-transformers folder, pooled by its own Pooling where that
computes the same thing, else by `pooling.AnchorPooling`, which sentence-transformers >= 6 loads only
with `trust_remote_code=True`) and `adapter/` (peft only). The folder carries the query prompts the model
was trained with (`query_prompts`), the document prompt of its input format, `max_seq_length`, and for a
bidirectional encoder `is_causal: false` in config.json.

    export.write(enc, "runs/x/export", prompts={"query": "Retrieve the news article"})
    SentenceTransformer("runs/x/export/merged", trust_remote_code=True).encode_query(["who won?"])
"""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mgh_ray import attention, pooling, vllm_model
from mgh_ray import config as config_io

if TYPE_CHECKING:
    from mgh_ray.encoder import Encoder

log = logging.getLogger(__name__)


def write(encoder: Encoder, folder: str | Path, prompts: Mapping[str, str] | None = None,
      default_prompt_name: str | None = None) -> Path:
    """`merged/` (HF + sentence-transformers folder, LoRA merged) and `adapter/` (peft only).

    `prompts`: prompt name -> the instruction the model was trained with (`query_prompts` builds
    it from the records' instructions). Each is written as the sentence-transformers prompt
    `query_template` makes of it, so `SentenceTransformer(merged).encode(q, prompt_name="query")`
    (or `.encode_query(q)`) gives `encode(q, instruction=...)`; "document" is the document
    template's prefix (empty for the plain format). When that prefix is not empty it is the
    default prompt, so a plain `encode(docs)` reads documents as the model was trained to; else
    `default_prompt_name` stays None unless every text should get one prompt (a symmetric-only
    model). `max_seq_length` (= config.max_length) is stated in sentence_bert_config.json too,
    and a bidirectional encoder's config.json says `is_causal: false`, which transformers (and
    vLLM) read, so the folder loads with the attention it was trained with.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer

    folder = Path(folder)
    merged_dir = folder / "merged"
    st_prompts = {"document": encoder.prefix(None)}
    for name, instruction in (prompts or {}).items():
        if not name or name == "document" or not str(instruction).strip():
            raise ValueError(f"export prompt {name!r}: {instruction!r} needs a name other than "
                             "'document' and a non-empty instruction")
        st_prompts[name] = encoder.prefix(instruction)
    if default_prompt_name is not None and default_prompt_name not in st_prompts:
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is none of the prompts "
                         f"{sorted(st_prompts)}")
    if default_prompt_name is None and st_prompts["document"]:
        default_prompt_name = "document"
    if "query" not in st_prompts:
        log.warning("export of %s without a query prompt: a sentence-transformers user will encode "
                    "queries without the instruction the model was trained with", merged_dir)
        st_prompts["query"] = st_prompts["document"]
    if encoder.config.lora.enabled:
        encoder.backbone.save_pretrained(folder / "adapter")
        merged = copy.deepcopy(encoder.backbone).merge_and_unload()
    else:
        merged = copy.deepcopy(encoder.base_model)
    ata = encoder.config.pooling.mode == "ata"
    merged.config.output_hidden_states = ata  # AnchorPooling reads the probe layer's input
    if attention.is_decoder(merged):
        attention.set_attention(merged.config, encoder.config.attention)
    merged.save_pretrained(merged_dir)
    tok = copy.deepcopy(encoder.tokenizer)
    tok.padding_side = "right"  # sentence-transformers passes no position ids: keep real tokens first
    tok.save_pretrained(merged_dir)
    # text modality only: the backbone's chat template must not wrap texts into chat messages
    text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
    modules = [Transformer(str(merged_dir), max_seq_length=encoder.config.max_length,
                           config_kwargs={"output_hidden_states": ata}, modality_config=text_only,
                           module_output_name="token_embeddings"),
               _st_pooling(encoder.config.pooling, merged, encoder.eos_appended)]
    if encoder.config.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu", prompts=st_prompts,
                        default_prompt_name=default_prompt_name).save(str(merged_dir))
    # sentence-transformers 6 keeps the limit in the tokenizer config only (model_max_length); state
    # it where every version (and a reader) looks for it. Transformer() accepts it when loading.
    st_cfg = merged_dir / "sentence_bert_config.json"
    st_json = {**json.loads(st_cfg.read_text()), "max_seq_length": encoder.config.max_length}
    st_cfg.write_text(json.dumps(st_json, indent=2))
    config_io.save(encoder.config, merged_dir / vllm_model.CONFIG_FILE)
    if attention.is_decoder(merged):
        # vLLM serves the folder with this project's pooling model (vllm_model.py); transformers and
        # sentence-transformers pick their class by model_type and ignore the name. Written last:
        # save_pretrained writes the class's own name there
        hf_cfg = merged_dir / "config.json"
        hf_cfg.write_text(json.dumps({**json.loads(hf_cfg.read_text()), "architectures": [vllm_model.ARCH]},
                                     indent=2))
    log.info("exported %s (merged + sentence-transformers, prompts %s) and adapter", merged_dir,
             sorted(st_prompts))
    return folder


def _st_pooling(cfg: pooling.PoolingConfig, merged: torch.nn.Module, eos_appended: bool) -> torch.nn.Module:
    """sentence-transformers' own Pooling where it computes the same thing (the folder then loads with a
    plain `SentenceTransformer(path)`); `AnchorPooling` for ATA and for last-token pooling of the text's
    own last token before an appended EOS (load with `trust_remote_code=True`; sentence-transformers >= 6
    asks that for any module class outside its namespace)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    builtin = {"mean": "mean", "last": "lasttoken", "cls": "cls", "weighted_mean": "weightedmean"}
    if cfg.mode == "last" and cfg.last_token == "text" and eos_appended:
        builtin.pop("last")
    if cfg.mode in builtin:
        return Pooling(merged.config.hidden_size, pooling_mode=builtin[cfg.mode],
                       include_prompt=not cfg.exclude_instruction)
    return pooling.AnchorPooling.from_backbone(cfg, merged, eos_appended)


def query_prompts(instructions: Iterable[str] | Mapping[str, int], max_prompts: int = 8) -> dict[str, str]:
    """Export prompts from the instructions a model trained with (texts, or {text: count}): the most
    frequent is "query", the next ones "query_2" .. (at most `max_prompts`; generate mode writes one
    instruction per task)."""
    if isinstance(instructions, Mapping):
        counts = Counter({str(i): int(n) for i, n in instructions.items() if str(i).strip()})
    else:
        counts = Counter(str(i) for i in instructions if str(i).strip())
    ranked = sorted(counts, key=lambda i: (-counts[i], i))[:max_prompts]
    return {("query" if n == 0 else f"query_{n + 1}"): inst for n, inst in enumerate(ranked)}
