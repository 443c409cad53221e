"""Quality gates for graded negatives: a reference embedder checks level order and false negatives.

For every record (query q, positive p, negatives n1..n4 as written for levels L1..L4) the reference
embedder (all-MiniLM-L6-v2 by default) gives cosine similarities. Two questions are asked:

- level order: does sim(q,n1) < sim(q,n2) < sim(q,n3) < sim(q,n4) < sim(q,p) hold? Agreement is
  reported for every pair of levels (and the positive), so one sees which levels the LLM confuses.
- probable false negative (NV-Retriever's positive-aware test): a negative that copies the positive
  (same text, or sim(n,p) >= `copy_sim`) or that scores at or above the positive
  (sim(q,n) >= sim(q,p) - (1 - fn_ratio) * |sim(q,p)|). Small generators often "answer the query
  anyway"; this is how that shows up, and the report gives its rate.

The policy decides what training sees. The LLM's graded levels are the curriculum (the method), so
every policy but `relabel` keeps the level each negative was written for:

    filter   (default) drop records with a probable false negative; the rest keep the LLM's levels
    drop     drop records with a false negative or any level out of the reference embedder's order
    keep     everything (flags only)
    relabel  as filter, then re-assign the negatives to levels by the reference embedder's similarity
             (neg_1 = least similar): the curriculum then follows the embedder's ranking, not the
             LLM's grading; the ablation's "reference_levels" arm

Level order agreement is measured and reported under every policy; only `drop` acts on it (a
small embedder disagreeing with the LLM's grading is not evidence that the grading is wrong).

Similarities are computed once, when a record is written (`Scorer`, a load-once Ray Data stage);
flags and the policy are applied when records are read (`gate`), so thresholds and policy can change
without generating again.

    df = quality.gate(raw_records, QualityConfig(policy="drop"))
    ds = quality.gated("runs/tiny/synthesize")     # training rows of a records folder (ray.data.Dataset)
    quality.summarize(raw_records, QualityConfig())
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from mgh_ray import assets, records
from mgh_ray.config import Section
from mgh_ray.records import GEN_COLS, LEVELS, NEG_COLS, SIM_COLS  # noqa: F401  (the schema's home)

log = logging.getLogger(__name__)

_RANKED = (*(f"L{k}" for k in LEVELS), "pos")  # coarse .. fine, then the positive


class QualityConfig(Section):
    """Reference embedder, thresholds and policy of the quality gate."""

    embedder: str = "minilm"  # assets.model_path name, a local sentence-transformers folder or a hub id
    policy: Literal["filter", "drop", "keep", "relabel"] = "filter"  # see the module docstring
    fn_ratio: float = Field(0.95, gt=0)  # a negative scoring >= 95% of the positive's similarity is a probable positive
    copy_sim: float = Field(0.95, gt=-1, le=1)  # a negative this similar to the positive is a copy of it
    batch_size: int = Field(64, ge=1, strict=True)
    device: str | None = None  # None: from the Ray resources of the process (devices.device)
    num_cpus: float = Field(1.0, ge=0)  # resources of the scoring actor in the synthesis pipeline
    num_gpus: float = Field(0.0, ge=0)


def load_embedder(cfg: QualityConfig):
    """The reference embedder (a SentenceTransformer), loaded from the local cache when it is 'minilm',
    on `cfg.device` or else the device this process's Ray resources grant (`devices.device`: cuda in a
    scoring actor given `num_gpus`, cpu in one given none, even on a GPU node)."""
    from sentence_transformers import SentenceTransformer

    from mgh_ray import devices, driver

    driver.check_model_load(f"reference embedder {cfg.embedder}")

    device = devices.device(cfg.device)
    log.info("reference embedder %s on %s", cfg.embedder, device)
    return SentenceTransformer(str(assets.model_path(cfg.embedder)), device=str(device))


def _norm(text: str) -> str:
    return " ".join(str(text).casefold().split()).strip(" .")


def similarities(df: pd.DataFrame, encode: Callable[[list[str]], np.ndarray]) -> pd.DataFrame:
    """sim_pos = cos(q,p), sim_k = cos(q,n_k), simp_k = cos(n_k,p) for each row of `df`.

    `encode` maps texts to L2-normalised vectors; `df` needs query, positive and gen_1..gen_4.
    """
    n = len(df)
    out = pd.DataFrame(index=df.index, columns=list(SIM_COLS), dtype="float64")
    if n == 0:
        return out
    texts = [*df["query"], *df["positive"], *(t for c in GEN_COLS for t in df[c])]
    vecs = encode([str(t) for t in texts])  # (n * 6, dim), unit length
    q, p = vecs[:n], vecs[n:2 * n]  # (n, dim) each
    negs = vecs[2 * n:].reshape(len(LEVELS), n, -1)  # (4, n, dim)
    out["sim_pos"] = np.einsum("nd,nd->n", q, p)
    for i, k in enumerate(LEVELS):
        out[f"sim_{k}"] = np.einsum("nd,nd->n", q, negs[i])
        out[f"simp_{k}"] = np.einsum("nd,nd->n", negs[i], p)
    return out


class Scorer:
    """Ray Data stage: adds SIM_COLS to rows with status 'ok' (others get NaN). Loads the model once."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = QualityConfig.model_validate(cfg)
        self.model = load_embedder(self.cfg)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.cfg.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.copy()
        for col in SIM_COLS:
            batch[col] = np.nan
        ok = batch["status"] == "ok"
        if ok.any():
            batch.loc[ok, list(SIM_COLS)] = similarities(batch[ok], self.encode)
        return batch


