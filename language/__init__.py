"""Language task family on the mmoe core (DESIGN.md): a multilingual SentencePiece tokenizer trained from
text shards with temperature-based language sampling (`language.tokenizer`), document packing and
language mixing (`language.data`), decoder-only and masked MoE language models (`language.models`),
the ``causal_lm`` / ``masked_lm`` tasks of the training engine with per-language perplexity
(`language.tasks`) and generation (`language.generate`, ``mmoe generate``).
"""
