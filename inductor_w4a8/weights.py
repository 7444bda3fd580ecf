"""compressed-tensors W4A8 checkpoints: read them into W4A8MoE layers, and write them.

A checkpoint is a directory holding `config.json` and `.safetensors` files (one file, or shards
with `model.safetensors.index.json`). `config.json["quantization_config"]` is compressed-tensors'
schema; W4A8 means, for the config group that covers the experts:

    "format": "pack-quantized"            (top level, or the group's own "format")
    "weights":           {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                          "group_size": 32 | 64 | 128, "actorder": null | "weight" | "static"}
    "input_activations": {"num_bits": 8, "type": "float", "dynamic": true, "strategy": "token",
                          "symmetric": true}

Anything else (other bits, asymmetric weights, channel/tensor strategies, static or per-tensor
activations, int8 activations, activation ordering by group) is refused with a message that says
what was found. Expert tensors are read in three spellings:

    per expert, as llm-compressor writes them:
        {layer}.experts.{e}.{gate_proj|up_proj|down_proj}.{weight_packed|weight_scale|weight_shape}
        (Mixtral's w1 | w3 | w2 are read as gate | up | down)
    stacked per projection:  {layer}.experts.{gate_proj|up_proj|down_proj|gate_up_proj}.weight_packed ...
    stacked as W4A8MoE / vLLM FusedMoE parameters: {layer}.experts.{w13|w2}_weight_{packed|scale}

and stacked into one W4A8MoE per layer (w13 = cat(gate, up) along N), which is then
post-processed. An intermediate size that is not a multiple of the group size (the last group of
w2 is partial) is padded with zero channels to whole groups, as tensor parallel does per rank
(inductor_w4a8.tp); `tp_rank` / `tp_size` load one rank's shard. `{layer}.gate.e_score_correction_bias` goes to the layer (sigmoid routing); every
other tensor (router weights, norms, shared experts, ...) is returned as is.

The writer (`save_w4a8_checkpoint`) produces the same format from bf16 weights through
`formats.quantize_w4`, so tests and examples make their own files.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from . import formats
from .tp import intermediate_shard, shard_expert_weights

__all__ = ["W4A8QuantConfig", "W4A8CheckpointError", "W4A8Checkpoint", "parse_quantization_config",
           "quantization_config_dict", "moe_routing_from_config", "build_w4a8_moe",
           "load_w4a8_checkpoint", "save_w4a8_checkpoint", "CONFIG_NAME", "INDEX_NAME"]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"


class W4A8CheckpointError(ValueError):
    """A checkpoint that is not W4A8 compressed-tensors, or whose tensors do not fit together."""


# ================================================================================================
# quantization_config
# ================================================================================================
@dataclass(frozen=True)
class W4A8QuantConfig:
    """What the loader needs from a W4A8 `quantization_config`."""
    group_size: int
    group_name: str = "group_0"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


def quantization_config_dict(group_size: int, *, targets: Iterable[str] = ("re:.*experts.*",),
                             ignore: Iterable[str] = ("lm_head",)) -> dict:
    """The compressed-tensors `quantization_config` of a W4A8 (int4 group weights, fp8 dynamic
    per-token activations) pack-quantized checkpoint, as llm-compressor writes it."""
    formats.check_group_size(group_size, group_size, "group_size")
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": int(group_size), "dynamic": False, "actorder": None,
                            "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                      "strategy": "token", "dynamic": True, "group_size": None,
                                      "block_structure": None, "actorder": None, "observer": None,
                                      "observer_kwargs": {}},
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def _module_matches(name: str, patterns: Iterable[str]) -> bool:
    """compressed-tensors' target rule: 're:<regex>' (re.match on the module name), a module class
    name ('Linear' covers every linear layer, experts included), or a name / name suffix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == "Linear" or name == p or name.endswith("." + p):
            return True
    return False


