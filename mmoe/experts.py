"""Experts with stacked parameters: ``w1 [E, D, H]``, ``w2 [E, H, D]`` (+ ``w3`` for SwiGLU).

Three compute paths over rows already sorted by expert:
- ``grouped``: ``torch._grouped_mm`` (one call per matrix for all experts; CUDA bf16 on sm90+);
- ``padded``: rows padded to the largest expert count, one ``bmm`` per matrix;
- ``loop``: one GEMM per non-empty expert over contiguous row blocks, written in place by a custom
  autograd function (`_ExpertMLP`), forward and backward; the CPU default.
`expert_forward(i, h)` is the plain per-expert reference used by tests and users.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        # CUDA grouped GEMM needs bf16 on sm90+ in current torch; fp32 falls back to the loop
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "cpu"


# CPU, mode "auto": one padded batched GEMM when (experts x largest count) <= PAD_LIMIT x rows (equal
# counts, e.g. the dense oracle's every-expert pass, or nearly so), else the per-expert GEMMs of the loop.
# Measured on 2 cores at 8192 tokens, d=512, h=1024 (fwd+bwd, ratio to the dense FFN): padding of 3.5% /
# 8% / 22% (E = 8 / 32 / 128) made the batched GEMM 1.11x / 1.12x / 1.37x against the loop's 1.05x /
# 1.09x / 1.34x; torch's CPU grouped GEMM is itself a loop of GEMMs, through autograd.
PAD_LIMIT = 1.02


class _ExpertBias(torch.autograd.Function):
    """``y + b[expert of row]`` for rows sorted by expert; the bias gradient is a per-expert row sum
    (``index_add`` over the rows' expert ids: 11x faster on CPU than ``segment_reduce``)."""

    @staticmethod
    def forward(ctx, y: Tensor, b: Tensor, counts: Tensor) -> Tensor:
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=y.device), counts, output_size=y.shape[0])
        ctx.save_for_backward(rows)
        ctx.num_experts = counts.numel()
        return y + b.to(y.dtype).index_select(0, rows)

    @staticmethod
    def backward(ctx, g: Tensor):
        (rows,) = ctx.saved_tensors
        gb = torch.zeros(ctx.num_experts, g.shape[-1], dtype=torch.float32, device=g.device)
        gb.index_add_(0, rows, g.float())
        return g, gb, None


