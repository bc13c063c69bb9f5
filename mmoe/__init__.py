"""mmoe: one Mixture-of-Experts routing core for vision, language and multimodal models.

Public API (stable): `MoEConfig`, `MoE`, `Routing`, `aux_loss`, `routing_stats`, plus helpers `clear_aux`,
`mh_moe_config`, `plot_expert_load`, `update_balance_bias` and the "MoE inside a model" helpers.

The names are loaded on first use (PEP 562), so ``import mmoe.cli`` / ``mmoe --help`` load no torch;
``from mmoe import MoE`` and ``mmoe.MoE`` work as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "MoEConfig": "config",
    "moe_config_from_section": "config",
    "moe_block_indices": "config",
    "MoE": "layer",
    "LayerStats": "layer",
    "aux_loss": "layer",
    "clear_aux": "layer",
    "routing_stats": "layer",
    "no_stats": "layer",
    "update_balance_bias": "layer",
    "moe_layers": "layer",
    "set_grad_buffers": "layer",
    "mh_moe_config": "multihead",
    "moe_cost": "multihead",
    "Routing": "routing",
    "ROUTERS": "routing",
    "plot_expert_load": "stats",
    "expert_load_matrix": "stats",
    "plot_routing_shares": "stats",
    "count_params": "stats",
    "ParamCount": "stats",
    "RoutingCounter": "stats",
    "AdaptiveTopK": "adaptive",
    "MMoEError": "errors",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .adaptive import AdaptiveTopK
    from .config import MoEConfig, moe_block_indices, moe_config_from_section
    from .errors import MMoEError
    from .layer import (LayerStats, MoE, aux_loss, clear_aux, moe_layers, no_stats, routing_stats,
                        set_grad_buffers, update_balance_bias)
    from .multihead import mh_moe_config, moe_cost
    from .routing import ROUTERS, Routing
    from .stats import ParamCount, RoutingCounter, count_params, expert_load_matrix, plot_expert_load, plot_routing_shares


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
