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
    # SmolLM2's instruct format (ChatML): a user turn, closed by the EOS the tokenizer appends
    assert enc.config.prompt_format == "chatml"
    assert enc.format(["x"], INSTRUCTION) == [f"<|im_start|>user\n{INSTRUCTION}\nx"]
    assert enc.format(["x"], None) == ["<|im_start|>user\nx"]
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


def _pooled_text(enc: Encoder, texts: list[str], instruction: str | None) -> list[str]:
    batch = enc.tokenize(texts, instruction=instruction)
    return [enc.tokenizer.decode(ids[keep]) for ids, keep in zip(batch["input_ids"], batch["pool_mask"])]


def test_the_pooled_set_is_the_text_and_its_eos(smollm2_path):
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=64, lora={"enabled": False},
                                            pooling={"mode": "mean"}))
    assert enc.config.pooling.exclude_instruction  # the default, as in the paper
    eos = enc.tokenizer.eos_token
    assert _pooled_text(enc, TEXTS, INSTRUCTION) == [t + eos for t in TEXTS]
    assert _pooled_text(enc, TEXTS, None) == [t + eos for t in TEXTS]  # the format's markers stay out too
    # sentence-transformers counts a prompt by tokenising it alone: for the shipped format that is exact
    batch = enc.tokenize(TEXTS, instruction=INSTRUCTION)
    alone = len(enc.tokenizer(enc.prefix(INSTRUCTION), add_special_tokens=False)["input_ids"])
    assert (batch["attention_mask"].sum(-1) - batch["pool_mask"].sum(-1) == alone).all()


def test_an_instruction_ending_on_a_bpe_boundary_is_counted_exactly(smollm2_path):
    # "Query: " ends in a space that BPE merges into the text's first word ("Query", ":", " who"):
    # tokenised alone the prefix ends in its own " " token, one more than it holds in the input
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=64, lora={"enabled": False},
                                            query_template="Instruct: {instruction}\nQuery: {text}",
                                            pooling={"mode": "mean"}))
    eos = enc.tokenizer.eos_token
    texts = ["who won the marathon?", "Kenya", "3 goals in 10 minutes"]
    alone = len(enc.tokenizer(enc.prefix(INSTRUCTION), add_special_tokens=False)["input_ids"])
    batch = enc.tokenize(texts, instruction=INSTRUCTION)
    excluded = (batch["attention_mask"].sum(-1) - batch["pool_mask"].sum(-1)).tolist()
    # words take the space into their first token; SmolLM2 splits digits, so " 3" stays " ", "3"
    assert excluded == [alone - 1, alone - 1, alone]
    assert _pooled_text(enc, texts, INSTRUCTION) == [" " + texts[0] + eos, " " + texts[1] + eos, texts[2] + eos]


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
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pool", [{"mode": "ata", "exclude_instruction": True, "top_k": 4, "mean_mix": 0.2},
                                  {"mode": "weighted_mean", "exclude_instruction": True}])
def test_export_sentence_transformers_gives_the_same_vectors(smollm2_path, tmp_path, pool, attention):
    import peft
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=32, attention=attention,
                                            pooling=pool))
    _perturb_lora(enc)
    from mgh_ray import export

    export.write(enc, tmp_path / "export")
    merged = tmp_path / "export" / "merged"
    # ATA's pooling module lives in mgh_ray: sentence-transformers >= 6 imports it only when trusted
    st = SentenceTransformer(str(merged), device="cpu", trust_remote_code=pool["mode"] == "ata")
    assert st.default_prompt_name == "document"  # the format's document prefix, as the model read them
    np.testing.assert_allclose(st.encode(TEXTS), enc.encode(TEXTS), atol=1e-4)
    np.testing.assert_allclose(st.encode(TEXTS, prompt=enc.prefix(INSTRUCTION)),
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
