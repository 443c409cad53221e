"""Encoder: encode contract, padding/batch invariance, save/load round trip (the adapter really loads),
and the export: merged + adapter folders, and a sentence-transformers folder giving the same vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgh_ray.encoder import Encoder, EncoderConfig
from mgh_ray.pooling import PoolingConfig

TEXTS = ["Kenya's runner wins the London marathon in a record time",
         "Shares in the mobile phone maker fell sharply",
         "Minister resigns"]
INSTRUCTION = "Given a news headline, retrieve the article"


def _perturb_lora(enc: Encoder, seed: int = 0) -> None:
    """A fresh LoRA adapter is a no-op (B = 0); give it weights so that losing it would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.fixture(scope="module")
def smollm2_encoder(smollm2_path):
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=32))
    _perturb_lora(enc)
    return enc


def test_encode_contract(smollm2_encoder):
    enc = smollm2_encoder
    docs = enc.encode(TEXTS, batch_size=2)
    queries = enc.encode(TEXTS, instruction=INSTRUCTION)
    assert docs.shape == (3, enc.dim) == (3, 576) and docs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, atol=1e-5)
    assert enc.format(["x"], INSTRUCTION) == [f"Instruct: {INSTRUCTION}\nQuery: x"]
    assert not np.allclose(docs, queries, atol=1e-3)  # the instruction is applied to queries only
    assert enc.tokenize(["hi"])["input_ids"][0, -1].item() == enc.tokenizer.eos_token_id


def test_only_lora_parameters_are_trainable(smollm2_encoder):
    names = smollm2_encoder.trainable_names()
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("mode", ["ata", "mean", "last", "weighted_mean"])
def test_batching_and_padding_side_never_change_a_vector(smollm2_encoder, mode):
    enc = smollm2_encoder
    enc.config.pooling = PoolingConfig(mode=mode)
    try:
        one_by_one = np.concatenate([enc.encode([t]) for t in TEXTS])
        batched = enc.encode(TEXTS)
        enc.tokenizer.padding_side = "left"
        left = enc.encode(TEXTS)
    finally:
        enc.tokenizer.padding_side = "right"
        enc.config.pooling = PoolingConfig()
    np.testing.assert_allclose(batched, one_by_one, atol=2e-5)
    np.testing.assert_allclose(left, one_by_one, atol=2e-5)


@pytest.mark.parametrize("mode", ["ata", "cls", "mean"])
def test_encoder_backbone_minilm(minilm_path, mode):
    enc = Encoder.from_config(EncoderConfig(backbone=str(minilm_path), pooling={"mode": mode},
                                            lora={"enabled": False}))
    assert not enc.causal and enc.dim == 384
    batched = enc.encode(TEXTS)
    enc.tokenizer.padding_side = "left"
    np.testing.assert_allclose(enc.encode(TEXTS), batched, atol=2e-5)
    np.testing.assert_allclose(np.concatenate([enc.encode([t]) for t in TEXTS]), batched, atol=2e-5)


def test_instruction_tokens_can_be_excluded(smollm2_path):
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=64,
                                            lora={"enabled": False},
                                            pooling={"exclude_instruction": True, "mode": "mean"}))
    batch = enc.tokenize(TEXTS, instruction=INSTRUCTION)
    n = enc.instruction_length(INSTRUCTION)
    assert n > 5
    assert (batch["attention_mask"].sum(-1) - batch["pool_mask"].sum(-1) == n).all()


def test_save_load_round_trip(smollm2_encoder, tmp_path):
    enc = smollm2_encoder
    enc.save(tmp_path / "model")
    assert (tmp_path / "model" / "encoder.yaml").is_file()
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = Encoder.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)
    fresh = Encoder.from_config(enc.config)  # same config, untrained adapter
    assert not np.allclose(fresh.encode(TEXTS), enc.encode(TEXTS), atol=1e-3)


def test_load_refuses_an_adapter_of_another_shape(smollm2_encoder, tmp_path):
    smollm2_encoder.save(tmp_path / "model")
    other = smollm2_encoder.config.model_copy(update={"lora": smollm2_encoder.config.lora.model_copy(
        update={"target_modules": ["q_proj"]})})
    with pytest.raises(ValueError, match="does not fit"):
        Encoder.from_config(other, weights=tmp_path / "model")


@pytest.mark.integration
@pytest.mark.parametrize("pool", [{"mode": "ata", "exclude_instruction": True, "top_k": 4, "mean_mix": 0.2},
                                  {"mode": "weighted_mean", "exclude_instruction": True}])
def test_export_sentence_transformers_gives_the_same_vectors(smollm2_encoder, tmp_path, pool):
    import peft
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    enc = smollm2_encoder
    enc.config.pooling = PoolingConfig(**pool)
    try:
        enc.export(tmp_path / "export")
        merged = tmp_path / "export" / "merged"
        # ATA's pooling module lives in mgh_ray: sentence-transformers >= 6 imports it only when trusted
        st = SentenceTransformer(str(merged), device="cpu", trust_remote_code=pool["mode"] == "ata")
        np.testing.assert_allclose(st.encode(TEXTS), enc.encode(TEXTS), atol=1e-4)
        prompt = enc.config.query_template.format(instruction=INSTRUCTION, text="")
        np.testing.assert_allclose(st.encode(TEXTS, prompt=prompt),
                                   enc.encode(TEXTS, instruction=INSTRUCTION), atol=1e-4)
        # the adapter alone on the base model equals the merged weights
        base = AutoModel.from_pretrained(str(enc.config.backbone))
        adapter = str(tmp_path / "export" / "adapter")
        with_adapter = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
        plain = AutoModel.from_pretrained(str(merged))
        name = "layers.29.self_attn.q_proj.weight"
        torch.testing.assert_close(with_adapter.state_dict()[name], plain.state_dict()[name])
        assert not torch.allclose(AutoModel.from_pretrained(enc.config.backbone).state_dict()[name],
                                  plain.state_dict()[name])
    finally:
        enc.config.pooling = PoolingConfig()
