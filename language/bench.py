"""The language rows of ``mmoe bench model`` (entry point ``mmoe.benchmarks: language``).

Decoding with the KV cache (`language.generate.generate_ids`, greedy, batch 1): a causal MoE LM (MoE in
every second block, 8 SwiGLU experts, top-2) against the dense LM of equal active compute (its FFN as
wide as two experts), random weights and prompt, tokens/s of the new tokens. Two sizes: ``tiny``, the
model of configs/lm_tiny.yaml and lm_debian.yaml (width 128, depth 4, vocabulary 8000), and ``small``
(width 512, depth 8, 8 heads).
"""

from __future__ import annotations

import torch

from mmoe.tools.model_bench import Group, ModelBenchContext, Variant, param_counts

SIZES = {"tiny": dict(dim=128, depth=4, num_heads=4, expert_hidden=176),
         "small": dict(dim=512, depth=8, num_heads=8, expert_hidden=688)}
VOCAB = 8000


def lm_models(size: str) -> dict[str, torch.nn.Module]:
    from .models import LMConfig, MoETransformerLM

    s = SIZES[size]
    common = dict(vocab_size=VOCAB, dim=s["dim"], depth=s["depth"], num_heads=s["num_heads"], ffn="swiglu",
                  max_seq_len=1024)
    moe = MoETransformerLM(LMConfig(**common, moe_layers="every_2",
                                    moe={"num_experts": 8, "top_k": 2, "expert_hidden": s["expert_hidden"]}))
    dense = MoETransformerLM(LMConfig(**common, moe_layers="none", ffn_hidden=2 * s["expert_hidden"]))
    return {"dense": dense, "moe top-2": moe}


def model_groups(ctx: ModelBenchContext) -> list[Group]:
    from .generate import generate_ids

    groups = []
    new_tokens = 16 if ctx.quick else 64
    for size in (["tiny"] if ctx.quick else list(SIZES)):
        torch.manual_seed(ctx.seed)
        prompt = torch.randint(4, VOCAB, (32,)).tolist()
        variants = []
        for name, model in lm_models(size).items():
            model.eval()

            def step(model=model, prompt=prompt) -> int:
                with torch.inference_mode():
                    return len(generate_ids(model, prompt, max_new_tokens=new_tokens, temperature=0.0))

            total, active = param_counts(model)
            variants.append(Variant(name, step, params=total, active_params=active))
        s = SIZES[size]
        groups.append(Group(f"LM decoding with the KV cache, {size}: width {s['dim']}, depth {s['depth']}, "
                            f"prompt 32, {new_tokens} new tokens, batch 1", "tokens/s", variants, key=f"lm_{size}"))
    return groups
