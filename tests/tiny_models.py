"""Tiny random transformers MoE models of each supported family, and how the tests run them.

One builder; each caller passes its own sizes (tests/test_hf.py: small widths; tests/
pretrained_utils.py: every K a multiple of 128 for llm-compressor's preset).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CONFIG_CLASSES = {"qwen3_moe": "Qwen3MoeConfig", "qwen2_moe": "Qwen2MoeConfig", "mixtral": "MixtralConfig",
                  "deepseek_v3": "DeepseekV3Config", "glm4_moe": "Glm4MoeConfig"}


def tiny_moe_model(kind: str, common: dict, sizes: dict, seed: int = 0):
    """A bf16 eval-mode causal LM of family `kind` with `common` and `sizes[kind]` as its config,
    random weights from `seed`, and a non-trivial router correction bias where it has one."""
    import transformers
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(CONFIG_CLASSES)}")
    torch.manual_seed(seed)
    cfg = getattr(transformers, CONFIG_CLASSES[kind])(**common, **sizes[kind])
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for m in model.modules():                 # zeros at init would hide a misused bias
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def prompts(n=4, length=16, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def greedy(model, ids, new_tokens=8):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, ids.shape[1]:]


def logits_metrics(ref, out):
    cos = F.cosine_similarity(ref.float().flatten(), out.float().flatten(), dim=0).item()
    top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    return cos, top1
