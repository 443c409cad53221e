"""The loss of one worker's batch of MGH records: tokenise queries (with their instruction), positives
and the chosen hard negatives, embed them in one forward, and hand the vectors to InfoNCE.

Symmetric examples (STS-style pairs: both sides are the same kind of text) carry the instruction on
every side; other documents carry none. One forward for queries and documents together, because DDP
expects one forward per backward. `training.train_loop` calls `contrastive_loss` each step; the
training benchmark times it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mgh_ray.encoder import Encoder
from mgh_ray.losses import text_keys


def contrastive_loss(model: torch.nn.Module, encoder: Encoder, loss_fn: torch.nn.Module, batch: pd.DataFrame,
                     levels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """InfoNCE of one worker's batch: each query (with its instruction) against the positives and the
    hard negatives of every worker. `model` is `encoder` or its DDP wrapper.

    levels: (b, K) levels of each example's K hard negatives (`Curriculum.levels`; K > 1 in cumulative
    mode), or (b,) for one each. Symmetric examples (a `symmetric` bool column, else a `kind` column
    naming a symmetric task such as "sts"; absent: none) get their instruction on the positive and the
    negatives too, as on the query (both sides of a symmetric pair are the same kind of text);
    other documents get none."""
    b = len(batch)
    levels = np.asarray(levels).reshape(b, -1)  # (b, K)
    k = levels.shape[1]
    use_negs = getattr(getattr(loss_fn, "cfg", None), "hard_negatives", True)
    negs = [batch[f"neg_{lv}"].iloc[i] for i in range(b) for lv in levels[i]] if use_negs else []  # b*K
    sym = symmetric_rows(batch)  # (b,) bool
    docs = list(batch["positive"]) + negs  # positives, then each example's K negatives in order
    doc_row = np.concatenate([np.arange(b), np.repeat(np.arange(b), k)]) if use_negs else np.arange(b)
    instructed = sym[doc_row]  # (n_docs,): documents of symmetric examples carry the instruction
    plain_idx, inst_idx = np.flatnonzero(~instructed), np.flatnonzero(instructed)
    parts = [encoder.tokenize(list(batch["query"]), list(batch["instruction"]))]
    if len(plain_idx):
        parts.append(encoder.tokenize([docs[i] for i in plain_idx]))
    if len(inst_idx):
        parts.append(encoder.tokenize([docs[i] for i in inst_idx],
                                      [str(batch["instruction"].iloc[doc_row[i]]) for i in inst_idx]))
    left, pad_id = encoder.tokenizer.padding_side == "left", encoder.tokenizer.pad_token_id
    inputs = parts[0]
    for part in parts[1:]:
        inputs = concat_inputs(inputs, part, left, pad_id)
    # one forward for queries and documents together: DDP expects one forward per backward
    emb = model(**{key: v.to(device) for key, v in inputs.items()})  # (b + n_docs, dim)
    qe = emb[:b]  # (b, dim)
    back = torch.from_numpy(np.argsort(np.concatenate([plain_idx, inst_idx]), kind="stable")).to(emb.device)
    de = emb[b:][back]  # (n_docs, dim): back in `docs` order
    pe = de[:b]  # (b, dim)
    p_keys = text_keys(list(batch["positive"])).to(device)
    if not use_negs:
        return loss_fn(qe, pe, None, p_keys, None)
    ne = de[b:].view(b, k, -1)  # (b, K, dim)
    n_keys = text_keys(negs).view(b, k)  # (b, K)
    return loss_fn(qe, pe, ne, p_keys, n_keys.to(device))


def symmetric_rows(batch: pd.DataFrame) -> np.ndarray:
    """(b,) bool: which examples are symmetric tasks (instruction on every side). From a `symmetric`
    column if there is one, else from `kind` (a task family the prompt set marks symmetric)."""
    if "symmetric" in batch.columns:
        return batch["symmetric"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    if "kind" in batch.columns:
        from mgh_ray import prompts

        return batch["kind"].astype(str).isin(prompts.symmetric_kinds()).to_numpy()
    return np.zeros(len(batch), dtype=bool)


def concat_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], left: bool,
                  pad_id: int) -> dict[str, torch.Tensor]:
    """Stack two tokenised batches (queries, documents), padding the shorter on the tokenizer's side."""
    seq = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    out: dict[str, torch.Tensor] = {}
    keys = ["input_ids", "attention_mask"] + (["pool_mask"] if "pool_mask" in a or "pool_mask" in b else [])
    for key in keys:
        parts = []
        for part in (a, b):
            t = part.get(key, part["attention_mask"])  # no pool_mask: every real token pools
            t = t.long() if key == "input_ids" else t.bool()
            pad = seq - t.shape[1]
            value = pad_id if key == "input_ids" else 0
            parts.append(torch.nn.functional.pad(t.long(), (pad, 0) if left else (0, pad), value=value))
        out[key] = torch.cat(parts)
    return out
