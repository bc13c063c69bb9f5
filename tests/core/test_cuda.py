"""The CUDA path of the layer against the CPU one (marker ``gpu``: skipped on machines without CUDA, which
includes CI; run with ``pytest -m gpu`` where a GPU exists)."""

from __future__ import annotations

import copy

import pytest
import torch

import mmoe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]


@pytest.mark.parametrize("grouped_mm", ["auto", "loop"])
@pytest.mark.parametrize("options", [dict(), dict(heads=2), dict(capacity_factor=1.25), dict(dense_backprop="default")])
def test_cuda_layer_matches_cpu(grouped_mm, options):
    cfg = mmoe.MoEConfig(dim=64, num_experts=8, top_k=2, expert_hidden=96, grouped_mm=grouped_mm, **options)
    cpu = mmoe.MoE(cfg)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 33, 64)
    xg = x.cuda().requires_grad_()
    x.requires_grad_()
    y, yg = cpu(x), gpu(xg)
    (y.pow(2).mean() + mmoe.aux_loss(cpu)).backward()
    (yg.pow(2).mean() + mmoe.aux_loss(gpu)).backward()
    torch.testing.assert_close(yg.cpu(), y, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, atol=2e-4, rtol=2e-4)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=2e-4, rtol=2e-4, msg=name)


def test_cuda_bf16_autocast_close_to_fp32():
    cfg = mmoe.MoEConfig(dim=64, num_experts=8, top_k=2, expert_hidden=96)
    moe = mmoe.MoE(cfg).cuda()
    x = torch.randn(256, 64, device="cuda")
    ref = moe(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
