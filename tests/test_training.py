"""Training: config presets, the data cursor, contrastive steps on real text (only LoRA moves, the loss
of held-out records falls; K negatives per query and symmetric rows match a reference), and on the
real Ray cluster: a worker killed mid-stage resumes from the checkpoint with the same step count and
stage sequence and ends with the model an uninterrupted run trains; a new driver on the same out_dir
resumes and does not redo."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
import torch
import yaml

from mgh_ray import config as config_io
from mgh_ray import devices
from mgh_ray.batch_loss import concat_inputs, contrastive_loss
from mgh_ray.benchmarks.training import seed_records
from mgh_ray.curriculum import Curriculum
from mgh_ray.encoder import Encoder, EncoderConfig
from mgh_ray.losses import InfoNCE, LossConfig
from mgh_ray.training import TrainConfig, lr_factor, read_metrics, train


def test_default_is_the_tiny_cpu_preset_and_a_gpu_cluster_is_expressible(tmp_path):
    cfg = TrainConfig()
    enc = cfg.encoder
    assert (enc.backbone, enc.pooling.mode, enc.lora.enabled) == ("smollm2", "ata", True)
    assert (cfg.num_workers, cfg.use_gpu, cfg.fail_at_step) == (2, False, None)
    config_io.save(cfg, tmp_path / "c.yaml")
    assert config_io.load(TrainConfig, tmp_path / "c.yaml") == cfg
    gpu = config_io.load(TrainConfig, tmp_path / "c.yaml", [
        "use_gpu=true", "num_workers=16", "backend=nccl", "batch_size=64", "steps=1000",
        "encoder.backbone=intfloat/e5-mistral-7b-instruct", "encoder.dtype=bfloat16",
        "encoder.max_length=512", "encoder.gradient_checkpointing=true", "encoder.lora.top_layers=null"])
    assert gpu.num_workers == 16 and gpu.encoder.dtype == "bfloat16"
    with pytest.raises(config_io.ConfigError, match="unknown key"):
        config_io.load(TrainConfig, None, ["workers=2"])
    threads = [cfg.threads, TrainConfig(cpus_per_worker=2.5).threads, TrainConfig(threads_per_worker=3).threads]
    assert threads == [1, 2, 3]


def test_a_started_run_resumes_only_with_its_settings(tmp_path):
    from mgh_ray.layout import save_config
    from mgh_ray.training import _check_same_run

    cfg = TrainConfig(steps=8)
    save_config(cfg, str(tmp_path))
    _check_same_run(TrainConfig(steps=9), str(tmp_path))  # no checkpoint yet (no metrics): any settings
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _check_same_run(cfg.model_copy(update={"max_failures": 0, "log_every": 1}), str(tmp_path))
    changed = config_io.override(cfg, ["steps=16", "encoder.lora.r=4"])
    with pytest.raises(config_io.ConfigError, match=r"encoder.lora.r: 16 -> 4, steps: 8 -> 16"):
        _check_same_run(changed, str(tmp_path))
    # a field added since the folder's config was written is not a change
    saved = config_io.read_yaml(tmp_path / "config.yaml")
    del saved["grad_clip"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_same_run(cfg.model_copy(update={"grad_clip": 0.5}), str(tmp_path))


def test_lr_schedule():
    cfg = TrainConfig(steps=10, warmup=2, lr=1.0, schedule="linear")
    f = [lr_factor(s, cfg) for s in range(10)]
    assert f[0] < f[1] < f[2] == 1.0 and f[-1] < 0.2 and all(x > 0 for x in f[:-1])
    # the default keeps the rate after warmup: the curriculum's last stage trains at the full rate
    const = [lr_factor(s, TrainConfig(steps=10, warmup=2)) for s in range(10)]
    assert const[0] < const[1] < const[2] == 1.0 and const[2:] == [1.0] * 8


def test_ray_train_polls_its_workers_often_unless_the_user_chose(monkeypatch):
    """A worker's report waits for the controller's next poll (trainer.py): runs poll every 0.25 s
    while they last, not Ray's 2 s; a value the user set stays, and nothing outlives the run."""
    from mgh_ray import trainer

    monkeypatch.delenv(trainer.POLL_ENV, raising=False)
    assert trainer.poll_interval_s() == 2.0  # Ray's default
    with trainer.polling():
        assert os.environ[trainer.POLL_ENV] == "0.25" and trainer.poll_interval_s() == trainer.POLL_INTERVAL_S
    assert trainer.POLL_ENV not in os.environ
    monkeypatch.setenv(trainer.POLL_ENV, "3")
    with trainer.polling():
        assert trainer.poll_interval_s() == 3.0
    assert os.environ[trainer.POLL_ENV] == "3"