def flags(df: pd.DataFrame, cfg: QualityConfig) -> pd.DataFrame:
    """Per-record gate flags from stored similarities: copy_k, above_k, fn_k, pair orders, ordered."""
    out = pd.DataFrame(index=df.index)
    pos = df["sim_pos"].to_numpy()
    threshold = pos - (1.0 - cfg.fn_ratio) * np.abs(pos)
    norm_pos = df["positive"].map(_norm)
    for k in LEVELS:
        same_text = df[f"gen_{k}"].map(_norm) == norm_pos
        out[f"copy_{k}"] = same_text.to_numpy() | (df[f"simp_{k}"].to_numpy() >= cfg.copy_sim)
        out[f"above_{k}"] = df[f"sim_{k}"].to_numpy() >= threshold
        out[f"fn_{k}"] = out[f"copy_{k}"] | out[f"above_{k}"]
    sims = {f"L{k}": df[f"sim_{k}"].to_numpy() for k in LEVELS} | {"pos": pos}
    for a, b in itertools.combinations(_RANKED, 2):
        out[f"order_{a}_{b}"] = sims[a] < sims[b]
    adjacent = [f"order_{a}_{b}" for a, b in zip(_RANKED, _RANKED[1:])]
    out["ordered"] = out[adjacent].all(axis=1)
    out["n_false_negatives"] = out[[f"fn_{k}" for k in LEVELS]].sum(axis=1)
    return out