def _w4a8_problems(group: Mapping) -> list[str]:
    """What makes a compressed-tensors config group not W4A8 (empty list: it is W4A8)."""
    rules = {
        "weights": [("num_bits", "4", lambda v: v == 4),
                    ("type", "'int'", lambda v: v == "int"),
                    ("symmetric", "true", lambda v: v is True),
                    ("strategy", "'group'", lambda v: v == "group"),
                    ("group_size", f"one of {formats.SUPPORTED_GROUP_SIZES}",
                     lambda v: v in formats.SUPPORTED_GROUP_SIZES),
                    ("dynamic", "false", lambda v: v in (None, False)),
                    ("actorder", "null, 'weight' or 'static' (no g_idx)",
                     lambda v: v in (None, False, "weight", "static"))],
        "input_activations": [("num_bits", "8", lambda v: v == 8),
                              ("type", "'float'", lambda v: v == "float"),
                              ("dynamic", "true", lambda v: v is True),
                              ("strategy", "'token'", lambda v: v == "token"),
                              ("symmetric", "true", lambda v: v in (None, True))],
    }
    found = []
    for section, checks in rules.items():
        args = group.get(section)
        if not isinstance(args, Mapping):
            found.append(f"{section}={args!r} (need " + ("4-bit int group weights" if section == "weights"
                         else "8-bit float dynamic per-token activations") + ")")
            continue
        for key, expected, ok in checks:
            if not ok(args.get(key)):
                found.append(f"{section}.{key}={args.get(key)!r} (need {expected})")
    return found


def parse_quantization_config(config: Mapping, module_names: Iterable[str] | None = None) -> W4A8QuantConfig:
    """config.json (or its `quantization_config`) -> W4A8QuantConfig, or W4A8CheckpointError.

    With `module_names` (the expert linear modules of the checkpoint), only the config groups that
    target them are checked; without, every group must be W4A8.
    """
    qc = config.get("quantization_config", config.get("compression_config")) \
        if "config_groups" not in config else config
    if not isinstance(qc, Mapping):
        raise W4A8CheckpointError("config.json has no quantization_config: this is not a "
                                  "compressed-tensors checkpoint (need a W4A8 pack-quantized one)")
    method = qc.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise W4A8CheckpointError(f"quantization_config.quant_method={method!r}; need "
                                  f"'compressed-tensors' (W4A8 pack-quantized)")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise W4A8CheckpointError(f"quantization_config has no config_groups (found keys "
                                  f"{sorted(qc)}); need a W4A8 group")
    status = qc.get("quantization_status")
    if status not in (None, "compressed"):
        raise W4A8CheckpointError(f"quantization_config.quantization_status={status!r}; the weights "
                                  f"must be stored compressed (status 'compressed')")
    ignore = tuple(qc.get("ignore") or ())
    names = list(module_names) if module_names is not None else None
    if names is not None:
        names = [n for n in names if not _module_matches(n, ignore)]
        if not names:
            raise W4A8CheckpointError("every expert module is in quantization_config.ignore: the "
                                      "experts are not quantized")
    chosen = []
    for gname, group in groups.items():
        targets = tuple(group.get("targets") or ())
        if names is not None and not any(_module_matches(n, targets) for n in names):
            continue
        problems = _w4a8_problems(group)
        fmt = group.get("format") or qc.get("format")
        if fmt != "pack-quantized":
            problems.append(f"format={fmt!r} (need 'pack-quantized')")
        if problems:
            raise W4A8CheckpointError(f"quantization_config group {gname!r} is not W4A8 (int4 "
                                      f"symmetric group weights, fp8 dynamic per-token activations, "
                                      f"pack-quantized): found " + "; ".join(problems))
        chosen.append((gname, group, targets))
    if not chosen:
        raise W4A8CheckpointError(f"no quantization_config group targets the experts "
                                  f"(groups: {sorted(groups)}; e.g. {names[:1]})")
    sizes = {g["weights"]["group_size"] for _, g, _ in chosen}
    if len(sizes) > 1:
        raise W4A8CheckpointError(f"the expert config groups disagree on group_size: {sorted(sizes)}")
    gname, group, targets = chosen[0]
    return W4A8QuantConfig(group_size=int(group["weights"]["group_size"]), group_name=gname,
                           targets=targets, ignore=ignore)


def moe_routing_from_config(config: Mapping) -> dict:
    """HF config.json -> W4A8MoE routing arguments (top_k, scoring, renormalize, n_group, ...)."""
    cfg = config.get("text_config", config) if isinstance(config.get("text_config"), Mapping) else config
    model_type = cfg.get("model_type", config.get("model_type", ""))
    top_k = cfg.get("num_experts_per_tok", cfg.get("moe_top_k", cfg.get("top_k")))
    if top_k is None:
        raise W4A8CheckpointError("config.json has no num_experts_per_tok: cannot tell the MoE top-k")
    sigmoid_types = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "kimi_k2", "dots1")
    scoring = cfg.get("scoring_func") or ("sigmoid" if model_type in sigmoid_types else "softmax")
    # transformers' defaults where the config is silent: Mixtral always renormalizes, Qwen-MoE not
    renorm_default = model_type in ("mixtral",) + sigmoid_types
    n_group = cfg.get("n_group") or None
    topk_group = cfg.get("topk_group") or None
    if n_group is not None and n_group <= 1:
        n_group = topk_group = None
    return {"top_k": int(top_k), "scoring": scoring,
            "renormalize": bool(cfg.get("norm_topk_prob", renorm_default)),
            "n_group": n_group, "topk_group": topk_group,
            "routed_scaling_factor": float(cfg.get("routed_scaling_factor") or 1.0)}


