"""Inputs: how an encoder reads text. Its input format, tokenizer, length limits and pooled set.

Every text is read in the backbone's input format (`FORMATS`): queries as `query_template` with their
instruction, documents as `document_template`; for SmolLM2 a ChatML user turn that the EOS the tokenizer
appends closes. What the template puts before the text (instruction, format markers) stays out of the
pooled set under `exclude_instruction`, counted on the tokenised input itself (`prefix_tokens`), and
last-token pooling of the text's own last token leaves the appended EOS out too. Texts longer than the
model reads are cut at `max_tokens` (or refused, `InputTooLong`).

One `Inputs` serves `Encoder` (torch) and the vLLM engine (which gets token ids and prefix lengths from
it), so both read the same tokens.

    inputs = Inputs(cfg, load_tokenizer(folder, True, cfg), max_tokens=96)
    batch = inputs.tokenize(["who won?"], "Retrieve the news article")   # input_ids, attention_mask, pool_mask
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from mgh_ray import pooling
from mgh_ray.config import Section  # an encoder.EncoderConfig; its base type, so inputs never imports encoder

# Input formats: (query template, document template). Every text the model reads is one of them; the
# prefix before {text} is what `exclude_instruction` keeps out of the pool. "chatml" is the instruct
# format of SmolLM2 (and Qwen2 and others): the text is a user turn that the tokenizer's appended EOS
# (<|im_end|>) closes. Templates end the prefix with a newline, which BPE never merges into the text.
FORMATS: dict[str, tuple[str, str]] = {
    "plain": ("Instruct: {instruction}\nQuery: {text}", "{text}"),
    "chatml": ("<|im_start|>user\n{instruction}\n{text}", "<|im_start|>user\n{text}"),
}


def resolve_templates(cfg: Section, tokenizer: Any) -> tuple[str, str, str]:
    """(format name, query template, document template) this encoder reads texts with."""
    fmt = cfg.prompt_format
    if fmt == "auto":
        fmt = "chatml" if "<|im_start|>" in str(getattr(tokenizer, "chat_template", None) or "") else "plain"
    query, document = FORMATS[fmt]
    if cfg.query_template is not None:  # a folder saved before document templates existed: plain documents
        query, document = cfg.query_template, cfg.document_template or "{text}"
    return fmt, query, cfg.document_template or document


# A fast (Rust) tokenizer keeps its padding and truncation settings as state that every call sets
# and then encodes under: two threads calling one tokenizer at once (a Serve replica prepares
# requests and encodes batches in threads) can pad one call's batch with the other's settings and
# fail with ragged tensors (measured: 30 of 2,000 concurrent calls). Every call takes this lock.
_TOKENIZER_LOCK = threading.Lock()


class InputTooLong(ValueError):
    """A text longer than the model reads, under truncation="error" (Serve answers it with 413)."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        self.index, self.tokens, self.limit = index, tokens, limit
        super().__init__(f"input {index} has {tokens} tokens, more than the model's limit of {limit} "
                         "(truncation policy 'error': shorten it, or use truncation='truncate')")


def load_tokenizer(source: str | Path, decoder: bool, cfg: Section) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"add_eos_token": True} if decoder and cfg.append_eos else {}
    tok = AutoTokenizer.from_pretrained(str(source), **kwargs)
    if decoder and cfg.append_eos and tok("a")["input_ids"][-1] != tok.eos_token_id:
        raise ValueError(f"tokenizer of {source} does not append EOS; set encoder.append_eos=false")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = cfg.padding_side
    return tok


