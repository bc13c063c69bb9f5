"""Experts with stacked parameters: ``w1 [E, D, H]``, ``w2 [E, H, D]`` (+ ``w3`` for SwiGLU).

Two compute paths over rows already sorted by expert:
- ``grouped``: ``torch._grouped_mm`` (one call per matrix for all experts);
- ``loop``: one matmul per non-empty expert over contiguous row blocks.
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


# padded batched GEMM when (experts x largest count) <= PAD_LIMIT x rows, i.e. at most 25% padding
PAD_LIMIT = 1.25


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
            # CPU: one batched GEMM over experts padded to the largest count beats a grouped GEMM (a loop of
            # per-expert GEMMs in torch) when padding adds little; counts are on the host anyway
            if counts_list is None:
                counts_list = counts.tolist()
            widest = max(counts_list)
            if widest * len(counts_list) <= PAD_LIMIT * x.shape[0]:
                return self._padded(x, counts, widest)
        if mode == "auto":
            mode = "grouped" if self.grouped_shapes_ok and _grouped_mm_ok(x.device, dtype) else "loop"
        if mode == "padded":
            return self._padded(x, counts, int(counts.max()) if counts.numel() else 0)
        if mode == "grouped":
            return self._grouped(x, counts, dtype)
        if counts_list is None:
            counts_list = counts.tolist()
        return self._loop(x, counts_list)

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

    def _loop(self, x: Tensor, counts_list: list[int]) -> Tensor:
        out = []
        w1, w2 = self.w1.unbind(0), self.w2.unbind(0)
        w3 = self.w3.unbind(0) if self.w3 is not None else None
        b1 = self.b1.unbind(0) if self.b1 is not None else None
        b2 = self.b2.unbind(0) if self.b2 is not None else None
        b3 = self.b3.unbind(0) if self.b3 is not None else None
        for i, xs in enumerate(x.split(counts_list)):
            if xs.shape[0] == 0:
                continue
            a = F.linear(xs, w1[i].t(), b1[i] if b1 is not None else None)
            if w3 is not None:
                a = F.silu(a) * F.linear(xs, w3[i].t(), b3[i] if b3 is not None else None)
            else:
                a = F.gelu(a)
            out.append(F.linear(a, w2[i].t(), b2[i] if b2 is not None else None))
        if not out:
            return x.new_zeros(0, self.dim)
        return torch.cat(out, 0)


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
