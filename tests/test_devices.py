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
