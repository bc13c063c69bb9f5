"""mmoe: one Mixture-of-Experts routing core for vision, language and multimodal models.

Public API (stable): `MoEConfig`, `MoE`, `Routing`, `aux_loss`, `routing_stats`, plus helpers
`mh_moe_config`, `plot_expert_load`, `update_balance_bias`.
"""

from .adaptive import AdaptiveTopK
from .config import MoEConfig
from .layer import LayerStats, MoE, aux_loss, moe_layers, routing_stats, update_balance_bias
from .multihead import mh_moe_config, moe_cost
from .routing import ROUTERS, Routing
from .stats import expert_load_matrix, plot_expert_load

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoE",
    "Routing",
    "LayerStats",
    "aux_loss",
    "routing_stats",
    "update_balance_bias",
    "moe_layers",
    "mh_moe_config",
    "moe_cost",
    "plot_expert_load",
    "expert_load_matrix",
    "ROUTERS",
    "AdaptiveTopK",
]
