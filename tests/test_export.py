"""The sentence-transformers export carries the model's query prompts and its max_seq_length, so a user
who loads it gets the query vectors the model was trained (and is served) with."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mgh_ray import export
from mgh_ray.encoder import Encoder, EncoderConfig
from mgh_ray.export import query_prompts

QUERIES = ["Kenya's runner wins the London marathon", "Shares in the phone maker fell"]
DOCS = ["The Kenyan athlete crossed the line first in London on Sunday, in a course record."]
INSTRUCTION = "Given a news headline, retrieve the news article it refers to"
OTHER = "Given a question, retrieve the passage that answers it"


def test_query_prompts_rank_instructions_by_frequency():
    got = query_prompts([OTHER, INSTRUCTION, INSTRUCTION, "", OTHER, INSTRUCTION, "third"])
    assert got == {"query": INSTRUCTION, "query_2": OTHER, "query_3": "third"}
    assert len(query_prompts([f"task {i}" for i in range(20)], max_prompts=5)) == 5
    assert query_prompts([]) == {}


@pytest.fixture(scope="module")
def exported(smollm2_path, tmp_path_factory):
    torch.manual_seed(0)
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=40,
                                            pooling={"mode": "ata", "exclude_instruction": True}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0): give it weights so merging matters
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    out = tmp_path_factory.mktemp("export")
    export.write(enc, out, prompts=query_prompts([INSTRUCTION, INSTRUCTION, OTHER]))
    return enc.eval(), out / "merged"


@pytest.mark.integration
def test_exported_prompts_give_the_in_process_query_vectors(exported):
    from sentence_transformers import SentenceTransformer

    enc, merged = exported
    st = SentenceTransformer(str(merged), device="cpu", trust_remote_code=True)
    assert st.max_seq_length == 40
    assert json.loads((merged / "sentence_bert_config.json").read_text())["max_seq_length"] == 40
    assert st.prompts["query"] == enc.config.query_template.format(instruction=INSTRUCTION, text="")
    # documents are read in the format's user turn too: that prefix is the default prompt
    assert st.prompts["document"] == enc.prefix(None) == "<|im_start|>user\n"
    assert st.default_prompt_name == "document"

    want = enc.encode(QUERIES, instruction=INSTRUCTION)  # what Serve returns for this instruction
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query"), want, atol=1e-4)
    np.testing.assert_allclose(st.encode_query(QUERIES), want, atol=1e-4)
    np.testing.assert_allclose(st.encode(QUERIES, prompt_name="query_2"),
                               enc.encode(QUERIES, instruction=OTHER), atol=1e-4)
    np.testing.assert_allclose(st.encode_document(DOCS), enc.encode(DOCS), atol=1e-4)
    # the query prompt is not a no-op: as documents the same texts get other vectors
    plain = st.encode(QUERIES)
    assert np.max(np.abs(plain - want)) > 1e-2


def test_export_refuses_an_unknown_default_prompt_or_an_empty_instruction(exported, tmp_path):
    enc, _ = exported
    with pytest.raises(ValueError, match="default_prompt_name"):
        export.write(enc, tmp_path / "x", prompts={"query": INSTRUCTION}, default_prompt_name="qeury")
    with pytest.raises(ValueError, match="non-empty instruction"):
        export.write(enc, tmp_path / "y", prompts={"query": " "})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
