"""A weight EMA that any task can keep (`vision`'s classification task does; ``task_options.ema_decay``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """Exponential moving average of every floating-point tensor of a model's state (parameters and
    buffers), kept beside the model and swapped in for evaluation.

    Written here rather than using timm's ``ModelEmaV3`` because that keeps a deep copy of the module;
    under expert parallelism the module holds process groups and only this rank's experts, and swapping
    tensors keeps one model that the engine already knows how to run.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        self._backup: dict[str, Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        state = model.state_dict()
        self._backup = {k: state[k].detach().clone() for k in self.shadow}
        for k, v in self.shadow.items():
            state[k].copy_(v)

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> None:
        if self._backup is None:
            return
        state = model.state_dict()
        for k, v in self._backup.items():
            state[k].copy_(v)
        self._backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            if k in self.shadow:
                self.shadow[k].copy_(v)