def gate(df: pd.DataFrame, cfg: QualityConfig) -> pd.DataFrame:
    """`df` plus flags, `passed`, and the training negatives neg_1..neg_4 chosen by `cfg.policy`.

    `levels_from` says which written level each neg_k came from ("1,2,3,4" unless relabelled, e.g.
    "2,1,3,4"). Only `relabel` moves a negative off the level the LLM wrote it for. `levels_in_order`
    counts the adjacent levels (neg_k, neg_k+1) that the reference embedder orders as training reads
    them (sim(q, neg_k) < sim(q, neg_k+1)): 0 to 3, and 3 for every relabelled record.
    """
    if df.empty:
        return df.assign(**{c: pd.Series(dtype=object) for c in NEG_COLS},
                         passed=pd.Series(dtype=bool), levels_from=pd.Series(dtype=object),
                         levels_in_order=pd.Series(dtype=int))
    f = flags(df, cfg)
    out = pd.concat([df, f], axis=1)
    gens = df[list(GEN_COLS)].to_numpy(dtype=object)  # (n, 4)
    sims = df[[f"sim_{k}" for k in LEVELS]].to_numpy(dtype=float)  # (n, 4)
    if cfg.policy == "relabel":
        order = np.argsort(sims, axis=1, kind="stable")  # (n, 4)
        gens = np.take_along_axis(gens, order, axis=1)
        sims = np.take_along_axis(sims, order, axis=1)
        out["levels_from"] = [",".join(str(i + 1) for i in row) for row in order]
    else:
        out["levels_from"] = "1,2,3,4"
    out["levels_in_order"] = (sims[:, :-1] < sims[:, 1:]).sum(axis=1)  # (n,)
    for i, col in enumerate(NEG_COLS):
        out[col] = gens[:, i]
    if cfg.policy == "keep":
        out["passed"] = True
    elif cfg.policy == "drop":
        out["passed"] = f["ordered"] & (f["n_false_negatives"] == 0)
    else:  # filter, relabel: only what the gate flags goes
        out["passed"] = f["n_false_negatives"] == 0
    return out


def summarize(df: pd.DataFrame, cfg: QualityConfig) -> dict[str, Any]:
    """Rates for the report: level-order agreement per pair, false negatives, what the policy keeps.
    (The rates of one frame's `summary_counts`; a large folder sums the counts per batch first.)"""
    return summary_rates(summary_counts(df, cfg), cfg)


def summary_counts(df: pd.DataFrame, cfg: QualityConfig) -> dict[str, float]:
    """Additive counts of one batch of records (plus its generated tokens and retries, when present):
    sums over batches, then `summary_rates`, give the report of a folder of any size."""
    n = len(df)
    if n == 0:
        return {"n": 0}
    f = flags(df, cfg)
    fn = f[[f"fn_{k}" for k in LEVELS]].to_numpy()
    out: dict[str, float] = {
        "n": n, "passed": int(gate(df, cfg)["passed"].sum()), "ordered": int(f["ordered"].sum()),
        "fn": int(fn.sum()), "fn_any": int(fn.any(axis=1).sum()),
        "above_any": int(f[[f"above_{k}" for k in LEVELS]].to_numpy().any(axis=1).sum()),
        "copy_any": int(f[[f"copy_{k}" for k in LEVELS]].to_numpy().any(axis=1).sum()),
        "sim_pos": float(df["sim_pos"].sum()),
        "gen_tokens": int(df["gen_tokens"].fillna(0).sum()) if "gen_tokens" in df else 0,
        "retries": int(df["retries"].fillna(0).sum()) if "retries" in df else 0,
    }
    for a, b in itertools.combinations(_RANKED, 2):
        out[f"order:{a}<{b}"] = int(f[f"order_{a}_{b}"].sum())
    for i, k in enumerate(LEVELS):
        out[f"fn:L{k}"] = int(fn[:, i].sum())
        out[f"sim:L{k}"] = float(df[f"sim_{k}"].sum())
    return out


def summary_rates(c: dict[str, float], cfg: QualityConfig) -> dict[str, Any]:
    """`summarize`'s rates from summed `summary_counts`."""
    n = int(c.get("n", 0))
    if n == 0:
        return {"records": 0}

    def r(x: float, d: float = n) -> float:
        return round(float(x) / d, 4)

    return {
        "records": n, "policy": cfg.policy, "passed": int(c["passed"]), "passed_rate": r(c["passed"]),
        "order_agreement": {f"{a}<{b}": r(c[f"order:{a}<{b}"]) for a, b in itertools.combinations(_RANKED, 2)},
        "fully_ordered_rate": r(c["ordered"]),
        "false_negative_rate": r(c["fn"], n * len(LEVELS)),
        "false_negative_rate_by_level": {f"L{k}": r(c[f"fn:L{k}"]) for k in LEVELS},
        "records_with_false_negative": r(c["fn_any"]),
        "answers_query_rate": r(c["above_any"]),
        "copies_positive_rate": r(c["copy_any"]),
        "mean_similarity": {**{f"L{k}": r(c[f"sim:L{k}"]) for k in LEVELS}, "pos": r(c["sim_pos"])},
    }


