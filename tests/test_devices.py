"""Device and dtype choice: GPU cases as pure-function inputs (no GPU needed), the CPU case for real,
and the in-worker branch inside a real Ray actor."""

from __future__ import annotations

import pytest
import torch

from mgh_ray import devices
from mgh_ray.devices import pick_device, pick_dtype


@pytest.mark.parametrize("gpu_ids,visible,cuda,want", [
    (None, None, False, "cpu"),  # driver / script on a CPU machine
    (None, None, True, "cuda:0"),  # driver / script that sees a GPU
    (None, ["0", "1"], True, "cuda:0"),
    ([], None, True, "cpu"),  # Ray worker granted no GPU on a GPU node: stays off the GPU
    ([], [], False, "cpu"),
    (["3"], ["3"], True, "cuda:0"),  # Serve replica with num_gpus=1: Ray shows it only its GPU
    (["2"], ["0", "1", "2", "3"], True, "cuda:2"),  # Ray Train worker: the node's GPUs all visible
    ([0], ["0"], True, "cuda:0"),  # ids as ints (older Ray)
    (["1"], None, True, "cuda:0"),  # visibility not set: the first device
    (["0"], ["0"], False, "cpu"),  # granted a GPU but a CPU build of torch: cpu, with a warning
])
def test_auto_device_follows_the_granted_resources(gpu_ids, visible, cuda, want):
    for requested in ("auto", None):
        got = pick_device(requested, ray_gpu_ids=gpu_ids, visible=visible, cuda_available=cuda)
        assert got == torch.device(want)


def test_explicit_devices_are_honoured_or_refused_clearly():
    assert pick_device("cpu", ray_gpu_ids=["0"], visible=["0"], cuda_available=True) == torch.device("cpu")
    got = pick_device("cuda:1", ray_gpu_ids=None, visible=None, cuda_available=True)
    assert got == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="no CUDA device.*'auto'"):
        pick_device("cuda", ray_gpu_ids=None, visible=None, cuda_available=False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        pick_device("gpu", ray_gpu_ids=None, visible=None, cuda_available=True)


@pytest.mark.parametrize("configured,device,bf16,want", [
    ("auto", "cpu", False, torch.float32),
    ("auto", "cpu", True, torch.float32),
    ("auto", "cuda:0", True, torch.bfloat16),
    ("auto", "cuda:0", False, torch.float16),  # pre-Ampere GPU
    ("float32", "cuda:0", True, torch.float32),  # configured dtypes win
    ("bfloat16", "cpu", False, torch.bfloat16),
    ("float16", "cuda:0", True, torch.float16),
])
def test_dtype_choice(configured, device, bf16, want):
    assert pick_dtype(configured, device, bf16_supported=bf16) == want


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        pick_dtype("fp8", "cpu", bf16_supported=True)


@pytest.mark.parametrize("configured,cuda,native,want", [
    ("auto", False, True, "bfloat16"),  # a CPU with AVX512-BF16/AMX
    ("auto", False, False, "float32"),  # an AVX2-only CPU: vLLM would emulate bf16
    ("auto", True, True, "auto"),  # a GPU: vLLM's own choice (the model's dtype)
    ("bfloat16", False, False, "bfloat16"),  # asked for: honoured, even if emulated
    ("float32", True, True, "float32"),
])
def test_engine_dtype_choice(configured, cuda, native, want):
    assert devices.pick_engine_dtype(configured, cuda=cuda, bf16_native=native) == want


def test_an_unknown_engine_dtype_is_refused_in_the_config():
    from pydantic import ValidationError

    from mgh_ray.synthesis import SynthesisConfig

    with pytest.raises(ValidationError, match="dtype"):  # when the config is read, not in the actor
        SynthesisConfig(dtype="fp8")


@pytest.mark.parametrize("precision,weights,native,want", [
    ("auto", torch.float32, True, torch.bfloat16),  # a CPU with AVX512-BF16/AMX
    ("auto", torch.float32, False, None),  # a CPU without bf16 arithmetic: float32 as it is
    ("auto", torch.bfloat16, True, None),  # GPU "auto" weights are half precision already
    ("float32", torch.float32, True, None),
    ("bfloat16", torch.float32, False, torch.bfloat16),  # asked for: honoured, even if emulated
])
def test_training_precision_choice(precision, weights, native, want):
    assert devices.pick_autocast(precision, weights, bf16_native=native) == want


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*auto, float32 or bfloat16"):
        devices.pick_autocast("fp8", torch.float32, bf16_native=True)


def test_threads_are_given_back_after_the_block_even_when_it_fails():
    """torch's thread count is process-wide: a benchmark measuring at a replica's count in the caller's
    process must leave the caller as it was (it once left the test suite at one thread of two)."""
    before = torch.get_num_threads()
    with devices.threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), devices.threads(before + 2):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_a_bf16_autocast_training_step_keeps_float32_weights_and_the_float32_gradient(smollm2_path):
    """The same step's LoRA gradient in float32 and under bfloat16 autocast point the same way, and
    the trainable weights, their gradients and the embeddings stay float32 (only the matmuls drop)."""
    from mgh_ray.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=32), device="cpu")
    for p in enc.parameters():  # a LoRA B of zeros gives A no gradient: perturb it
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.01)
    inputs = enc.tokenize(["a headline about the budget", "a reply to a question", "the river bank"])
    grads = {}
    for precision in ("float32", "bfloat16"):
        amp, compute = devices.autocast(precision, enc, "cpu")
        assert compute == ("bfloat16 autocast" if precision == "bfloat16" else "the weights' dtype")
        with amp:
            assert torch.is_autocast_enabled("cpu") == (precision == "bfloat16")
            emb = enc(**inputs)
        assert emb.dtype == torch.float32
        (emb @ emb.T).triu(1).sum().backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in enc.parameters() if p.requires_grad])
        assert {p.dtype for p in enc.parameters() if p.requires_grad} == {torch.float32}
        assert grads[precision].dtype == torch.float32
        enc.zero_grad(set_to_none=True)
    cos = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0)
    assert cos > 0.95, cos


def test_this_process_and_its_encoder(smollm2_path):
    from mgh_ray.encoder import Encoder, EncoderConfig

    here = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert devices.device() == here  # a plain process, not a Ray worker: what torch sees
    enc = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=16))
    assert EncoderConfig().dtype == "auto"
    params = list(enc.parameters())
    assert {p.device for p in params} == {enc.device} and enc.device.type == here.type
    want = torch.float32 if here.type == "cpu" else torch.bfloat16
    assert enc.base_model.embed_tokens.weight.dtype == want
    cpu = Encoder.from_config(EncoderConfig(backbone=str(smollm2_path), max_length=16, dtype="bfloat16"),
                              device="cpu")
    assert cpu.device == torch.device("cpu") and cpu.base_model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.integration
def test_a_ray_actor_without_gpus_loads_on_cpu(ray_cluster):
    import ray

    @ray.remote(num_cpus=0.1, num_gpus=0)
    class Probe:
        def where(self):
            from mgh_ray import devices

            return devices._ray_gpu_ids(), str(devices.device()), str(devices.dtype("auto", devices.device()))

    ids, dev, dt = ray.get(Probe.remote().where.remote())
    assert ids == []  # the worker branch ran: Ray granted no GPU
    assert dev == "cpu" and dt == "torch.float32"
    assert devices._ray_gpu_ids() is None  # the driver is not a worker