def test_concat_pads_on_the_tokenizer_side():
    ones = lambda n: torch.ones(1, n, dtype=torch.long)  # noqa: E731
    a = {"input_ids": ones(2), "attention_mask": ones(2)}
    b = {"input_ids": ones(4), "attention_mask": ones(4)}
    right, left = concat_inputs(a, b, False, 0), concat_inputs(a, b, True, 0)
    assert right["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert left["attention_mask"][0].tolist() == [0, 0, 1, 1]
    assert "pool_mask" not in right


def test_steps_on_varied_batches_change_only_lora_and_lower_held_out_loss(smollm2_path):
    """Each step sees new records; the loss that must fall is that of records never trained on."""
    torch.manual_seed(0)
    cfg = EncoderConfig(backbone=str(smollm2_path), max_length=32, lora={"top_layers": 2})
    enc = Encoder.from_config(cfg)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    records = seed_records(56, seed=1)
    train_rows, held_out = records.iloc[:48], records.iloc[48:]
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    loss_fn = InfoNCE(LossConfig())
    levels = np.full((len(held_out), 1), 2)

    def held_out_loss() -> float:
        enc.eval()
        with torch.no_grad():
            return contrastive_loss(enc, enc, loss_fn, held_out, levels).item()

    start = held_out_loss()
    enc.train()
    for step in range(6):  # 6 distinct batches of 8
        batch = train_rows.iloc[step * 8:(step + 1) * 8]
        loss = contrastive_loss(enc, enc, loss_fn, batch, np.full((8, 1), 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = held_out_loss()
    changed = {k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])}
    lora_b = {k for k in before if "lora_B" in k}
    assert lora_b and lora_b <= changed  # every adapter moved ...
    assert all("lora_" in k for k in changed)  # ... and nothing else did
    assert end < 0.9 * start, (start, end)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["last", "mean"])
def test_last_token_pooling_learns_as_mean_pooling_does(smollm2_path, mode):
    """On a toy set of 16 records, 12 steps of the preset's LoRA (top 8 blocks) at the preset's rate
    raise retrieval among them (two more queries of 16 find their positive) and cut their loss by a
    fifth, for last-token pooling as for mean pooling.

    Pooling the appended EOS instead (`last_token: eos`, the behaviour before) fails this: SmolLM2's
    EOS closes a chat turn and its state is nearly the same for every text (unrelated texts at cosine
    0.89), so training collapses it further (r@1 0.06 -> 0.00 here) instead of teaching it."""
    records = seed_records(16, seed=3)
    torch.manual_seed(0)
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=48, pooling={"mode": mode},
                                            lora={"top_layers": 8}))
    instruction = records.instruction.iloc[0]

    def score() -> tuple[float, float]:
        q = enc.encode(list(records["query"]), instruction=instruction)
        s = q @ enc.encode(list(records["positive"])).T  # (16, 16)
        loss = torch.nn.functional.cross_entropy(torch.from_numpy(s) / 0.05, torch.arange(len(s)))
        return float((s.argmax(1) == np.arange(len(s))).mean()), loss.item()

    (r_before, loss_before) = score()
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    loss_fn = InfoNCE(LossConfig(hard_negatives=False))
    for step in range(12):
        enc.train()
        batch = records.iloc[(step % 2) * 8:(step % 2) * 8 + 8]
        loss = contrastive_loss(enc, enc, loss_fn, batch, np.ones(8, dtype=int))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    r_after, loss_after = score()
    # Measured: last 0.125 -> 0.375 (loss 3.32 -> 1.84), mean 0.625 -> 0.75 (loss 1.56 -> 1.08).
    assert r_after >= r_before + 2 / 16, (r_before, r_after)  # two more of the 16 queries found
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)


