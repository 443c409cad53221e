"""Inputs: what another engine gets (token ids and the prefix it leaves out of the pool) is what the
torch encoder reads; the truncation policy cuts or refuses."""

from __future__ import annotations

import pytest

from mgh_ray.encoder import Encoder, EncoderConfig, InputTooLong

INSTRUCTION = "Given a news headline, retrieve the news article it refers to"
TEXTS = ["Kenya wins the London marathon", "3 goals in 10 minutes", "Hi"]


@pytest.fixture(scope="module")
def inputs(smollm2_path):
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=24, lora={"enabled": False},
                                            pooling={"mode": "mean"}))
    return enc.inputs


@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_token_ids_are_the_tokens_and_pooled_set_of_tokenize(inputs, instruction):
    batch = inputs.tokenize(TEXTS, instruction)
    for i, (ids, n) in enumerate(inputs.token_ids(TEXTS, instruction)):
        real = batch["attention_mask"][i].bool()
        assert ids == batch["input_ids"][i][real].tolist()  # the same tokens, no padding
        pooled = batch["pool_mask"][i][real]
        assert not pooled[:n].any() and pooled[n:].all()  # the prefix is left out, the rest pooled
        assert n > 0 and len(ids) <= inputs.max_tokens  # the format's markers always precede the text
    if instruction:  # a prefix longer than the model reads leaves no text: the whole sequence pools
        assert inputs.token_ids(["x"], INSTRUCTION * 3)[0][1] == 0


def test_the_truncation_policy_cuts_or_refuses(inputs):
    long = "word " * 1000
    assert len(inputs.cut([long], None, "truncate")[0]) == inputs.max_chars < len(long)
    assert inputs.cut(["short"], None, "error") == ["short"]
    with pytest.raises(InputTooLong, match="input 1 has .* tokens, more than the model's limit of 24"):
        inputs.cut(["short", long], None, "error")
    with pytest.raises(ValueError, match="unknown truncation policy"):
        inputs.cut(["x"], None, "drop")


def test_threads_sharing_one_tokenizer_get_their_own_padding(inputs):
    """A Serve replica tokenises in threads (requests prepared while a batch encodes): 8 threads mixing
    padded batches with unpadded counts on one tokenizer each get what one thread alone gets. Without
    the lock around the tokenizer, about 1 call in 70 failed with ragged tensors here."""
    import concurrent.futures as cf
    import random

    rng = random.Random(0)
    texts = [" ".join(["word"] * rng.randint(1, 20)) for _ in range(32)]
    batches = [rng.sample(texts, 8) for _ in range(800)]
    want = {i: inputs.token_ids(b, INSTRUCTION) if i % 2 else inputs.token_counts(b) for i, b in enumerate(batches)}

    def work(i: int):
        return inputs.token_ids(batches[i], INSTRUCTION) if i % 2 else inputs.token_counts(batches[i])

    with cf.ThreadPoolExecutor(8) as pool:
        got = dict(zip(range(len(batches)), pool.map(work, range(len(batches)))))
    assert got == want
