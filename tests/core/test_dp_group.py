"""Data-parallel semantics on two CPU ranks (gloo): Default-MoE vectors stay identical across ranks and
equal the single-process global-batch EMA; the balance loss uses the global expert load; the
aux-loss-free bias sees the global load."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmoe
from mmoe import losses

pytestmark = pytest.mark.distributed

CFG = dict(dim=8, num_experts=4, top_k=2, dense_backprop="default", default_beta=0.5, balance_bias_rate=0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, weighted: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        moe = mmoe.MoE(mmoe.MoEConfig(**CFG, default_weighted=weighted), dp_group=dist.group.WORLD).train()
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(16, 8, generator=gen) for _ in range(3)]
        moe.record_routing = True
        for x in xs:
            moe(x.chunk(world)[rank])
            mmoe.update_balance_bias(moe)
        bal = losses.switch_balance_loss(moe.last_routing, dist.group.WORLD)
        torch.save({"vectors": moe.default.vectors, "bias": moe.balance_bias, "balance": bal.detach(),
                    "probs": moe.last_routing.probs.detach(), "indices": moe.last_routing.indices},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weighted", [False, True])
def test_default_vectors_and_balance_are_global(tmp_path, weighted):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), weighted), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(world))
    assert torch.equal(r0["vectors"], r1["vectors"]), "EMA buffers drifted apart across ranks"
    assert torch.equal(r0["bias"], r1["bias"])

    # one process, the global batches
    torch.manual_seed(0)
    single = mmoe.MoE(mmoe.MoEConfig(**CFG, default_weighted=weighted)).train()
    gen = torch.Generator().manual_seed(1)
    for x in [torch.randn(16, 8, generator=gen) for _ in range(3)]:
        single(x)
        mmoe.update_balance_bias(single)
    torch.testing.assert_close(r0["vectors"], single.default.vectors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["bias"], single.balance_bias)

    # balance loss: global assignment fractions, local mean probabilities
    E = CFG["num_experts"]
    counts = sum(torch.bincount(r["indices"].reshape(-1), minlength=E).float() for r in (r0, r1))
    f = counts / counts.sum()
    for r in (r0, r1):
        want = E * (f * r["probs"].mean(0)).sum()
        torch.testing.assert_close(r["balance"], want)
