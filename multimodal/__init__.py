"""Multimodal task family on the mmoe core (DESIGN.md): a BEiT-3-style multiway transformer with MoE FFNs.

- `multimodal.models`: `MultiwayConfig`, `MultiwayMoETransformer` (per-modality LayerNorms, attention
  projections and dense FFNs; MoE layers with one expert pool shared by image and text tokens, one router
  or a router per modality), heads for masked language / image modelling and image-text contrast;
  `routing_by_modality`.
- `multimodal.data`: `write_shapes` (a generated image-caption data set), BEiT block masking, the caption
  tokenizer (open_clip's BPE plus [MASK]) and caption masking.
- `multimodal.tasks`: the ``masked_multimodal`` training task (``configs/beit3_moe_shapes.yaml``).
"""
