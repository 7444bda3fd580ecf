"""`save_w4a8_model`: a bf16 transformers MoE model -> a W4A8 checkpoint laid out as llm-compressor's.

For machines without llm-compressor (the GPU tests, examples): the routed experts of every
sparse-MoE block are quantized with `formats.quantize_w4` and written per expert
(`{block}.experts.{e}.{gate_proj|up_proj|down_proj}.*`); optionally the attention projections too,
in a config group of their own (its own group size). Everything else is written as stored.
`from_pretrained` reads the result like a file llm-compressor wrote.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import formats
from .hf import expert_weights, find_moe_blocks
from .quant_config import quantization_config_dict
from .weights import quantized_module_tensors, write_safetensors

__all__ = ["save_w4a8_model", "ATTENTION_TARGET", "EXPERTS_TARGET"]

EXPERTS_TARGET = r"re:.*\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"
ATTENTION_TARGET = r"re:.*self_attn\.[a-z_]*proj[a-z_]*$"


def _attention_linears(model: nn.Module, group_size: int) -> tuple[dict, list[str]]:
    """(the attention projections quantized in groups of group_size, the names of those whose K is
    not a multiple of it: written bf16 and listed in the config's ignore, so readers know)."""
    from .quant_config import module_matches
    matched = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and module_matches(name, [ATTENTION_TARGET], "")}
    kept = {name: m for name, m in matched.items() if m.in_features % group_size == 0}
    return kept, [name for name in matched if name not in kept]


def save_w4a8_model(model: nn.Module, path, *, group_size: int = 128, format: str = "pack-quantized",
                    attention_group_size: int | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `model` (transformers, bf16) as a compressed-tensors W4A8 checkpoint directory.

    group_size: of the experts' group (group_0). attention_group_size: also quantize the
    attention projections, in group_1 with this group size (None: attention stays bf16).
    format: "pack-quantized" or "int-quantized". Returns the directory.
    """
    from .linear import W4A8Linear
    from .moe import W4A8MoE
    done = next((name for name, m in model.named_modules() if isinstance(m, (W4A8MoE, W4A8Linear))), None)
    if done is not None:
        raise ValueError(f"save_w4a8_model: {done or 'the model'} is already W4A8 (patched or loaded "
                         f"with from_pretrained); pass the bf16 model it came from")
    path = Path(path)
    state = {k: v for k, v in model.state_dict().items()}
    experts_of = {name: block for name, block in find_moe_blocks(model)}
    for name, block in experts_of.items():
        for k in [k for k in state if k.startswith(f"{name}.experts.")]:
            del state[k]
        w1, w3, w2 = (w.to(torch.bfloat16) for w in expert_weights(block.experts))
        for part, w in (("gate_proj", w1), ("up_proj", w3), ("down_proj", w2)):
            packed, scale = formats.quantize_w4(w, group_size)
            for e in range(w.shape[0]):
                state.update(quantized_module_tensors(f"{name}.experts.{e}.{part}", packed[e], scale[e],
                                                      w.shape[-1], format))
    qc = quantization_config_dict(group_size, targets=[EXPERTS_TARGET], ignore=["lm_head"], format=format)
    if attention_group_size is not None:
        linears, left_bf16 = _attention_linears(model, attention_group_size)
        qc["ignore"] = list(qc.get("ignore") or []) + left_bf16
        for name, lin in linears.items():
            del state[f"{name}.weight"]
            packed, scale = formats.quantize_w4(lin.weight.detach().to(torch.bfloat16), attention_group_size)
            state.update(quantized_module_tensors(name, packed, scale, lin.in_features, format))
        attn = quantization_config_dict(attention_group_size, targets=[ATTENTION_TARGET], format=format)
        qc["config_groups"]["group_1"] = attn["config_groups"]["group_0"]
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qc
    return write_safetensors(path, state, config, max_shard_bytes)
