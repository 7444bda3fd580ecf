"""Tiny random MoE models, checkpoints written by llm-compressor (or our writer), and the
reference model whose weights are the checkpoint dequantized by compressed-tensors' own code."""
from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import torch

from inductor_w4a8 import formats
from tiny_models import greedy, logits_metrics, tiny_moe_model  # noqa: F401  (re-exported)
from tiny_models import prompts as _prompts
import torch.nn.functional as F

# every K a multiple of 128: llm-compressor's W4AFP8 preset quantizes in groups of 128
COMMON = dict(vocab_size=160, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")
ROUTER_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*shared_expert_gate$"]


SIZES = {
    "qwen3_moe": dict(head_dim=32, moe_intermediate_size=128, intermediate_size=128, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(moe_intermediate_size=128, intermediate_size=128, shared_expert_intermediate_size=128,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=128, n_routed_experts=4,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        n_shared_experts=1, kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32, routed_scaling_factor=2.5),
    "glm4_moe": dict(head_dim=32, intermediate_size=128, moe_intermediate_size=128, n_routed_experts=4,
                     num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=2.5),
}


def tiny_model(kind: str, seed: int = 0):
    return tiny_moe_model(kind, COMMON, SIZES, seed)


def llm_compressor_checkpoint(model, path: Path, fmt: str, quantize_attention: bool) -> Path:
    """oneshot(W4AFP8, targets='Linear') + save_pretrained(save_compressed=True), as a user would."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    model = copy.deepcopy(model)
    src = Path(tempfile.mkdtemp())
    # oneshot and save_pretrained read the source model's own files (a copy saves them: saving
    # rewrites the saved model's config.dtype as a string)
    copy.deepcopy(model).save_pretrained(src)
    model.config._name_or_path = model.name_or_path = str(src)
    ignore = list(ROUTER_IGNORE) + ([] if quantize_attention else ["re:.*self_attn.*"])
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4AFP8", ignore=ignore))
    model.save_pretrained(path, save_compressed=True, quantization_format=fmt)
    return Path(path)


def dequantized_reference(path: Path, dtype=torch.float32):
    """The transformers model of the checkpoint's config whose weights are the checkpoint's,
    dequantized (q * scale) by compressed-tensors' own compressors, in `dtype`."""
    import transformers
    from safetensors.torch import load_file

    from inductor_w4a8.quant_config import module_matches
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    weights = {}
    quantized = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}
    for module in quantized:
        group = next(g for g in qc["config_groups"].values()
                     if module_matches(module, g.get("targets") or ()))
        fmt = group.get("format") or qc["format"]
        local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == module}
        weights[module] = _decompress(local, fmt, group)
    fields = ("weight", "weight_packed", "weight_scale", "weight_shape")
    state = {k: v for k, v in tensors.items()
             if k.rsplit(".", 1)[0] not in quantized or k.rsplit(".", 1)[1] not in fields}
    state.update({f"{m}.weight": w for m, w in weights.items()})
    state = _fuse_experts({re.sub(r"\.block_sparse_moe\.", ".mlp.", k): v for k, v in state.items()})
    config = transformers.AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if missing:
        model.tie_weights()
    return model


def _decompress(local: dict, fmt: str, group: dict) -> torch.Tensor:
    """One module's dequantized weight (q * scale): by compressed-tensors' own compressors where
    it is installed (CI), else by formats' unpacking (the GPU machine has no compressed-tensors)."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationScheme
    except ImportError:
        G = group["weights"]["group_size"]
        q = (formats.unpack_int4(local["weight_packed"], biased=True) if fmt == "pack-quantized"
             else local["weight"].to(torch.int8))
        # compressed-tensors multiplies in the scale's dtype: the exact q * s, rounded to it once
        return formats.dequantize_w4(q, local["weight_scale"], G).to(local["weight_scale"].dtype)
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                input_activations=group.get("input_activations"))
    return BaseCompressor.load_from_registry(fmt).decompress(local, scheme)["weight"]


def _fuse_experts(state: dict) -> dict:
    """Per-expert {gate,up,down}_proj.weight -> transformers 5.x experts.gate_up_proj / down_proj."""
    per = re.compile(r"^(?P<layer>.+)\.experts\.(?P<e>\d+)\.(?P<p>gate_proj|up_proj|down_proj)\.weight$")
    found: dict = {}
    out = {}
    for k, v in state.items():
        if m := per.match(k):
            found.setdefault(m["layer"], {}).setdefault(m["p"], {})[int(m["e"])] = v
        else:
            out[k] = v
    for layer, parts in found.items():
        E = len(parts["gate_proj"])
        out[f"{layer}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(E)])
        out[f"{layer}.experts.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(E)])
    return out


def prompts(n=4, length=16, seed=1):
    return _prompts(n, length, seed, vocab=COMMON["vocab_size"])