class Experts(nn.Module):
    """E independent MLPs ``D -> H -> D`` (GELU) or SwiGLU ``(silu(x W1) * x W3) W2``."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "gelu", bias: bool = True,
                 mode: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.expert_offset = 0  # global id of local expert 0 (non-zero when sharded by expert parallelism)
        self.activation, self.mode = activation, mode
        # torch's grouped GEMM needs 16-byte aligned row strides (fp32: multiples of 4, bf16: of 8)
        self.grouped_shapes_ok = dim % 8 == 0 and hidden % 8 == 0
        if mode == "grouped" and not self.grouped_shapes_ok:
            raise ValueError(f"MoEConfig.grouped_mm='grouped' needs expert dim ({dim}) and expert_hidden ({hidden}) "
                             "to be multiples of 8; use 'auto' or 'loop'")
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if activation == "swiglu" else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias and activation == "swiglu" else None
        self.reset_parameters()
        for p in self.parameters():
            p.expert = True  # marks expert-parallel parameters (not all-reduced across the expert group)

    def reset_parameters(self) -> None:
        # same distribution as nn.Linear (kaiming uniform, a=sqrt(5)) applied per expert
        for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden), (self.w3, self.dim)):
            if w is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)

    # ---------------------------------------------------------------- reference path
    def expert_forward(self, i: int, h: Tensor) -> Tensor:
        """Expert ``i`` (global id) applied to rows ``h [n, D]``."""
        j = i - self.expert_offset
        if not 0 <= j < self.num_experts:
            raise ValueError(f"expert {i} is not held by this rank (local experts "
                             f"{self.expert_offset}..{self.expert_offset + self.num_experts - 1})")
        i = j

        def lin(x, w, b):
            y = x @ w[i].to(x.dtype)
            return y + b[i].to(y.dtype) if b is not None else y

        return self._mlp(h, lin)

    def _mlp(self, x: Tensor, lin) -> Tensor:
        """``lin(x, w1, b1) -> activation (SwiGLU with w3/b3) -> lin(., w2, b2)`` for any ``lin``."""
        a = lin(x, self.w1, self.b1)
        a = F.silu(a) * lin(x, self.w3, self.b3) if self.activation == "swiglu" else F.gelu(a)
        return lin(a, self.w2, self.b2)

    # ---------------------------------------------------------------- batched paths
    def forward(self, x: Tensor, counts: Tensor, counts_list: list[int] | None = None) -> Tensor:
        """Rows ``x [S, D]`` sorted by expert, ``counts [E]`` rows per expert -> ``[S, D]``."""
        mode = self.mode
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if mode == "auto" and x.device.type == "cpu" and x.shape[0] > 0:
            # CPU (see PAD_LIMIT): counts are needed on the host for either path
            if counts_list is None:
                counts_list = counts.tolist()
            widest = max(counts_list)
            if widest * len(counts_list) <= PAD_LIMIT * x.shape[0]:
                return self._padded(x, counts, widest)
            return self._loop(x, counts_list, dtype)
        if mode == "auto":
            mode = "grouped" if self.grouped_shapes_ok and _grouped_mm_ok(x.device, dtype) else "loop"
        if mode == "padded":
            return self._padded(x, counts, int(counts.max()) if counts.numel() else 0)
        if mode == "grouped":
            return self._grouped(x, counts, dtype)
        if counts_list is None:
            counts_list = counts.tolist()
        return self._loop(x, counts_list, dtype)

    def _padded(self, x: Tensor, counts: Tensor, width: int) -> Tensor:
        """Rows scattered into ``[E, width, D]`` (zeros elsewhere), two ``bmm``, rows gathered back.
        Padded rows never reach the output, so they get no gradient and add none to the weights."""
        E, S = counts.numel(), x.shape[0]
        if S == 0 or width == 0:
            return x.new_zeros(0, self.dim)
        ar = torch.arange(E, device=x.device)
        row_expert = torch.repeat_interleave(ar, counts, output_size=S)
        starts = torch.cumsum(counts, 0) - counts
        slot = row_expert * width + (torch.arange(S, device=x.device) - starts[row_expert])
        xp = x.new_zeros(E * width, x.shape[1]).index_copy(0, slot, x).view(E, width, -1)

        def lin(inp, w, b):
            y = torch.bmm(inp, w.to(inp.dtype))
            return y + b.to(y.dtype).unsqueeze(1) if b is not None else y

        return self._mlp(xp, lin).reshape(E * width, -1).index_select(0, slot)

    def _grouped(self, x: Tensor, counts: Tensor, dt: torch.dtype) -> Tensor:
        x = x.to(dt)
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def lin(inp, w, b):
            with torch.autocast(x.device.type, enabled=False):
                y = torch._grouped_mm(inp.contiguous(), w.to(dt), offs)
            return _ExpertBias.apply(y, b, counts) if b is not None else y

        return self._mlp(x, lin)

    def _loop(self, x: Tensor, counts_list: list[int], dt: torch.dtype) -> Tensor:
        return _ExpertMLP.apply(x.to(dt), counts_list, self.activation == "swiglu",
                                self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)


class _ExpertMLP(torch.autograd.Function):
    """The experts' MLPs over rows sorted by expert, one GEMM per non-empty expert and matrix, each written
    straight into its block of a preallocated output (``out=``), forward and backward.

    Compared with autograd over per-expert slices this does no padding, no concatenation of the outputs,
    no stacking of per-expert weight gradients (a full copy of every expert weight per backward) and no
    gradient for experts that got no rows beyond zero-filling their slice. Math in the input's dtype
    (the autocast dtype under autocast), weight gradients returned in the parameters' dtype, bias
    gradients summed in fp32. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], swiglu: bool, w1: Tensor, b1: Tensor | None, w2: Tensor,
                b2: Tensor | None, w3: Tensor | None, b3: Tensor | None) -> Tensor:
        dt = x.dtype
        blocks, start = [], 0
        for e, n in enumerate(counts):
            if n:
                blocks.append((e, start, start + n))
            start += n
        with torch.autocast(x.device.type, enabled=False):
            W1, W2 = w1.to(dt), w2.to(dt)
            W3 = w3.to(dt) if swiglu else None
            a1 = _per_expert_linear(x, W1, b1, blocks)
            a3 = _per_expert_linear(x, W3, b3, blocks) if swiglu else None
            h = F.silu(a1) * a3 if swiglu else F.gelu(a1)
            y = _per_expert_linear(h, W2, b2, blocks)
        ctx.blocks, ctx.swiglu = blocks, swiglu
        ctx.has_bias = (b1 is not None, b2 is not None, b3 is not None)
        ctx.save_for_backward(x, a1, a3, h, w1, w2, w3)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, a1, a3, h, w1, w2, w3 = ctx.saved_tensors
        blocks, swiglu, need = ctx.blocks, ctx.swiglu, ctx.needs_input_grad
        dt = x.dtype
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(dt).contiguous()
            gh = _per_expert_linear(gy, w2.to(dt), None, blocks, transpose=True)
            gw2 = _per_expert_wgrad(h, gy, w2, blocks) if need[5] else None
            gb2 = _per_expert_sum(gy, blocks, w2.shape[0]) if ctx.has_bias[1] and need[6] else None
            if swiglu:
                ga3 = gh * F.silu(a1)
                ga1 = torch.ops.aten.silu_backward(gh * a3, a1)
            else:
                ga1, ga3 = torch.ops.aten.gelu_backward(gh, a1), None
            del gh
            gw1 = _per_expert_wgrad(x, ga1, w1, blocks) if need[3] else None
            gb1 = _per_expert_sum(ga1, blocks, w1.shape[0]) if ctx.has_bias[0] and need[4] else None
            gw3 = _per_expert_wgrad(x, ga3, w3, blocks) if swiglu and need[7] else None
            gb3 = _per_expert_sum(ga3, blocks, w1.shape[0]) if swiglu and ctx.has_bias[2] and need[8] else None
            gx = None
            if need[0]:
                gx = _per_expert_linear(ga1, w1.to(dt), None, blocks, transpose=True)
                if swiglu:
                    W3 = w3.to(dt)
                    for e, s, t in blocks:
                        gx[s:t].addmm_(ga3[s:t], W3[e].t())
        return gx, None, None, gw1, gb1, gw2, gb2, gw3, gb3


