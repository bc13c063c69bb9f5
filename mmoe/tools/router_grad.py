"""How close a dense-backprop estimator's router gradient is to the exact dense one, by micro-batch size.

The expert-group approximation (methods.md §1.9) stands in for an expert a token did not use with the mean
output of that expert over the micro-batch's rows routed to it (grouped by their top experts): the fewer
tokens a micro-batch holds, the fewer rows each table entry averages, and the emptier the table. Default
MoE's reviewers asked how the estimator behaves as the micro-batch shrinks; training runs answer through
the final loss, after many confounded steps. This measures the estimator directly, at one point of
training: the router parameters' gradient of a global batch, accumulated over micro-batches of ``m``
examples as training with gradient accumulation would compute it, against the exact dense router gradient
of the same batch and split (``dense_backprop="dense_oracle"``: every expert on every row, sparse forward
value). The oracle's gradient does not depend on the split of the same rows (each row's term is its own),
which the tests check.

Only the task loss is differentiated (no balance or z-loss: their gradient does not depend on the
estimator). Model-agnostic: any module with `mmoe.MoE` layers and a ``loss_fn(model, examples) -> (loss
sum, count)`` over a list of examples; ``language.cli``'s ``mmoe router-grad`` wires it to a language-model
run.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["router_gradient", "router_grad_fidelity", "ESTIMATORS"]

ESTIMATORS = ("none", "expert_group", "dense_oracle")

LossFn = Callable[[nn.Module, list], "tuple[Tensor, float]"]


@contextlib.contextmanager
def _estimator(model: nn.Module, mode: str):
    """Every MoE layer of ``model`` with ``dense_backprop=mode`` inside the block (restored after)."""
    from ..layer import moe_layers

    layers = [m for _, m in moe_layers(model)]
    saved = [m.cfg for m in layers]
    try:
        for m in layers:
            m.cfg = m.cfg.replace(dense_backprop=mode)
        yield layers
    finally:
        for m, c in zip(layers, saved):
            m.cfg = c


def _router_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    from ..layer import moe_layers

    return {name: [p for p in m.routers.parameters() if p.requires_grad] for name, m in moe_layers(model)}


def router_gradient(model: nn.Module, examples: list, loss_fn: LossFn, *, estimator: str,
                    micro_batch: int) -> dict[str, Tensor]:
    """The router parameters' gradient (flattened, per MoE layer) of the mean loss over ``examples``,
    accumulated over micro-batches of ``micro_batch`` examples (each weighted by its share of the count),
    with every MoE layer's ``dense_backprop`` set to ``estimator``. The model's gradients are cleared
    before and after; its training mode is left as it is."""
    from ..layer import clear_aux

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    params = _router_params(model)
    if not params:
        raise ValueError("the model has no mmoe.MoE layer")
    chunks = [examples[i:i + micro_batch] for i in range(0, len(examples), micro_batch)]
    model.zero_grad(set_to_none=True)
    total = 0.0
    with _estimator(model, estimator):
        for chunk in chunks:  # the gradient of the summed loss; divided by the total count below
            loss_sum, count = loss_fn(model, chunk)
            loss_sum.backward()
            total += float(count)
            clear_aux(model)
    out = {}
    for name, ps in params.items():
        out[name] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                               for p in ps]) / max(total, 1.0)
    model.zero_grad(set_to_none=True)
    return out


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def _rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float("nan")


def router_grad_fidelity(model: nn.Module, batches: Sequence[list], loss_fn: LossFn, *,
                         estimators: Sequence[str] = ("none", "expert_group"),
                         micro_batches: Sequence[int] = (16, 4, 1)) -> list[dict]:
    """For every estimator and micro-batch size: the cosine similarity and the relative error
    ``|g - g*| / |g*|`` of the accumulated router gradient ``g`` against the dense oracle's ``g*`` of the
    same global batch split the same way, over all MoE layers' router parameters together (``cos``,
    ``rel_err``) and per layer (``layers``), each a mean over ``batches`` (with the smallest cosine seen,
    ``cos_min``). The oracle's gradient is the same for every split of the same rows; it is taken per split
    all the same, because ``loss_fn`` may lay out a micro-batch's examples differently from the whole
    batch's (a language model packs each micro-batch's documents into its own rows).

    ``batches``: global batches, each a list of examples that ``loss_fn`` takes in any subset."""
    rows = []
    oracles: dict[tuple[int, int], dict[str, Tensor]] = {}
    for est in estimators:
        for m in micro_batches:
            cos, err, layer_cos = [], [], {}
            for i, b in enumerate(batches):
                if (i, m) not in oracles:
                    oracles[i, m] = router_gradient(model, b, loss_fn, estimator="dense_oracle", micro_batch=m)
                ref = oracles[i, m]
                g = router_gradient(model, b, loss_fn, estimator=est, micro_batch=m)
                g_all, ref_all = torch.cat(list(g.values())), torch.cat(list(ref.values()))
                cos.append(_cos(g_all, ref_all))
                err.append(_rel_err(g_all, ref_all))
                for name in g:
                    layer_cos.setdefault(name, []).append(_cos(g[name], ref[name]))
            rows.append({"estimator": est, "micro_batch": int(m), "cos": sum(cos) / len(cos), "cos_min": min(cos),
                         "rel_err": sum(err) / len(err),
                         "layers": {n: sum(v) / len(v) for n, v in layer_cos.items()}})
    return rows