def _reference_loss(enc: Encoder, batch, levels: np.ndarray, symmetric: np.ndarray) -> torch.Tensor:
    """The loss contrastive_loss should compute, from `Encoder.encode` and `info_nce` directly."""
    from mgh_ray.losses import info_nce, text_keys

    b, k = levels.shape
    inst = list(batch["instruction"])
    q = enc.encode(list(batch["query"]), instruction=inst)  # (b, dim)
    pos = list(batch["positive"])
    negs = [batch[f"neg_{lv}"].iloc[i] for i in range(b) for lv in levels[i]]
    doc_inst = [inst[i] if symmetric[i] else None for i in range(b)] + \
               [inst[i] if symmetric[i] else None for i in range(b) for _ in range(k)]
    docs = pos + negs
    vecs = np.stack([enc.encode([t], instruction=i)[0] for t, i in zip(docs, doc_inst)])  # (b + b*k, dim)
    p, n = torch.from_numpy(vecs[:b]), torch.from_numpy(vecs[b:]).view(b, k, -1)
    return info_nce(torch.from_numpy(q), p, n, p_keys=text_keys(pos), n_keys=text_keys(negs).view(b, k))


@pytest.mark.parametrize("levels, symmetric", [
    (np.array([[1, 2, 3]] * 4), "none"),  # cumulative stage 3: three hard negatives per query
    (np.array([[2], [4], [1], [3]]), "column"),  # symmetric rows given as a bool column
    (np.array([[1, 2]] * 4), "kind"),  # ... or by their task family
])
def test_contrastive_loss_matches_a_reference_with_k_negatives_and_symmetric_rows(smollm2_path, levels,
                                                                                   symmetric):
    torch.manual_seed(0)
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=48,
                                            lora={"top_layers": 2})).eval()
    batch = seed_records(4, seed=2)
    sym = np.array([symmetric != "none", False, symmetric != "none", False])
    if symmetric == "column":
        batch = batch.assign(symmetric=sym)
    elif symmetric == "kind":
        batch = batch.assign(kind=["sts", "short-long", "sts", "long-long"])
    loss_fn = InfoNCE(LossConfig())
    with torch.no_grad():
        got = contrastive_loss(enc, enc, loss_fn, batch, levels)
        want = _reference_loss(enc, batch, levels, sym)
        # the instruction on symmetric documents is not a no-op: treating them as plain differs
        plain = _reference_loss(enc, batch, levels, np.zeros(4, dtype=bool))
    assert got.item() == pytest.approx(want.item(), abs=1e-4)
    if symmetric != "none":
        assert abs(plain.item() - want.item()) > 1e-3


def test_in_batch_only_loss_never_embeds_the_hard_negatives(smollm2_path):
    torch.manual_seed(0)
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=32,
                                            lora={"top_layers": 2})).eval()
    batch = seed_records(4)
    levels = np.full(len(batch), 4)
    garbage = batch.assign(neg_4=["zzz qqq"] * len(batch))
    plain = InfoNCE(LossConfig(hard_negatives=False))
    with torch.no_grad():
        a = contrastive_loss(enc, enc, plain, batch, levels)
        b = contrastive_loss(enc, enc, plain, garbage, levels)  # other negatives: same loss
        with_negs = contrastive_loss(enc, enc, InfoNCE(LossConfig()), batch, levels)
    assert torch.equal(a, b)
    assert with_negs > a  # one more candidate per query can only raise InfoNCE


def _tiny(tmp_path, **kw) -> TrainConfig:
    # 4 stages of 2 steps; checkpoints after steps 3, 6, 8: a failure at step index 3 is mid-stage 2
    return TrainConfig(steps=8, batch_size=2, checkpoint_every=3, warmup=1, export=False,
                       encoder={"max_length": 32, "lora": {"top_layers": 2}}, **kw)


def _expected_stages(cfg: TrainConfig) -> list[int]:
    cur = Curriculum(cfg.curriculum, cfg.steps)
    return [p["stage"] + 1 for p in cur.plan() for _ in range(p["start"], p["stop"])]