# ================================================================================================
# Reading
# ================================================================================================
_PROJ = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
         "gate_up_proj": "gate_up"}
_FIELDS = ("weight_packed", "weight_scale", "weight_shape")
_REFUSED_FIELDS = {"weight_zero_point": "asymmetric weights (weight_zero_point)",
                   "weight_g_idx": "activation ordering by group (weight_g_idx)"}
_PROJ_RE = "|".join(_PROJ)
_FIELD_RE = "|".join(_FIELDS + tuple(_REFUSED_FIELDS))
PER_EXPERT_KEY = re.compile(rf"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>{_PROJ_RE})\.(?P<field>{_FIELD_RE})$")
STACKED_KEY = re.compile(rf"^(?P<layer>.+)\.experts\.(?P<proj>{_PROJ_RE})\.(?P<field>{_FIELD_RE})$")
MODULE_KEY = re.compile(r"^(?P<layer>.+)\.experts\.(?P<name>w13_weight_packed|w13_weight_scale|"
                        r"w2_weight_packed|w2_weight_scale)$")
BIAS_SUFFIXES = (".gate.e_score_correction_bias", ".e_score_correction_bias")


@dataclass
class W4A8Checkpoint:
    """What `load_w4a8_checkpoint` returns."""
    config: dict
    quant: W4A8QuantConfig
    moe_layers: dict                      # layer prefix (e.g. "model.layers.3.mlp") -> W4A8MoE
    tensors: dict = field(default_factory=dict)   # every other tensor, by its checkpoint name