def _per_expert_linear(x: Tensor, w: Tensor, b: Tensor | None, blocks: list[tuple[int, int, int]],
                       transpose: bool = False) -> Tensor:
    """``out[s:t] = x[s:t] @ w[e] (+ b[e])`` for every block (``w[e].T`` with ``transpose``)."""
    out = x.new_empty(x.shape[0], w.shape[1] if transpose else w.shape[2])
    for e, s, t in blocks:
        we = w[e].t() if transpose else w[e]
        if b is not None:
            torch.addmm(b[e].to(x.dtype), x[s:t], we, out=out[s:t])
        else:
            torch.mm(x[s:t], we, out=out[s:t])
    return out


def _per_expert_wgrad(inp: Tensor, g: Tensor, w: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
    """``grad[e] = inp[s:t].T @ g[s:t]``; experts without rows get zeros."""
    out = torch.empty(w.shape, dtype=inp.dtype, device=inp.device)
    for e, s, t in blocks:
        torch.mm(inp[s:t].t(), g[s:t], out=out[e])
    if len(blocks) < w.shape[0]:
        empty = torch.ones(w.shape[0], dtype=torch.bool)
        empty[[e for e, _, _ in blocks]] = False
        out[empty.to(out.device)] = 0
    return out.to(w.dtype)


def _per_expert_sum(g: Tensor, blocks: list[tuple[int, int, int]], num_experts: int) -> Tensor:
    """Per-expert row sums of ``g`` in fp32 (bias gradients)."""
    out = torch.zeros(num_experts, g.shape[1], dtype=torch.float32, device=g.device)
    for e, s, t in blocks:
        out[e] = g[s:t].sum(0, dtype=torch.float32)
    return out


class MLP(nn.Module):
    """A dense MLP (the shared experts): GELU or SwiGLU."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc3 = nn.Linear(dim, hidden, bias=bias) if activation == "swiglu" else None
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc1(x)
        a = F.silu(a) * self.fc3(x) if self.fc3 is not None else F.gelu(a)
        return self.fc2(a)
