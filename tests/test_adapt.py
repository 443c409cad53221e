"""Adaptation (MNTP): the corruption and the loss against plain references; on the real Ray cluster, a
run whose worker dies mid-way resumes at its step when run again, and its adapter becomes the base of a
bidirectional encoder (and only of a bidirectional one)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mgh_ray.adapt import AdaptConfig, adapt, mask_tokens, mntp_loss, needed, read_metrics, seed_texts
from mgh_ray.encoder import Encoder, EncoderConfig


def test_mask_tokens_corrupts_only_maskable_positions_in_berts_proportions():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 50), generator=gen)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :5] = False  # e.g. the template's markers
    maskable[:, -1] = False  # the EOS
    corrupted, labels = mask_tokens(ids, maskable, mask_id=7, vocab=1000, prob=0.2, gen=gen)
    chosen = labels != -100
    assert not chosen[~maskable].any() and (corrupted[~maskable] == ids[~maskable]).all()
    assert (labels[chosen] == ids[chosen]).all()
    assert abs(chosen.float().sum() / maskable.sum() - 0.2) < 0.02
    masked = (corrupted == 7) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.04  # 80% mask token, the rest random or kept
    assert (corrupted[~chosen] == ids[~chosen]).all()


def test_mntp_loss_predicts_each_masked_token_from_the_previous_position():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(2, 6, 8)
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[1, 5], labels[1, 1] = 4, 9, 17
    loss, _ = mntp_loss(hidden, labels, head)
    want = torch.stack([torch.nn.functional.cross_entropy(head(hidden[b, i - 1])[None], labels[b, i][None])
                        for b, i in [(0, 2), (1, 1), (1, 5)]]).mean()
    torch.testing.assert_close(loss, want)
    assert mntp_loss(hidden, torch.full((2, 6), -100), head)[0].item() == 0.0


def test_seed_texts_take_every_source_in_equal_share():
    seeds = pd.DataFrame({"query": [f"q{i}" for i in range(40)], "positive": [f"p{i}" for i in range(40)],
                          "source": ["a"] * 30 + ["b"] * 10})
    texts = seed_texts(seeds, 20, seed=0)
    assert len(texts) == 20 == len(set(texts))
    assert sum(t[1:] in {str(i) for i in range(30)} for t in texts) == 10  # half from a, half from b
    assert seed_texts(seeds, 20, seed=0) == texts


def test_only_a_bidirectional_encoder_is_adapted():
    assert needed(EncoderConfig(attention="bidirectional"), AdaptConfig())
    assert not needed(EncoderConfig(attention="causal"), AdaptConfig())
    assert not needed(EncoderConfig(), AdaptConfig())  # the backbone's own: causal
    assert not needed(EncoderConfig(attention="bidirectional"), AdaptConfig(steps=0))


@pytest.mark.integration
def test_stopped_adaptation_resumes_at_its_step_and_becomes_the_encoders_base(ray_cluster, tmp_path):
    seeds = tmp_path / "seeds.parquet"
    pd.DataFrame({"query": [f"Headline number {i} about the economy" for i in range(20)],
                  "positive": [f"The article {i} says that shares fell after a profit warning." for i in range(20)],
                  "source": "bbc"}).to_parquet(seeds)
    enc_cfg = EncoderConfig(attention="bidirectional", max_length=32, pooling={"mode": "mean"})
    cfg = AdaptConfig(steps=6, batch_size=2, max_length=32, checkpoint_every=2, warmup=1, num_workers=1,
                      fail_at_step=3, max_failures=0)
    out = tmp_path / "adapt"
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError):  # the only worker dies: the run gives up
        adapt(cfg, enc_cfg, str(seeds), str(out))
    first = read_metrics(str(out))
    assert first.step.tolist() == [1, 2]  # written with the checkpoint of step 2
    adapter = adapt(cfg.model_copy(update={"max_failures": 1}), enc_cfg, str(seeds), str(out))
    m = read_metrics(str(out))
    assert m.step.tolist() == list(range(1, 7)) and m.resumed_from.tolist() == [0, 0, 2, 2, 2, 2]
    assert m.loss.head(2).tolist() == first.loss.tolist()  # the first run's steps are kept, not redone
    assert np.isfinite(m.loss).all() and (out / "report.md").is_file() and (out / "loss.png").is_file()
    steps = [ln.split("|")[1].strip() for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| ")]
    assert steps == ["step", "1"], steps  # the loss curve's table: step 1 (then every log_every=10), whole

    texts = ["Kenya wins the London marathon", "Shares fell after the profit warning"]
    adapted = Encoder.from_config(enc_cfg.model_copy(update={"base_adapter": adapter})).eval()
    plain = Encoder.from_config(enc_cfg).eval()
    assert np.abs(adapted.encode(texts) - plain.encode(texts)).max() > 1e-4  # the adaptation is merged
    adapted.save(tmp_path / "model")  # keeps a copy of the adapter: the folder is enough
    assert (tmp_path / "model" / "base_adapter" / "adapter_model.safetensors").is_file()
    np.testing.assert_allclose(Encoder.load(tmp_path / "model").encode(texts), adapted.encode(texts), atol=1e-5)
    with pytest.raises(ValueError, match="adapted with bidirectional attention.*runs causal attention"):
        Encoder.from_config(enc_cfg.model_copy(update={"base_adapter": adapter, "attention": "causal"}))