@pytest.mark.integration
def test_killed_worker_resumes_mid_stage_from_the_checkpoint(ray_cluster, tmp_path):
    cfg = _tiny(tmp_path, fail_at_step=3, fail_rank=1, max_failures=1, log_batch_ids=True)
    records = seed_records(16)
    model_dir = train(cfg, records, tmp_path)
    assert (tmp_path / "_failure_injected").read_text().startswith("step 3 rank 1")
    m = read_metrics(tmp_path)
    assert m.step.tolist() == list(range(1, 9))  # each step once, none lost, none repeated
    assert m.stage.tolist() == _expected_stages(cfg) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert m.resumed_from.tolist() == [0, 0, 0, 3, 3, 3, 3, 3]  # from the mid-stage checkpoint, not 0
    assert (m.level == m.stage).all()  # curriculum mode: stage k uses level k
    assert np.isfinite(m.loss).all() and (m.pairs_per_s > 0).all()
    assert ((m.input_s >= 0) & (m.input_s < m.step_s)).all()  # the input wait is part of the step
    # precision "auto" on a CPU: bf16 autocast where it has bf16 arithmetic (this one does), float32 else
    want = "bfloat16 autocast" if devices.bf16_native("cpu") else "the weights' dtype"
    assert cfg.precision == "auto" and set(m.compute) == {want}
    # the restart guarantee (training.py docstring): a new pass starts at the resumed step, so the
    # next 16 / (2 workers x 2) = 4 steps see every record exactly once; within a step no id repeats
    after = [i for ids in m.ids[3:7] for rank in ids for i in rank]
    assert sorted(after) == sorted(records["id"])
    assert all(len({i for rank in ids for i in rank}) == 4 for ids in m.ids)
    assert Encoder.load(model_dir).encode(["a headline"]).shape == (1, 576)
    assert config_io.load(TrainConfig, tmp_path / "config.yaml") == cfg

    # training moved the resumed model (the check above is not one of shape only). An uninterrupted
    # run is not compared batch for batch: a restart starts a new data pass (the guarantee above).
    texts = ["Kenya wins the London marathon", "Shares fell after the profit warning"]
    resumed_vecs = Encoder.load(model_dir).encode(texts, instruction="Retrieve the article")
    untrained = Encoder.from_config(cfg.encoder).eval().encode(texts, instruction="Retrieve the article")
    assert np.abs(resumed_vecs - untrained).max() > 1e-3

    # a new driver on a finished out_dir returns at once (one whose workers all failed resumes from the
    # latest checkpoint: the next test)
    assert train(cfg, seed_records(16), tmp_path) == model_dir
    assert read_metrics(tmp_path).step.tolist() == list(range(1, 9))


@pytest.mark.integration
def test_new_driver_resumes_a_run_whose_workers_all_failed(ray_cluster, tmp_path, caplog):
    """The first driver gives up (no retries left); rerunning `train` on the same out_dir
    continues from the latest checkpoint instead of starting over."""
    from ray.train import TrainingFailedError

    cfg = _tiny(tmp_path, fail_at_step=3, fail_rank=0, max_failures=0, num_workers=1)
    with pytest.raises(TrainingFailedError):  # the worker's failure, not any error on the way
        train(cfg, seed_records(16), tmp_path)
    assert read_metrics(tmp_path).step.tolist() == [1, 2, 3]
    # the saved optimizer and schedule belong to these settings: another lr is refused, before Ray
    with pytest.raises(config_io.ConfigError, match=r"lr: 0.0005 -> 0.001.*settings in .*config.yaml"):
        train(cfg.model_copy(update={"lr": 1e-3}), seed_records(16), tmp_path)
    cfg = cfg.model_copy(update={"max_failures": 1, "export": True})  # how it runs may change
    records = seed_records(16)
    with caplog.at_level(logging.INFO, logger="mgh_ray.training"):
        model_dir = train(cfg, records, tmp_path)
    # where this fit's time went: the 5 steps it ran (not the 3 of the failed driver) and the rest
    assert re.search(r"training took \d+ s: 5 steps \d+ s \(waiting for input", caplog.text), caplog.text[-2000:]
    m = read_metrics(tmp_path)
    assert m.step.tolist() == list(range(1, 9))
    assert m.resumed_from.tolist() == [0, 0, 0, 3, 3, 3, 3, 3]
    assert m.stage.tolist() == _expected_stages(cfg)
    assert (tmp_path / "model" / "encoder.yaml").is_file() and model_dir == str(tmp_path / "model")
    # the export's query prompt is the instruction the records were counted by, before the steps
    st = json.loads((tmp_path / "export" / "merged" / "config_sentence_transformers.json").read_text())
    instruction = records["instruction"].mode()[0]
    assert instruction in st["prompts"]["query"], st["prompts"]
