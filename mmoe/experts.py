"""Experts with stacked parameters: ``w1 [E, D, H]``, ``w2 [E, H, D]`` (+ ``w3`` for SwiGLU).

Three compute paths over rows already sorted by expert:
- ``grouped``: ``torch._grouped_mm`` (one call per matrix for all experts; CUDA bf16 on sm90+);
- ``padded``: rows padded to the largest expert count, one ``bmm`` per matrix;
- ``loop``: one GEMM per non-empty expert over contiguous row blocks, written in place by a custom
  autograd function (`_ExpertMLP`), forward and backward; the CPU default.
`expert_forward(i, h)` is the plain per-expert reference used by tests and users.

Weight gradients of the ``loop`` path on CPU are written into persistent buffers (`GradBuffers`) instead of
a fresh tensor per backward: in a plain training loop (``zero_grad()`` sets ``.grad`` to None) a fresh
expert gradient is a new large allocation that glibc maps fresh from the kernel, which zero-fills its pages
on first touch, every step (the cost `mmoe.train.perf.tune_cpu_allocator` also removes, process-wide). The
buffer is handed to autograd as a new tensor over the same storage, so ``p.grad`` is set as usual (hooks,
DDP and DeepSpeed see an ordinary gradient), and a buffer is reused only when no tensor anywhere still uses
its storage (``p.grad``, a pending gradient of a second call, a view or ``.data`` alias): otherwise a
second buffer, or a fresh tensor, is used. So ``p.grad`` of the last backward stays valid until the next
backward after it is released; clone it to keep it longer. The price is that the buffers stay allocated
between steps (one copy of the expert weight gradients, which a training step holds at its peak anyway).
``Experts.reuse_grad_buffers``: None (default) = on for CPU tensors, off on CUDA (whose caching allocator
already reuses memory); True / False force it; `mmoe.set_grad_buffers(model, ...)` sets every layer's and
frees the buffers.

The same holder keeps the loop path's pre-activations saved for backward between calls
(`GradBuffers.workspace`), and a process-wide one (`SHARED_WORKSPACES`) the tensors that live only inside one
layer's backward (the combine's slot gradient), by the same rule (a workspace
is reused only when no tensor uses it, so outputs a caller holds and the saved tensors of a graph not yet
run backward are never overwritten). ``Experts.reuse_act_buffers``: None (default) follows
``reuse_grad_buffers``; True / False force it. Per-chunk temporaries are one scratch per call.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import SlotCombine, combine_slots


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
        self.reuse_grad_buffers: bool | None = None  # None: on CPU (module docstring)
        # loop path: saved pre-activations and backward-only gradients in persistent workspaces; None follows
        # reuse_grad_buffers
        self.reuse_act_buffers: bool | None = None
        # loop path: recompute the activation in backward instead of keeping [rows, hidden] of it
        self.recompute_activation = True
        self._grad_buffers = GradBuffers()

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
    def forward(self, x: Tensor, counts: Tensor, counts_list: list[int] | None = None,
                rows: Tensor | None = None, combine: SlotCombine | None = None) -> Tensor:
        """Rows ``x [S, D]`` sorted by expert, ``counts [E]`` rows per expert -> ``[S, D]``.

        ``rows [S]`` (optional, int64): the sorted rows are ``x[rows]`` of an ``x [T, D]``. The ``loop`` path
        then gathers them chunk by chunk and adds their gradient straight into ``x``'s, so neither the
        gathered rows nor their gradient exists whole; the other paths gather first.

        ``combine`` (optional): return the combined ``[combine.num_rows, D]`` instead (`combine_slots` of the
        slots' outputs). The ``loop`` path fuses it: each chunk's outputs are weighted and added into their
        rows at once, so the slots' outputs never exist whole and are not kept for backward (the routing
        weights' gradient comes from the hidden gradient and the recomputed activation there)."""
        mode = self.mode
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        S = x.shape[0] if rows is None else rows.numel()
        width = None
        if mode == "auto" and x.device.type == "cpu" and S > 0:
            # CPU (see PAD_LIMIT): counts are needed on the host for either path
            if counts_list is None:
                counts_list = counts.tolist()
            width = max(counts_list)
            if width * len(counts_list) > PAD_LIMIT * S:
                return self._loop(x, rows, counts_list, dtype, combine)
            mode = "padded"
        if mode == "auto":
            mode = "grouped" if self.grouped_shapes_ok and _grouped_mm_ok(x.device, dtype) else "loop"
        if mode == "loop":
            return self._loop(x, rows, counts.tolist() if counts_list is None else counts_list, dtype, combine)
        if rows is not None:
            x = x.index_select(0, rows)
        if mode == "padded":
            if width is None:
                width = int(counts.max()) if counts.numel() else 0
            y = self._padded(x, counts, width)
        else:
            y = self._grouped(x, counts, dtype)
        return y if combine is None else combine_slots(y, combine)

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

    def _reuse(self, device: torch.device) -> tuple[bool, bool]:
        """Whether weight gradients and activations go into persistent buffers on ``device``."""
        reuse, act = self.reuse_grad_buffers, self.reuse_act_buffers
        grads = device.type == "cpu" if reuse is None else reuse
        return grads, grads if act is None else act

    def workspace(self, key: str, shape: tuple[int, ...], like: Tensor, shared: bool = False) -> Tensor:
        """A ``shape`` tensor like ``like`` from persistent workspaces when activations are kept in them
        (`GradBuffers.workspace`), else a fresh one: this layer's own, or with ``shared`` the process's
        `SHARED_WORKSPACES` (for tensors that live only inside this layer's backward)."""
        if self._reuse(like.device)[1]:
            return (SHARED_WORKSPACES if shared else self._grad_buffers).workspace(key, shape, like)
        return like.new_empty(shape)

    def _loop(self, x: Tensor, rows: Tensor | None, counts_list: list[int], dt: torch.dtype,
              combine: SlotCombine | None = None) -> Tensor:
        grads, act = self._reuse(x.device)
        c = combine
        return _ExpertMLP.apply(x.to(dt), rows, counts_list, self.activation == "swiglu",
                                self.w1, self.b1, self.w2, self.b2, self.w3, self.b3,
                                self._grad_buffers if grads else None, self.recompute_activation,
                                self._grad_buffers if act else None,
                                None if c is None else c.weight.to(dt), None if c is None else c.token,
                                0 if c is None else c.num_rows,
                                None if c is None or c.scale is None else c.scale.to(dt),
                                None if c is None else c.observe)


def _storage_users(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class GradBuffers:
    """Persistent weight-gradient storage of one `Experts` (module docstring): at most two buffers per weight,
    a buffer reused only when nothing but this holder uses its storage."""

    MAX_PER_WEIGHT = 2

    def __init__(self) -> None:
        self._bufs: dict[str, list[tuple[Tensor, int]]] = {}  # (buffer, storage users when idle)
        self._lock = threading.Lock()  # a workspace is checked idle and handed out in one step

    def __deepcopy__(self, memo) -> "GradBuffers":
        return GradBuffers()  # a copied module (e.g. a weight EMA) starts without buffers

    def __getstate__(self) -> dict:
        return {}  # a pickled module (torch.save(model)) carries no buffers

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def target(self, key: str, w: Tensor) -> Tensor | None:
        """A buffer shaped like ``w`` that nothing else uses now, or None when both are in use."""
        bufs = self._bufs.get(key)
        if bufs and (bufs[0][0].shape != w.shape or bufs[0][0].dtype != w.dtype or bufs[0][0].device != w.device):
            bufs = None
        if bufs is None:
            bufs = self._bufs[key] = []
        for b, idle in bufs:
            if _storage_users(b) == idle:
                return b
        if len(bufs) >= self.MAX_PER_WEIGHT:
            return None
        b = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        bufs.append((b, _storage_users(b)))
        return b

    @staticmethod
    def hand_out(b: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """A new tensor over ``b``'s storage (not a view: autograd takes it as ``.grad`` without a copy),
        shaped like ``b`` or contiguous of ``shape`` (at most ``b.numel()`` elements)."""
        out = torch.empty(0, dtype=b.dtype, device=b.device)
        if shape is None:
            return out.set_(b.untyped_storage(), 0, b.shape, b.stride())
        return out.set_(b.untyped_storage(), 0, shape)  # no stride given: contiguous

    def workspace(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous ``shape`` tensor (``like``'s dtype and device) over a persistent flat buffer that nothing
        else uses now (grown when too small), or a fresh tensor when both buffers of ``key`` are in use. The
        loop path keeps its pre-activations and backward-only gradients here between steps, so a plain loop
        does not map and zero-fill fresh pages for them every call."""
        n = math.prod(shape)
        with self._lock:
            bufs = self._bufs.setdefault(key, [])
            for i, (b, idle) in enumerate(bufs):
                if _storage_users(b) == idle:
                    if b.numel() < n or b.dtype != like.dtype or b.device != like.device:
                        b = torch.empty(n, dtype=like.dtype, device=like.device)  # grown (the old one is freed)
                        bufs[i] = (b, _storage_users(b))
                    return self.hand_out(b, shape)
            if len(bufs) >= self.MAX_PER_WEIGHT:
                return like.new_empty(shape)
            b = torch.empty(n, dtype=like.dtype, device=like.device)
            bufs.append((b, _storage_users(b)))
            return self.hand_out(b, shape)

    def clear(self) -> None:
        self._bufs.clear()


# workspaces of the tensors that live only inside one layer's backward (the slots' gradient of the combine, the
# experts' input gradient): shared by every layer of the process, since backward runs the layers one after
# another; per-layer copies would hold one of each per layer through the next step's peak
SHARED_WORKSPACES = GradBuffers()


class _ExpertMLP(torch.autograd.Function):
    """The experts' MLPs over rows sorted by expert, one GEMM per non-empty expert and matrix, each written
    straight into its block of a preallocated output (``out=``), forward and backward.

    Compared with autograd over per-expert slices this does no padding, no concatenation of the outputs,
    no stacking of per-expert weight gradients (a full copy of every expert weight per backward) and no
    gradient for experts that got no rows beyond zero-filling their slice. Memory: only the pre-activations
    (``x W1``, plus ``x W3`` for SwiGLU) and the input are kept for backward; the activation is recomputed
    there, and all row-wise work of both passes runs over chunks of consecutive experts of at most
    `CHUNK_ELEMENTS` hidden values, so no ``[rows, hidden]`` temporary besides the kept pre-activations is
    ever whole. With ``rows`` (`Experts.forward`) the input is ``x [T, D]`` and each chunk gathers its rows
    and adds its input gradient into ``x``'s gradient (`index_add_`, in slot order: the sum autograd's
    gather backward makes). The chunks' temporaries are one scratch per call, reused by every chunk; with
    ``act_bufs`` the pre-activations come from its workspaces (module docstring); the input gradient is
    always fresh, so autograd can accumulate the input's other gradients into it in place.

    With ``comb_w`` (the fused combine, `Experts.forward`'s ``combine``) the output is ``out [comb_rows, D]``,
    ``out[comb_token_s] += comb_scale_s * comb_w_s * y_s`` chunk by chunk in slot order (bit-identical to
    `mmoe.dispatch.combine_slots` of the slots' outputs ``y``), and ``y`` is neither whole nor kept. Backward
    gathers each chunk's output gradient ``g_s = g[comb_token_s]``, takes ``u_s = g_s W2^T`` (the GEMM the
    hidden gradient needs anyway, before the weight), and gets the routing weight's gradient
    ``<g_s, y_s> = <u_s, h_s> + <g_s, b2>`` from the recomputed activation ``h_s``; the slots' gradient is
    ``comb_w_s g_s`` and the hidden gradient ``comb_w_s u_s`` (``scale`` straight-through, as in the combine).
    Math in the input's dtype (the autocast dtype under autocast), weight gradients returned in the
    parameters' dtype, bias gradients and the routing weights' gradient summed in fp32. Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor | None, counts: list[int], swiglu: bool, w1: Tensor,
                b1: Tensor | None, w2: Tensor, b2: Tensor | None, w3: Tensor | None, b3: Tensor | None,
                bufs: "GradBuffers | None" = None, recompute: bool = True,
                act_bufs: "GradBuffers | None" = None, comb_w: Tensor | None = None,
                comb_token: Tensor | None = None, comb_rows: int = 0,
                comb_scale: Tensor | None = None, comb_observe=None) -> Tensor:
        dt = x.dtype
        blocks, start = [], 0
        for e, n in enumerate(counts):
            if n:
                blocks.append((e, start, start + n))
            start += n
        S, H, Dout = start, w1.shape[2], w2.shape[2]
        fused = comb_w is not None
        with torch.autocast(x.device.type, enabled=False):
            W1, W2 = w1.to(dt), w2.to(dt)
            W3 = w3.to(dt) if swiglu else None
            new = _allocator(act_bufs, x)
            a1 = new("a1", (S, H))
            a3 = new("a3", (S, H)) if swiglu else None
            hs = None if recompute else new("hs", (S, H))
            chunks = list(_chunks(blocks, H))
            rows_max = max((t0 - s0 for s0, t0, _ in chunks), default=0)  # the largest chunk's rows
            if fused:
                out = x.new_zeros(comb_rows, Dout)
                ws = comb_w if comb_scale is None else comb_w * comb_scale
                ys = x.new_empty(rows_max, Dout)  # one chunk's outputs
            else:
                # the output stays a fresh tensor: a workspace would hold it through backward's peak, after the
                # combine is done with it
                out = y = x.new_empty(S, Dout)
            # one scratch per call for the gathered rows and the activation of a chunk, reused by every chunk
            xs = x.new_empty(rows_max, x.shape[1]) if rows is not None else None
            hscratch = x.new_empty(rows_max * H) if recompute else None
            for s0, t0, chunk in chunks:
                n = t0 - s0
                xc = x[s0:t0] if rows is None else torch.index_select(x, 0, rows[s0:t0], out=xs[:n])
                for e, s, t in chunk:
                    r = slice(s - s0, t - s0)
                    _linear(xc[r], W1[e], b1, e, a1[s:t])
                    if swiglu:
                        _linear(xc[r], W3[e], b3, e, a3[s:t])
                hc = hscratch[:n * H].view(n, H) if hs is None else hs[s0:t0]
                h = _activation(a1[s0:t0], a3[s0:t0] if swiglu else None, hc)
                yc = ys[:n] if fused else y[s0:t0]
                for e, s, t in chunk:
                    _linear(h[s - s0:t - s0], W2[e], b2, e, yc[s - s0:t - s0])
                if fused:
                    if comb_observe is not None:
                        comb_observe(s0, t0, yc)  # the chunk's outputs before weighting
                    out.index_add_(0, comb_token[s0:t0], yc.mul_(ws[s0:t0].unsqueeze(-1)))
            del xs, hscratch
        ctx.blocks, ctx.chunks, ctx.rows_max = blocks, chunks, rows_max
        ctx.swiglu, ctx.bufs, ctx.act_bufs, ctx.fused = swiglu, bufs, act_bufs, fused
        ctx.has_bias = (b1 is not None, b2 is not None, b3 is not None)
        ctx.save_for_backward(x, rows, a1, a3, hs, w1, w2, w3, b2 if fused else None, comb_w, comb_token)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: Tensor):
        x, rows, a1, a3, hs, w1, w2, w3, b2, comb_w, comb_token = ctx.saved_tensors
        blocks, swiglu, bufs, fused = ctx.blocks, ctx.swiglu, ctx.bufs, ctx.fused
        need_x, _, _, _, need_w1, need_b1, need_w2, need_b2, need_w3, need_b3 = ctx.needs_input_grad[:10]
        need_cw = fused and ctx.needs_input_grad[13]
        E, dt = w1.shape[0], x.dtype
        with torch.autocast(gout.device.type, enabled=False):
            gout = gout.to(dt).contiguous()
            W1, W2 = w1.to(dt), w2.to(dt)
            W3 = w3.to(dt) if swiglu else None
            gw1 = _wgrad_target(w1, dt, bufs and bufs.target("w1", w1)) if need_w1 else None
            gw2 = _wgrad_target(w2, dt, bufs and bufs.target("w2", w2)) if need_w2 else None
            gw3 = _wgrad_target(w3, dt, bufs and bufs.target("w3", w3)) if swiglu and need_w3 else None
            gb1 = _bias_target(w1, ctx.has_bias[0] and need_b1)
            gb2 = _bias_target(w2, ctx.has_bias[1] and need_b2)
            gb3 = _bias_target(w1, swiglu and ctx.has_bias[2] and need_b3)
            gcw = torch.empty(comb_w.shape, dtype=torch.float32, device=comb_w.device) if need_cw else None
            gx = None
            if need_x:
                # a fresh tensor, not a workspace: autograd then adds the input's other gradients (the router's)
                # into it in place instead of allocating their sum
                gx = torch.zeros_like(x) if rows is not None else torch.empty_like(x)
            H, D, Dout = w1.shape[2], x.shape[1], w2.shape[2]
            chunks, rows_max = ctx.chunks, ctx.rows_max  # as in the forward
            # two [rows, hidden] scratch tensors of one chunk, allocated once per call and reused by every chunk:
            # the hidden gradient (the pre-activations' gradient is written over it in place) and the
            # recomputed activation (for SwiGLU then the gate's gradient); one [rows, D] scratch for the
            # gathered rows and then the rows' input gradient; with the fused combine one [rows, D] for the
            # gathered output gradient, then the slots' gradient
            sgh = x.new_empty(rows_max * H)
            need_h = gw2 is not None or need_cw
            recompute_h = need_h and hs is None
            sh = x.new_empty(rows_max * H) if recompute_h or swiglu else None
            need_xc = gw1 is not None or gw3 is not None
            sx = x.new_empty(rows_max, D) if rows is not None and (need_xc or gx is not None) else None
            sg = x.new_empty(rows_max, Dout) if fused else None
            for s0, t0, chunk in chunks:
                n = t0 - s0
                a1c, a3c = a1[s0:t0], (a3[s0:t0] if swiglu else None)
                gh = sgh[:n * H].view(n, H)
                if fused:
                    gyc = torch.index_select(gout, 0, comb_token[s0:t0], out=sg[:n])  # g_s, weighted below
                    wc = comb_w[s0:t0].unsqueeze(-1)
                else:
                    gyc = gout[s0:t0]
                for e, s, t in chunk:  # u_s = g_s W2^T (fused), else the hidden gradient
                    torch.mm(gyc[s - s0:t - s0], W2[e].t(), out=gh[s - s0:t - s0])
                if need_cw and b2 is not None:
                    for e, s, t in chunk:  # <g_s, b2>
                        torch.mv(gyc[s - s0:t - s0].float(), b2[e].float(), out=gcw[s:t])
                if fused:
                    gyc.mul_(wc)  # the slots' gradient w_s g_s
                if need_h:
                    # the activation, recomputed unless kept
                    h = _activation(a1c, a3c, sh[:n * H].view(n, H)) if recompute_h else hs[s0:t0]
                    if gw2 is not None:
                        for e, s, t in chunk:
                            torch.mm(h[s - s0:t - s0].t(), gyc[s - s0:t - s0], out=gw2[0][e])
                    if need_cw:
                        # <u_s, h_s>, the product over the recomputed activation (done with it)
                        prod = h.mul_(gh) if recompute_h else torch.mul(h, gh)
                        d = prod.sum(-1, dtype=torch.float32)
                        if b2 is not None:
                            gcw[s0:t0] += d
                        else:
                            gcw[s0:t0] = d
                        del prod, d
                    del h
                if fused:
                    gh.mul_(wc)  # the hidden gradient w_s u_s
                ga1 = gh  # the pre-activations' gradient, in place over the hidden gradient (elementwise)
                if swiglu:
                    # the gate's gradient silu(a1) * gh, then the up projection's a3 * gh through silu's backward
                    ga3 = torch.ops.aten.silu.out(a1c, out=sh[:n * H].view(n, H)).mul_(gh)
                    torch.ops.aten.silu_backward.grad_input(gh.mul_(a3c), a1c, grad_input=ga1)
                else:
                    torch.ops.aten.gelu_backward.grad_input(gh, a1c, grad_input=ga1)
                    ga3 = None
                if need_xc:
                    xc = x[s0:t0] if rows is None else torch.index_select(x, 0, rows[s0:t0], out=sx[:n])
                    for e, s, t in chunk:
                        r = slice(s - s0, t - s0)
                        if gw1 is not None:
                            torch.mm(xc[r].t(), ga1[r], out=gw1[0][e])
                        if gw3 is not None:
                            torch.mm(xc[r].t(), ga3[r], out=gw3[0][e])
                    del xc
                for e, s, t in chunk:
                    r = slice(s - s0, t - s0)
                    if gb1 is not None:
                        gb1[e] = ga1[r].sum(0, dtype=torch.float32)
                    if gb2 is not None:
                        gb2[e] = gyc[r].sum(0, dtype=torch.float32)
                    if gb3 is not None:
                        gb3[e] = ga3[r].sum(0, dtype=torch.float32)
                if gx is not None:
                    # the rows' input gradient, over the gathered rows' scratch (done with them above)
                    gxc = gx[s0:t0] if rows is None else sx[:n]
                    for e, s, t in chunk:
                        r = slice(s - s0, t - s0)
                        torch.mm(ga1[r], W1[e].t(), out=gxc[r])
                        if swiglu:
                            gxc[r].addmm_(ga3[r], W3[e].t())
                    if rows is not None:
                        gx.index_add_(0, rows[s0:t0], gxc)
                del gh, ga1, ga3, gyc
            del sgh, sh, sx, sg
            grads = [_wgrad_result(g, w, blocks, E) for g, w in ((gw1, w1), (gw2, w2), (gw3, w3))]
            if gcw is not None:
                gcw = gcw.to(comb_w.dtype)
        return (gx, None, None, None, grads[0], gb1, grads[1], gb2, grads[2], gb3, None, None, None,
                gcw, None, None, None, None)


def _allocator(bufs: "GradBuffers | None", like: Tensor):
    """``new(key, shape)``: a `GradBuffers.workspace` tensor when ``bufs`` is given, else a fresh one."""
    if bufs is None:
        return lambda key, shape: like.new_empty(shape)
    return lambda key, shape: bufs.workspace(key, shape, like)


def _linear(x: Tensor, w: Tensor, b: Tensor | None, e: int, out: Tensor) -> None:
    """``out = x @ w (+ b[e])`` in place."""
    if b is not None:
        torch.addmm(b[e].to(x.dtype), x, w, out=out)
    else:
        torch.mm(x, w, out=out)


# elementwise work of `_ExpertMLP` runs over chunks of consecutive experts of at most this many hidden values
# (4 MiB in fp32); a chunk always holds at least one whole expert
CHUNK_ELEMENTS = 1 << 20


def _chunks(blocks: list[tuple[int, int, int]], hidden: int):
    """``(first row, end row, blocks)`` of consecutive expert blocks with at most `CHUNK_ELEMENTS` hidden
    values each (a single larger expert makes a chunk of its own)."""
    limit = max(CHUNK_ELEMENTS // max(hidden, 1), 1)
    i = 0
    while i < len(blocks):
        j, s0 = i + 1, blocks[i][1]
        while j < len(blocks) and blocks[j][2] - s0 <= limit:
            j += 1
        yield s0, blocks[j - 1][2], blocks[i:j]
        i = j


def _activation(a1: Tensor, a3: Tensor | None, out: Tensor | None = None) -> Tensor:
    """GELU of ``a1``, or SwiGLU's ``silu(a1) * a3``; written into ``out`` when given."""
    if out is None:
        return F.silu(a1) * a3 if a3 is not None else F.gelu(a1)
    if a3 is not None:
        return torch.ops.aten.silu.out(a1, out=out).mul_(a3)
    return torch._C._nn.gelu(a1, out=out)


def _wgrad_target(w: Tensor, dt: torch.dtype, into: Tensor | None) -> tuple[Tensor, bool]:
    """Where a weight gradient is written: the persistent buffer ``into`` (`GradBuffers`) when the math is in
    the weight's dtype, else a fresh tensor in the math dtype; and whether it is the buffer."""
    if into is not None and dt == w.dtype:
        return into, True
    return torch.empty(w.shape, dtype=dt, device=w.device), False


def _wgrad_result(target: tuple[Tensor, bool] | None, w: Tensor | None, blocks: list[tuple[int, int, int]],
                  num_experts: int) -> Tensor | None:
    """The finished weight gradient: zeros for experts without rows; a buffer handed out as a new tensor
    over its storage, a fresh one in the weight's dtype."""
    if target is None or w is None:
        return None
    out, persistent = target
    if len(blocks) < num_experts:
        empty = torch.ones(num_experts, dtype=torch.bool)
        empty[[e for e, _, _ in blocks]] = False
        out[empty.to(out.device)] = 0
    return GradBuffers.hand_out(out) if persistent else out.to(w.dtype)


def _bias_target(w: Tensor, wanted: bool) -> Tensor | None:
    """A bias gradient summed in fp32 (zeros for experts without rows), or None."""
    return torch.zeros(w.shape[0], w.shape[2], dtype=torch.float32, device=w.device) if wanted else None


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
