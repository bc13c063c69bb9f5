"""Multimodal task family on the mmoe core (DESIGN.md): a BEiT-3-style multiway transformer with MoE
FFNs, masked image / text / image-text modelling and retrieval evaluation.

Nothing is implemented here yet.
"""
