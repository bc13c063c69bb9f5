"""Language task family on the mmoe core (DESIGN.md): multilingual tokenizer, decoder-only and masked
language models with MoE layers, per-language perplexity and generation.

Nothing is implemented here yet.
"""