# --------------------------------------------------------------------------- the gated view


def folder_config(folder: str, policy: str | None = None) -> QualityConfig:
    """The quality config a records folder was written with (its config.yaml), `policy` overriding."""
    from mgh_ray.layout import load_config_dict

    saved = load_config_dict(folder) or {}
    qcfg = QualityConfig.model_validate(saved.get("quality", {}))
    return qcfg.model_copy(update={"policy": policy}) if policy is not None else qcfg


def gate_batch(batch: pd.DataFrame, qcfg: dict[str, Any]) -> pd.DataFrame:
    """Training rows of one batch of raw records: those passing the gate, TRAIN_COLS first."""
    cfg = QualityConfig.model_validate(qcfg)
    gated = gate(batch, cfg)
    gated = gated[gated["passed"]]
    if "kind" not in gated.columns:
        gated = gated.assign(kind="short-long")
    extra = [c for c in ("seed_id", "mode", "levels_from", "levels_in_order", "n_false_negatives", "ordered",
                         "prompt_version", "model") if c in gated.columns]
    out = gated[records.TRAIN_COLS + extra].reset_index(drop=True)
    out[records.TRAIN_COLS] = out[records.TRAIN_COLS].fillna("").astype(str)
    return out


def gated(folder: str, policy: str | None = None):
    """The gated view of a records folder as a ray.data.Dataset (TRAIN_COLS first, then provenance).

    The gate uses the folder's saved quality config; `policy` overrides its policy."""
    ds = records.read(folder, "records")
    if ds is None:
        raise records.RecordsError(f"no records in {folder}: run `mgh-ray synthesize` (or `mgh-ray mine`) "
                                   "first, or pass the folder of an earlier run")
    qcfg = folder_config(folder, policy).model_dump(mode="json")
    return ds.map_batches(gate_batch, batch_format="pandas", fn_kwargs={"qcfg": qcfg}, batch_size=1024)


def gated_frame(folder: str, policy: str | None = None) -> pd.DataFrame:
    """The gated view of a small records folder as pandas (tests and tiny runs; training streams
    `gated` instead)."""
    if not records.shard_files(folder):
        return pd.DataFrame(columns=records.TRAIN_COLS)
    return gated(folder, policy).to_pandas()


# ------------------------------------------------------------------ a folder's quality report


def _batch_counts(batch: pd.DataFrame, qcfg: dict[str, Any]) -> pd.DataFrame:
    """Additive quality counts of one batch of records (summed on the driver: counts, not rows)."""
    return pd.DataFrame([summary_counts(batch, QualityConfig.model_validate(qcfg))])


def sum_batches(ds: Any, fn: Callable[..., pd.DataFrame], **kwargs: Any) -> dict[str, float]:
    """Per-batch counts of a Ray Dataset (`fn` on workers, one row per batch), summed here."""
    if ds is None:
        return {}
    parts = ds.map_batches(fn, batch_format="pandas", fn_kwargs=kwargs, batch_size=4096).to_pandas()
    return parts.fillna(0).sum().to_dict() if len(parts) else {}


def folder_counts(out_dir: str, cfg: QualityConfig) -> dict[str, float]:
    """The quality counts of a records folder (synthesis or mining), for `summary_rates`."""
    return sum_batches(records.read(out_dir, "records"), _batch_counts, qcfg=cfg.model_dump(mode="json"))

