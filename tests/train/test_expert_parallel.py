"""Expert parallelism on two CPU ranks (gloo), without DeepSpeed: the sharded layer gives the outputs and
gradients of one process holding every expert and the global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmoe
from mmoe.train.sharding import shard_experts

pytestmark = pytest.mark.distributed

VARIANTS = {
    "softmax": dict(),
    "swiglu_bias_heads": dict(activation="swiglu", heads=2, expert_bias=True),
    "default": dict(dense_backprop="default", default_beta=0.5),
    "expert_group": dict(dense_backprop="expert_group"),
    "xmoe_k1": dict(router="xmoe", top_k=1),
    # skewed routing: some experts (and so some ranks) get no rows at all
    "skewed": dict(top_k=1, balance_bias_rate=1e-3, _skew=True),
    # Soft MoE: sequences of 4 tokens, 2 slots per expert (fixed loads: every expert gets B * 2 slot rows)
    "soft": dict(router="soft", soft_slots=2, _seq=4),
}


def _shaped(x, opts):
    return x.reshape(-1, opts["_seq"], x.shape[-1]) if opts.get("_seq") else x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(opts):
    opts = {k: v for k, v in opts.items() if not k.startswith("_")}
    base = dict(dim=16, num_experts=4, top_k=2, expert_hidden=24, aux_loss_weight=0.01)
    base.update(opts)
    return mmoe.MoEConfig(**base)


def _model(opts):
    torch.manual_seed(0)
    m = mmoe.MoE(_cfg(opts))
    if opts.get("_skew"):
        with torch.no_grad():  # selection bias: every token picks expert 0 or 1, both held by rank 0
            m.balance_bias[0] = torch.tensor([50.0, 50.0, -50.0, -50.0])
    return m


def _data(world):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(8 * world, 16, generator=gen) for _ in range(2)]


def _loss(model, x):
    y = model(x)
    return (y ** 2).mean() + mmoe.aux_loss(model)


def _worker(rank, world, port, out_dir, name):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        opts = VARIANTS[name]
        m = _model(opts).train()
        m.dp_group = dist.group.WORLD
        shard_experts(m, dist.group.WORLD)
        outs = []
        for x in _data(world):
            m.zero_grad()
            xl = _shaped(x, opts).chunk(world)[rank]
            y = m(xl)
            loss = (y ** 2).mean() + mmoe.aux_loss(m)
            loss.backward()
            for n, p in m.named_parameters():
                if getattr(p, "allreduce", True):
                    dist.all_reduce(p.grad)
                p.grad /= world
            outs.append({"y": y.detach(), "grads": {n: p.grad.clone() for n, p in m.named_parameters()}})
        torch.save({"outs": outs, "offset": m.experts.expert_offset}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_expert_parallel_matches_single_process(tmp_path, name):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), name), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(world)]

    full = _model(VARIANTS[name]).train()
    for step, x in enumerate(_data(world)):
        full.zero_grad()
        # with dp_group set, the mean of the ranks' local losses is the global-batch loss (the balance
        # loss uses the global load, the EMA / expert-group tables the global sums)
        y = full(_shaped(x, VARIANTS[name]))
        ((y ** 2).mean() + mmoe.aux_loss(full)).backward()
        ys = y.detach().chunk(world)
        for r in range(world):
            got = ranks[r]["outs"][step]
            torch.testing.assert_close(got["y"], ys[r], rtol=1e-5, atol=1e-6)
            off = ranks[r]["offset"]
            for n, p in full.named_parameters():
                want = p.grad
                if n.startswith("experts."):
                    want = want[off: off + 2]
                torch.testing.assert_close(got["grads"][n], want, rtol=1e-4, atol=1e-6, msg=f"step {step} {n}")