class _Files:
    """key -> safetensors file, read lazily through safe_open."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self._safe_open = safe_open
        index = path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: path / f for k, f in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise W4A8CheckpointError(f"{path} holds no .safetensors file")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
        self._open = {}

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        if f not in self._open:
            self._open[f] = self._safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(key)

    def close(self):
        for h in self._open.values():
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
        self._open.clear()


def _classify(keys: Iterable[str]):
    """Expert keys grouped by layer: layer -> {"per_expert": {(e, part, field): key}, "stacked":
    {(part, field): key}, "module": {name: key}}; plus the list of other keys."""
    layers = defaultdict(lambda: {"per_expert": {}, "stacked": {}, "module": {}})
    other = []
    for k in keys:
        if m := PER_EXPERT_KEY.match(k):
            layers[m["layer"]]["per_expert"][(int(m["expert"]), _PROJ[m["proj"]], m["field"])] = k
        elif m := STACKED_KEY.match(k):
            layers[m["layer"]]["stacked"][(_PROJ[m["proj"]], m["field"])] = k
        elif m := MODULE_KEY.match(k):
            layers[m["layer"]]["module"][m["name"]] = k
        else:
            other.append(k)
    return layers, other


def _refuse_fields(layer: str, keys: Iterable[str]) -> None:
    for k in keys:
        for f, what in _REFUSED_FIELDS.items():
            if k.endswith("." + f):
                raise W4A8CheckpointError(f"{k}: the checkpoint holds {what}; W4A8 needs symmetric "
                                          f"int4 weights without g_idx")


def _check_part(name: str, packed: torch.Tensor, scale: torch.Tensor, shape, G: int):
    """Validate one projection (per expert [N, K//8] or stacked [E, N, K//8]); returns (N, K)."""
    if packed.dtype != torch.int32:
        raise W4A8CheckpointError(f"{name}.weight_packed has dtype {packed.dtype}; pack-quantized "
                                  f"int4 weights are int32 words")
    N, words = packed.shape[-2:]
    K = int(shape[-1]) if shape is not None else words * formats.NIBBLES_PER_WORD
    if shape is not None and (int(shape[-2]) != N or math.ceil(K / formats.NIBBLES_PER_WORD) != words):
        raise W4A8CheckpointError(f"{name}: weight_shape {[int(s) for s in shape]} does not match "
                                  f"weight_packed {tuple(packed.shape)} (8 int4 per int32 word)")
    groups = math.ceil(K / G)
    if tuple(scale.shape) != tuple(packed.shape[:-1]) + (groups,):
        raise W4A8CheckpointError(f"{name}.weight_scale has shape {tuple(scale.shape)}; with K={K} and "
                                  f"group_size={G} it must be {tuple(packed.shape[:-1]) + (groups,)}")
    if not scale.is_floating_point():
        raise W4A8CheckpointError(f"{name}.weight_scale has dtype {scale.dtype}; need bf16")
    return N, K


def _stack_layer(layer: str, entry: dict, files: _Files, G: int):
    """-> (gate_packed, gate_scale, up_packed, up_scale, down_packed, down_scale, I, H), stacked [E, ...]."""
    per, stacked, module = entry["per_expert"], entry["stacked"], entry["module"]
    _refuse_fields(layer, list(per.values()) + list(stacked.values()))
    if sum(bool(x) for x in (per, stacked, module)) > 1:
        raise W4A8CheckpointError(f"{layer}: expert tensors are stored both per expert and stacked; "
                                  f"keep one spelling")
    if module:
        need = ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale")
        missing = [n for n in need if n not in module]
        if missing:
            raise W4A8CheckpointError(f"{layer}.experts is missing {missing}")
        w13p, w13s = files.get(module["w13_weight_packed"]), files.get(module["w13_weight_scale"])
        w2p, w2s = files.get(module["w2_weight_packed"]), files.get(module["w2_weight_scale"])
        N13, H = _check_part(f"{layer}.experts.w13", w13p, w13s, None, G)
        H2, I = _check_part(f"{layer}.experts.w2", w2p, w2s, None, G)
        if N13 % 2 or N13 // 2 != I or H2 != H:
            raise W4A8CheckpointError(f"{layer}.experts: w13 {tuple(w13p.shape)} and w2 {tuple(w2p.shape)} "
                                      f"do not fit [E, 2I, H/8] / [E, H, I/8]")
        return w13p[:, :I], w13s[:, :I], w13p[:, I:], w13s[:, I:], w2p, w2s, I, H

    if stacked:
        parts = {}
        for part in {p for p, _ in stacked}:
            if (part, "weight_packed") not in stacked or (part, "weight_scale") not in stacked:
                raise W4A8CheckpointError(f"{layer}.experts.{part}: need weight_packed and weight_scale")
            p, s = files.get(stacked[(part, "weight_packed")]), files.get(stacked[(part, "weight_scale")])
            shape = files.get(stacked[(part, "weight_shape")]) if (part, "weight_shape") in stacked else None
            if p.dim() != 3:
                raise W4A8CheckpointError(f"{layer}.experts.{part}.weight_packed must be stacked "
                                          f"[E, N, K/8], got {tuple(p.shape)}")
            parts[part] = (p, s, _check_part(f"{layer}.experts.{part}", p, s, shape, G))
        if "gate_up" in parts:
            (p, s, (N, H)) = parts.pop("gate_up")
            parts["gate"] = (p[:, :N // 2], s[:, :N // 2], (N // 2, H))
            parts["up"] = (p[:, N // 2:], s[:, N // 2:], (N // 2, H))
        missing = [p for p in ("gate", "up", "down") if p not in parts]
        if missing:
            raise W4A8CheckpointError(f"{layer}.experts: missing the {missing} projection(s)")
        (gp, gs, (I, H)), (up, us, (I3, H3)), (dp, ds, (H2, I2)) = parts["gate"], parts["up"], parts["down"]
        if (I3, H3) != (I, H) or (H2, I2) != (H, I):
            raise W4A8CheckpointError(f"{layer}.experts: gate [{I}, {H}], up [{I3}, {H3}] and down "
                                      f"[{H2}, {I2}] do not fit together")
        return gp, gs, up, us, dp, ds, I, H

    experts = sorted({e for e, _, _ in per})
    E = len(experts)
    if experts != list(range(E)):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise W4A8CheckpointError(f"{layer}.experts: experts {missing} are missing (found {E} of "
                                  f"{max(experts) + 1})")
    out = {}
    for part in ("gate", "up", "down"):
        packed, scales, dims = [], [], None
        for e in experts:
            base = f"{layer}.experts.{e}.{part}"
            if (e, part, "weight_packed") not in per or (e, part, "weight_scale") not in per:
                raise W4A8CheckpointError(f"{base}: need weight_packed and weight_scale "
                                          f"(found {sorted(f for ee, pp, f in per if ee == e and pp == part)})")
            p, s = files.get(per[(e, part, "weight_packed")]), files.get(per[(e, part, "weight_scale")])
            shape = files.get(per[(e, part, "weight_shape")]) if (e, part, "weight_shape") in per else None
            d = _check_part(base, p, s, shape, G)
            if dims is not None and d != dims:
                raise W4A8CheckpointError(f"{base} has shape {list(d)} but expert 0 has {list(dims)}")
            dims = d
            packed.append(p)
            scales.append(s)
        out[part] = (torch.stack(packed), torch.stack(scales), dims)
    (gp, gs, (I, H)), (up, us, (I3, H3)), (dp, ds, (H2, I2)) = out["gate"], out["up"], out["down"]
    if (I3, H3) != (I, H) or (H2, I2) != (H, I):
        raise W4A8CheckpointError(f"{layer}.experts: gate [{I}, {H}], up [{I3}, {H3}] and down "
                                  f"[{H2}, {I2}] do not fit together")
    return gp, gs, up, us, dp, ds, I, H


def _moe_class():
    from .moe import W4A8MoE
    return W4A8MoE


def build_w4a8_moe(w13_packed, w13_scale, w2_packed, w2_scale, *, group_size: int, routing: Mapping,
                   e_score_correction_bias: torch.Tensor | None = None, scale_mode: str | None = None,
                   device=None, tp_rank: int = 0, tp_size: int = 1, process: bool = True):
    """Checkpoint-form stacked expert weights (uint4b8 packed, bf16 scales; I = w2's K may be any
    size: it is padded to whole groups) -> this rank's W4A8MoE, post-processed unless process=False.

    routing: W4A8MoE's routing arguments (top_k, scoring, renormalize, n_group, topk_group,
    routed_scaling_factor). The layer's `tp_shard` records which channels it holds.
    """
    from .tp import process_on_side_stream
    E, N13, _ = w13_packed.shape
    I = N13 // 2
    H = w2_packed.shape[1]
    if H % group_size:
        raise W4A8CheckpointError(f"hidden size {H} is not a multiple of group_size={group_size}")
    spec = intermediate_shard(I, group_size, tp_rank, tp_size)
    w13p, w13s, w2p, w2s = shard_expert_weights(w13_packed, w13_scale.to(torch.bfloat16), w2_packed,
                                                w2_scale.to(torch.bfloat16), spec)
    device = torch.device(device) if device is not None else w13_packed.device
    kwargs = dict(num_experts=E, hidden_size=H, intermediate_size=spec.local_size, group_size=group_size,
                  device=device, **routing)
    if scale_mode is not None:
        kwargs["scale_mode"] = scale_mode
    moe = _moe_class()(**kwargs)
    state = {"w13_weight_packed": w13p, "w13_weight_scale": w13s, "w2_weight_packed": w2p,
             "w2_weight_scale": w2s}
    if e_score_correction_bias is not None:
        state["e_score_correction_bias"] = e_score_correction_bias.float()
    elif getattr(moe, "e_score_correction_bias", None) is not None:
        state["e_score_correction_bias"] = torch.zeros(E)     # sigmoid routing without a bias
    missing, unexpected = moe.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise W4A8CheckpointError(f"W4A8MoE did not take the checkpoint tensors: missing {missing}, "
                                  f"unexpected {unexpected}")
    moe.tp_shard = spec
    if process:
        process_on_side_stream(moe)
    return moe


def load_w4a8_checkpoint(path, *, device=None, scale_mode: str | None = None, process: bool = True,
                         tp_rank: int = 0, tp_size: int = 1, routing: Mapping | None = None,
                         load_other: bool = True) -> W4A8Checkpoint:
    """Read a compressed-tensors W4A8 checkpoint directory into W4A8MoE layers.

    device: where the layers live (default CPU). scale_mode: "exact" | "fp8" (default: the
    package default). process: run process_weights_after_loading() on each layer (on a stream
    of its own on CUDA). tp_rank / tp_size: load only this rank's shard (see inductor_w4a8.tp).
    routing: overrides of the routing arguments read from config.json (top_k, scoring, ...).
    Scales stored in another float dtype are converted to bf16.
    """
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise W4A8CheckpointError(f"{path} has no {CONFIG_NAME}")
    config = json.loads(cfg_file.read_text())
    files = _Files(path)
    try:
        layers, other = _classify(files.keys())
        if not layers:
            raise W4A8CheckpointError(f"{path}: no expert tensors found (expected keys like "
                                      f"'model.layers.0.mlp.experts.0.gate_proj.weight_packed')")
        quant = parse_quantization_config(config, [f"{layer}.experts.0.gate_proj" for layer in layers])
        route = {**moe_routing_from_config(config), **dict(routing or {})}
        device = torch.device(device) if device is not None else torch.device("cpu")
        consumed, moe_layers = set(), {}
        for layer in sorted(layers, key=_natural_key):
            gp, gs, up, us, dp, ds, I, H = _stack_layer(layer, layers[layer], files, quant.group_size)
            bias = None
            if route["scoring"] == "sigmoid":
                found = [layer + sfx for sfx in BIAS_SUFFIXES if layer + sfx in files.where]
                if found:
                    bias = files.get(found[0])
                    consumed.add(found[0])
            moe_layers[layer] = build_w4a8_moe(
                torch.cat([gp, up], dim=1), torch.cat([gs, us], dim=1), dp, ds,
                group_size=quant.group_size, routing=route, e_score_correction_bias=bias,
                scale_mode=scale_mode, device=device, tp_rank=tp_rank, tp_size=tp_size, process=process)
        tensors = {k: files.get(k).to(device) for k in other if k not in consumed} if load_other else {}
    finally:
        files.close()
    return W4A8Checkpoint(config=config, quant=quant, moe_layers=moe_layers, tensors=tensors)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ================================================================================================
# Writing
# ================================================================================================
def _expert_tensors(layer: str, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, G: int,
                    layout: str) -> dict:
    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"layout={layout!r}: use 'per_expert' (llm-compressor's keys) or 'stacked'")
    q = _moe_class().from_float(w1, w3, w2, top_k=1, group_size=G)      # formats.quantize_w4
    w13p, w13s = q.w13_weight_packed.detach(), q.w13_weight_scale.detach()
    w2p, w2s = q.w2_weight_packed.detach(), q.w2_weight_scale.detach()
    if layout == "stacked":
        return {f"{layer}.experts.w13_weight_packed": w13p, f"{layer}.experts.w13_weight_scale": w13s,
                f"{layer}.experts.w2_weight_packed": w2p, f"{layer}.experts.w2_weight_scale": w2s}
    E, I, H = w1.shape
    parts = {"gate_proj": (w13p[:, :I], w13s[:, :I], (I, H)), "up_proj": (w13p[:, I:], w13s[:, I:], (I, H)),
             "down_proj": (w2p, w2s, (H, I))}
    out = {}
    for name, (packed, scale, shape) in parts.items():
        for e in range(E):
            base = f"{layer}.experts.{e}.{name}"
            out[f"{base}.weight_packed"] = packed[e].contiguous()
            out[f"{base}.weight_scale"] = scale[e].contiguous()
            out[f"{base}.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    return out


def save_w4a8_checkpoint(path, experts: Mapping[str, tuple], *, group_size: int = 128,
                         config: Mapping | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                         layout: str = "per_expert", max_shard_bytes: int | None = None) -> Path:
    """Write a compressed-tensors W4A8 checkpoint.

    experts: layer prefix (e.g. "model.layers.0.mlp") -> (w1 gate [E, I, H], w3 up [E, I, H],
    w2 down [E, H, I]) bf16 expert weights, quantized here with `formats.quantize_w4`.
    config: the model's config.json content (routing: num_experts_per_tok, norm_topk_prob, ...);
    `quantization_config` is added. tensors: other tensors stored as they are (router weights,
    e_score_correction_bias, norms, ...). layout: "per_expert" writes llm-compressor's keys,
    "stacked" the W4A8MoE / FusedMoE parameter names. max_shard_bytes: split into shards with an
    index file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    state = {}
    for layer, (w1, w3, w2) in experts.items():
        state.update(_expert_tensors(layer, w1, w3, w2, group_size, layout))
    for k, v in (tensors or {}).items():
        if k in state:
            raise ValueError(f"tensor {k!r} collides with an expert tensor")
        state[k] = v
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    cfg = dict(config or {})
    cfg["quantization_config"] = quantization_config_dict(group_size)
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(state, str(path / SINGLE_FILE_NAME), metadata=meta)
        return path
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": weight_map}, indent=2) + "\n")
    return path