class Inputs:
    """The text side of an encoder: `cfg` (an `EncoderConfig` with its templates resolved), its tokenizer,
    and the tokens it reads per text (`max_tokens`, EOS and a query's instruction included)."""

    def __init__(self, cfg: Section, tokenizer: Any, max_tokens: int, eos_appended: bool) -> None:
        self.cfg, self.tokenizer, self.max_tokens = cfg, tokenizer, max_tokens
        self.eos_appended = eos_appended  # every text ends with the tokenizer's EOS (decoders)

    @property
    def max_chars(self) -> int:
        """Characters per text beyond which nothing is read: `max_tokens` x the longest text one token
        stands for (longest vocabulary entry, or a whole unknown word for WordPiece). A token never
        covers more characters than that, so the first `max_tokens` tokens lie within this prefix."""
        if not hasattr(self, "_token_chars"):
            tok = self.tokenizer
            vocab = list(tok.get_vocab())
            longest = max((len(tok.convert_tokens_to_string([t])) for t in vocab), default=1)
            # WordPiece reads a word longer than this as one [UNK] token
            word = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
            longest = max(longest, int(getattr(word, "max_input_chars_per_word", 0) or 0))
            self._token_chars = max(1, longest)
        return self.max_tokens * self._token_chars

    def token_counts(self, texts: list[str], instruction: str | list[str] | None = None) -> list[int]:
        """Tokens of each (formatted) text before truncation, special tokens included."""
        with _TOKENIZER_LOCK:
            ids = self.tokenizer(self.format(texts, instruction), truncation=False)["input_ids"]
        return [len(i) for i in ids]

    def prefix(self, instruction: str | None) -> str:
        """What the input template puts before a text: a query's instruction and the format's markers
        (documents: the document template's prefix, often empty)."""
        if instruction is None:
            return self.cfg.document_template.format(text="")
        return self.cfg.query_template.format(instruction=instruction, text="")

    def format(self, texts: list[str], instruction: str | list[str] | None) -> list[str]:
        """The texts as the model reads them (every template ends with {text})."""
        return [self.prefix(i) + t for i, t in zip(_per_text(instruction, len(texts)), texts, strict=True)]

    def tokenize(self, texts: list[str],
                 instruction: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (batch, seq) and, under `exclude_instruction`, pool_mask: the tokens
        pooled, without what the template put before each text.

        `instruction`: one for all texts, one per text, or None (documents)."""
        prefixes = [self.prefix(i) for i in _per_text(instruction, len(texts))]
        pcfg = self.cfg.pooling
        exclude = pcfg.exclude_instruction and any(prefixes)
        with _TOKENIZER_LOCK:
            batch = self.tokenizer([p + t for p, t in zip(prefixes, texts, strict=True)], truncation=True,
                                   max_length=self.max_tokens, padding=True, return_tensors="pt",
                                   return_offsets_mapping=exclude)
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if exclude:
            n = prefix_tokens(batch["offset_mapping"], out["attention_mask"], [len(p) for p in prefixes])
            keep = pooling.prefix_mask(out["attention_mask"], n)
            # a text cut away by truncation would pool nothing: fall back to the whole sequence
            empty = ~keep.any(-1, keepdim=True)
            out["pool_mask"] = torch.where(empty, out["attention_mask"].bool(), keep)
        if pcfg.mode == "last" and pcfg.last_token == "text" and self.eos_appended:
            out["pool_mask"] = pooling.without_final(out.get("pool_mask", out["attention_mask"]))
        return out

    def cut(self, texts: list[str], instruction: str | list[str] | None, truncation: str) -> list[str]:
        """The texts under the truncation policy: "truncate" cuts each at `max_chars` (a cheap first cut,
        so a huge text is never tokenised whole; tokenising cuts at `max_tokens`), "error" raises
        `InputTooLong` for the first text longer than `max_tokens`."""
        if truncation == "error":
            for i, n in enumerate(self.token_counts(texts, instruction)):
                if n > self.max_tokens:
                    raise InputTooLong(i, n, self.max_tokens)
            return list(texts)
        if truncation == "truncate":
            return [t[: self.max_chars] for t in texts]
        raise ValueError(f"unknown truncation policy {truncation!r}; use 'truncate' or 'error'")

    def token_ids(self, texts: list[str], instruction: str | list[str] | None = None) -> list[tuple[list[int], int]]:
        """Per text, as another engine reads it (vLLM: `vllm_model`): its token ids (cut at `max_tokens`,
        no padding) and how many leading tokens stay out of the pool (0 when nothing is excluded). The
        same tokens and the same pooled set as `tokenize`."""
        batch = self.tokenize(texts, instruction)
        mask = batch["attention_mask"].bool()  # (batch, seq)
        pool_mask = batch.get("pool_mask")
        out = []
        for i in range(len(texts)):
            ids = batch["input_ids"][i][mask[i]].tolist()
            n = 0
            if pool_mask is not None and self.cfg.pooling.exclude_instruction:
                kept = pool_mask[i][mask[i]]  # (real tokens,) the pooled ones
                n = int(kept.long().argmax()) if kept.any() else 0  # the pool starts after the prefix
            out.append((ids, n))
        return out


def _per_text(instruction: str | list[str] | None, n: int) -> list[str | None]:
    return [instruction] * n if instruction is None or isinstance(instruction, str) else list(instruction)


def prefix_tokens(offsets: torch.Tensor, attention_mask: torch.Tensor,
                  prefix_chars: list[int]) -> torch.Tensor:
    """(batch,) real tokens before each text: those before the first token that covers a character of
    the text (a BOS the tokenizer adds counts with the prefix). Counted on the tokenised input itself,
    so a token that BPE merged across the boundary belongs to the text: "Query: " + "who" gives
    "Query", ":", " who", and " who" is pooled, where the prefix tokenised alone ends in its own " ".
    An empty prefix excludes nothing.

    offsets: (batch, seq, 2) character spans (the tokenizer's offset_mapping; (0, 0) for added tokens
    and padding); attention_mask: (batch, seq)."""
    end = offsets[..., 1]  # (batch, seq)
    plen = torch.tensor(prefix_chars, dtype=end.dtype)[:, None]  # (batch, 1)
    text = attention_mask.bool() & (end > plen)  # (batch, seq): tokens holding text characters
    before = attention_mask.bool() & (text.long().cumsum(-1) == 0)  # (batch, seq)
    n = before.sum(-1)  # (batch,)
    return torch.where(text.any(-1) & (plen[:, 0] > 0), n, torch.zeros_like(n))
