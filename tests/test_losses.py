"""InfoNCE: a loop reference, and a 2-process gloo DDP run whose loss and gradients equal the
single-process loss and gradients on the same global batch (the cross-worker label-offset bug class)."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from mgh_ray.losses import LossConfig, info_nce, text_keys

B, K, D_IN, D = 4, 2, 6, 5  # per-worker batch, hard negatives per query, input and embedding dims
WORLD = 2


def _global_batch():
    g = torch.Generator().manual_seed(0)
    xq, xp = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)
    xn = torch.randn(WORLD * B, K, D_IN, generator=g)
    p_keys = torch.arange(WORLD * B) * 10
    n_keys = torch.arange(WORLD * B * K).view(WORLD * B, K) * 10 + 5
    # worker 0's first hard negative is worker 1's last positive: a false negative for that query
    xn[0, 0] = xp[-1]
    n_keys[0, 0] = p_keys[-1]
    return xq, xp, xn, p_keys, n_keys


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D)


def _embed(model, x):
    return F.normalize(model(x), dim=-1)


def _loss(model, xq, xp, xn, p_keys, n_keys, t=0.05):
    return info_nce(_embed(model, xq), _embed(model, xp), _embed(model, xn), temperature=t,
                    p_keys=p_keys, n_keys=n_keys)


def test_matches_a_loop_reference():
    xq, xp, xn, pk, nk = _global_batch()
    m = _model()
    with torch.no_grad():
        q, p, n = _embed(m, xq), _embed(m, xp), _embed(m, xn)
    cands = [(p[j], pk[j].item()) for j in range(len(p))] + \
            [(n[j, k], nk[j, k].item()) for j in range(len(p)) for k in range(K)]
    total = 0.0
    for i in range(len(q)):
        terms = [math.exp(float(q[i] @ c) / 0.05) for j, (c, key) in enumerate(cands)
                 if j == i or key != pk[i].item()]
        total += -math.log(math.exp(float(q[i] @ p[i]) / 0.05) / sum(terms))
    got = info_nce(q, p, n, temperature=0.05, p_keys=pk, n_keys=nk)
    assert got.item() == pytest.approx(total / len(q), rel=1e-5)
    # the false negative was really masked (t = 1 so one term is visible in the mean)
    assert info_nce(q, p, n, temperature=1.0).item() > info_nce(q, p, n, temperature=1.0, p_keys=pk,
                                                                n_keys=nk).item() + 1e-3


def test_temperature_and_in_batch_negatives_matter():
    xq, xp, xn, _, _ = _global_batch()
    m = _model()
    q, p = _embed(m, xq), _embed(m, xp)
    assert info_nce(q, p, None, temperature=1.0).item() == pytest.approx(
        F.cross_entropy(q @ p.T, torch.arange(len(q))).item(), rel=1e-6)
    assert LossConfig().temperature == 0.05


def _worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        xq, xp, xn, pk, nk = _global_batch()
        part = slice(rank * B, (rank + 1) * B)
        model = DDP(_model())

        # DDP must see one forward; embed the three groups in one call and split
        x = torch.cat([xq[part], xp[part], xn[part].reshape(B * K, D_IN)])
        e = F.normalize(model(x), dim=-1)
        q, p, n = e[:B], e[B:2 * B], e[2 * B:].view(B, K, D)
        loss = info_nce(q, p, n, temperature=0.05, p_keys=pk[part], n_keys=nk[part])
        loss.backward()  # DDP averages the gradients over the workers
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grads = {k: v.grad.clone() for k, v in model.module.named_parameters()}
        out[rank] = (mean_loss.item() / WORLD, grads)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_workers_equal_one_process_on_the_global_batch():
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
        results = dict(out)
    model = _model()
    xq, xp, xn, pk, nk = _global_batch()
    loss = _loss(model, xq, xp, xn, pk, nk)
    loss.backward()
    for rank in range(WORLD):
        dist_loss, grads = results[rank]
        assert dist_loss == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_text_keys_are_stable_and_distinct():
    a = text_keys(["x", "y", "x"])
    assert a[0] == a[2] and a[0] != a[1]
    assert a.tolist() == text_keys(["x", "y", "x"]).tolist()
