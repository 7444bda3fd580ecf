"""compressed-tensors W4A8 checkpoints: read expert and linear tensors, load MoE layers, write files.

A checkpoint is a directory holding `config.json` and `.safetensors` files
(`inductor_w4a8.checkpoint_files`); `config.json["quantization_config"]` says which modules are
W4A8 and in which format (`inductor_w4a8.quant_config`). Both formats llm-compressor writes for
W4AFP8 are read, per module as its config group says:

    pack-quantized: {module}.weight_packed int32 [N, ceil(K/8)] (8 uint4b8 nibbles per word),
                    {module}.weight_scale [N, ceil(K/G)], {module}.weight_shape int64 [2] = (N, K)
    int-quantized:  {module}.weight int8 [N, K] (one q in [-8, 7] per byte), {module}.weight_scale

Both become the pack-quantized form in memory (int-quantized is packed here, exactly); scales
stored in another float dtype (llm-compressor writes fp32 expert scales) are rounded to bf16, the
dtype the GEMM reads. Expert tensors are read in three spellings:

    per expert, as llm-compressor writes them:
        {layer}.experts.{e}.{gate_proj|up_proj|down_proj}.{field}
        (Mixtral's w1 | w3 | w2 are read as gate | up | down)
    stacked per projection:  {layer}.experts.{gate_proj|up_proj|down_proj|gate_up_proj}.{field} [E, ...]
    stacked as W4A8MoE / vLLM FusedMoE parameters: {layer}.experts.{w13|w2}_weight_{packed|scale}

and stacked into one W4A8MoE per layer (w13 = cat(gate, up) along N) by
`inductor_w4a8.moe_builder`, which also pads an intermediate size that is not a multiple of the
group size and cuts one rank's tensor-parallel shard. `{layer}.gate.e_score_correction_bias` goes
to the layer (sigmoid routing); every other tensor (router weights, norms, shared experts, ...)
is returned as is. Error messages name the keys in the file's own spelling.

The writer (`save_w4a8_checkpoint`) produces the same formats from bf16 weights through
`formats.quantize_w4`, so tests and examples make their own files.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from . import formats
from .checkpoint_files import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME, CheckpointFiles, read_config
from .moe_builder import W4A8CheckpointError, build_w4a8_moe
from .postprocess import check_checkpoint_values
from .quant_config import (SUPPORTED_FORMATS, W4A8QuantConfig, module_scheme, parse_quantization_config,
                           quantization_config_dict, quantization_section)

__all__ = ["W4A8QuantConfig", "W4A8CheckpointError", "W4A8Checkpoint", "parse_quantization_config",
           "quantization_config_dict", "moe_routing_from_config", "build_w4a8_moe", "classify_expert_keys",
           "expert_layer_scheme", "read_expert_layer", "read_linear", "load_w4a8_checkpoint",
           "save_w4a8_checkpoint", "write_safetensors", "quantized_module_tensors", "natural_key",
           "CONFIG_NAME", "INDEX_NAME", "SUPPORTED_FORMATS"]


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
_FIELDS = ("weight_packed", "weight_scale", "weight_shape", "weight")
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


def classify_expert_keys(keys: Iterable[str]):
    """Expert keys grouped by layer: layer -> {"per_expert": {(e, part, field): key}, "stacked":
    {(part, field): key}, "module": {name: key}, "spelling": {part: the file's projection name}};
    plus the list of other keys. part is gate | up | down | gate_up."""
    layers = defaultdict(lambda: {"per_expert": {}, "stacked": {}, "module": {}, "spelling": {}})
    other = []
    for k in keys:
        if m := PER_EXPERT_KEY.match(k):
            entry, part = layers[m["layer"]], _PROJ[m["proj"]]
            entry["per_expert"][(int(m["expert"]), part, m["field"])] = k
            entry["spelling"].setdefault(part, m["proj"])
        elif m := STACKED_KEY.match(k):
            entry, part = layers[m["layer"]], _PROJ[m["proj"]]
            entry["stacked"][(part, m["field"])] = k
            entry["spelling"].setdefault(part, m["proj"])
        elif m := MODULE_KEY.match(k):
            layers[m["layer"]]["module"][m["name"]] = k
        else:
            other.append(k)
    return layers, other


def _refuse_fields(keys: Iterable[str]) -> None:
    for k in keys:
        for f, what in _REFUSED_FIELDS.items():
            if k.endswith("." + f):
                raise W4A8CheckpointError(f"{k}: the checkpoint holds {what}; W4A8 needs symmetric "
                                          f"int4 weights without g_idx")


def _check_part(name: str, packed: torch.Tensor, scale: torch.Tensor, shape, G: int, sep: str = "."):
    """Validate one projection (per expert [N, K//8] or stacked [E, N, K//8]) as read from the
    files, naming its tensors `{name}{sep}weight_packed` / `{name}{sep}weight_scale` (the file's
    spelling); returns (N, K)."""
    packed_name, scale_name = f"{name}{sep}weight_packed", f"{name}{sep}weight_scale"
    if packed.dtype != torch.int32:
        raise W4A8CheckpointError(f"{packed_name} has dtype {packed.dtype}; pack-quantized "
                                  f"int4 weights are int32 words")
    N, words = packed.shape[-2:]
    K = int(shape[-1]) if shape is not None else words * formats.NIBBLES_PER_WORD
    if shape is not None and (int(shape[-2]) != N or math.ceil(K / formats.NIBBLES_PER_WORD) != words):
        raise W4A8CheckpointError(f"{name}: weight_shape {[int(s) for s in shape]} does not match "
                                  f"weight_packed {tuple(packed.shape)} (8 int4 per int32 word)")
    groups = math.ceil(K / G)
    if tuple(scale.shape) != tuple(packed.shape[:-1]) + (groups,):
        raise W4A8CheckpointError(f"{scale_name} has shape {tuple(scale.shape)}; with K={K} and "
                                  f"group_size={G} it must be {tuple(packed.shape[:-1]) + (groups,)}")
    if not scale.is_floating_point():
        raise W4A8CheckpointError(f"{scale_name} has dtype {scale.dtype}; need a float (bf16)")
    if scale.device.type == "cpu":   # read from the file on the host: the check costs no sync
        # corrupt values only: a file's all-zero expert (or layer) is what the file holds, not
        # an unloaded module (post-processing refuses that on the built layer)
        check_checkpoint_values(name, packed, scale, error=W4A8CheckpointError, sep=sep,
                                refuse_unloaded=False)
    return N, K


def _pack_int_quantized(name: str, q: torch.Tensor) -> torch.Tensor:
    """int-quantized int8 q [..., N, K] -> uint4b8 int32 [..., N, ceil(K/8)] (K padded with q = 0)."""
    if q.dtype != torch.int8:
        raise W4A8CheckpointError(f"{name}.weight has dtype {q.dtype}; an int-quantized W4A8 weight "
                                  f"holds int8 values in [-8, 7] (is this module stored unquantized?)")
    lo, hi = (int(q.min()), int(q.max())) if q.numel() else (0, 0)
    if lo < formats.INT4_MIN or hi > formats.INT4_MAX:
        raise W4A8CheckpointError(f"{name}.weight holds values in [{lo}, {hi}]; int4 weights are in "
                                  f"[{formats.INT4_MIN}, {formats.INT4_MAX}]")
    pad = -q.shape[-1] % formats.NIBBLES_PER_WORD
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    return formats.pack_int4(q, biased=True)


def _projection(name: str, key_of: Callable[[str], str | None], files: CheckpointFiles, quant: W4A8QuantConfig):
    """One projection's (uint4b8 packed, scale, (N, K)) from either format; `key_of(field)` gives
    the file's key of a field (or None), `name` the module in the file's spelling."""
    found = [f for f in _FIELDS + tuple(_REFUSED_FIELDS) if key_of(f) is not None]
    _refuse_fields(key_of(f) for f in found)
    if "weight_scale" not in found or not ({"weight_packed", "weight"} & set(found)):
        raise W4A8CheckpointError(f"{name}: need {name}.weight_packed (pack-quantized) or {name}.weight "
                                  f"(int-quantized) with {name}.weight_scale; the file has "
                                  f"{[f'{name}.{f}' for f in found] or 'none of them'}")
    scale = files.get(key_of("weight_scale"))
    if "weight_packed" in found:
        packed = files.get(key_of("weight_packed"))
        shape = files.get(key_of("weight_shape")) if "weight_shape" in found else None
    else:
        q = files.get(key_of("weight"))
        packed = _pack_int_quantized(name, q)
        shape = q.shape
    N, K = _check_part(name, packed, scale, shape, quant.group_size)
    return packed, scale, (N, K)


def expert_module_names(layer: str, entry: dict) -> list[str]:
    """The checkpoint's own names of a layer's expert linear modules (what config groups target)."""
    if entry["module"]:
        return [f"{layer}.experts"]
    sp = entry["spelling"]
    if entry["stacked"]:
        return [f"{layer}.experts.{sp[p]}" for p in sorted(sp)]
    return sorted({f"{layer}.experts.{e}.{sp[p]}" for e, p, _ in entry["per_expert"]})


def expert_layer_scheme(qc: Mapping, layer: str, entry: dict) -> W4A8QuantConfig:
    """The W4A8 scheme every expert module of the layer is read with, or W4A8CheckpointError
    (experts stored unquantized, a non-W4A8 scheme, or modules that disagree)."""
    names = expert_module_names(layer, entry)
    schemes = {n: module_scheme(qc, n) for n in names}
    plain = [n for n, s in schemes.items() if s is None]
    if plain:
        raise W4A8CheckpointError(f"{layer}: expert modules {plain[:3]} are not W4A8 (ignored or targeted "
                                  f"by no quantization_config group); the W4A8 MoE needs every expert "
                                  f"quantized (use patch_moe on a bf16 model instead)")
    sizes = {s.group_size for s in schemes.values()}
    if len(sizes) > 1:
        raise W4A8CheckpointError(f"{layer}: the experts' config groups disagree on group_size: {sorted(sizes)}")
    return schemes[names[0]]


def _fit(layer: str, gate, up, down):
    (gp, gs, (I, H)), (up_, us, (I3, H3)), (dp, ds, (H2, I2)) = gate, up, down
    if (I3, H3) != (I, H) or (H2, I2) != (H, I):
        raise W4A8CheckpointError(f"{layer}.experts: gate [{I}, {H}], up [{I3}, {H3}] and down "
                                  f"[{H2}, {I2}] do not fit together")
    return torch.cat([gp, up_], dim=-2), torch.cat([gs, us], dim=-2), dp, ds


def _read_module_spelling(layer: str, module: dict, files: CheckpointFiles, G: int):
    need = ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale")
    missing = [f"{layer}.experts.{n}" for n in need if n not in module]
    if missing:
        raise W4A8CheckpointError(f"{layer}.experts is missing {missing}")
    w13p, w13s = files.get(module["w13_weight_packed"]), files.get(module["w13_weight_scale"])
    w2p, w2s = files.get(module["w2_weight_packed"]), files.get(module["w2_weight_scale"])
    _check_part(f"{layer}.experts.w13", w13p, w13s, None, G, sep="_")
    _check_part(f"{layer}.experts.w2", w2p, w2s, None, G, sep="_")
    return w13p, w13s, w2p, w2s


def _read_stacked(layer: str, entry: dict, files: CheckpointFiles, quant: W4A8QuantConfig):
    stacked, sp = entry["stacked"], entry["spelling"]
    parts = {}
    for part in sorted({p for p, _ in stacked}):
        name = f"{layer}.experts.{sp[part]}"
        p, s, dims = _projection(name, lambda f, part=part: stacked.get((part, f)), files, quant)
        if p.dim() != 3:
            raise W4A8CheckpointError(f"{name} must be stacked [E, N, K], got weights {tuple(p.shape)}")
        parts[part] = (p, s, dims)
    if "gate_up" in parts:
        (p, s, (N, H)) = parts.pop("gate_up")
        parts["gate"] = (p[:, :N // 2], s[:, :N // 2], (N // 2, H))
        parts["up"] = (p[:, N // 2:], s[:, N // 2:], (N // 2, H))
    missing = [n for p, n in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")) if p not in parts]
    if missing:
        raise W4A8CheckpointError(f"{layer}.experts: missing the stacked {missing} projection(s) "
                                  f"(found {sorted(sp.values())})")
    return _fit(layer, parts["gate"], parts["up"], parts["down"])


def _read_per_expert(layer: str, entry: dict, files: CheckpointFiles, quant: W4A8QuantConfig):
    per, sp = entry["per_expert"], entry["spelling"]
    experts = sorted({e for e, _, _ in per})
    E = len(experts)
    if experts != list(range(E)):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise W4A8CheckpointError(f"{layer}.experts: experts {missing} are missing (found {E} of "
                                  f"{max(experts) + 1})")
    default = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    out = {}
    for part in ("gate", "up", "down"):
        packed, scales, dims = [], [], None
        for e in experts:
            name = f"{layer}.experts.{e}.{sp.get(part, default[part])}"
            p, s, d = _projection(name, lambda f, e=e, part=part: per.get((e, part, f)), files, quant)
            if dims is not None and d != dims:
                raise W4A8CheckpointError(f"{name} has shape {list(d)} but expert 0 has {list(dims)}")
            dims = d
            packed.append(p)
            scales.append(s)
        out[part] = (torch.stack(packed), torch.stack(scales), dims)
    return _fit(layer, out["gate"], out["up"], out["down"])


def read_expert_layer(layer: str, entry: dict, files: CheckpointFiles, quant: W4A8QuantConfig):
    """A layer's experts in checkpoint form: (w13_packed, w13_scale, w2_packed, w2_scale), stacked
    [E, ...], uint4b8, whatever spelling and format the file uses."""
    if sum(bool(entry[k]) for k in ("per_expert", "stacked", "module")) > 1:
        raise W4A8CheckpointError(f"{layer}: expert tensors are stored in more than one spelling "
                                  f"(per expert, stacked, W4A8MoE names); keep one")
    if entry["module"]:
        return _read_module_spelling(layer, entry["module"], files, quant.group_size)
    if entry["stacked"]:
        return _read_stacked(layer, entry, files, quant)
    return _read_per_expert(layer, entry, files, quant)


def read_linear(name: str, files: CheckpointFiles, quant: W4A8QuantConfig):
    """A W4A8 linear module's (uint4b8 packed [N, ceil(K/8)], scale [N, ceil(K/G)], (N, K))."""
    def key_of(f):
        k = f"{name}.{f}"
        return k if k in files else None
    packed, scale, dims = _projection(name, key_of, files, quant)
    if packed.dim() != 2:
        raise W4A8CheckpointError(f"{name}: a linear weight is [N, K], got {tuple(packed.shape)} words")
    return packed, scale, dims


def _correction_bias(layer: str, files: CheckpointFiles):
    found = [layer + sfx for sfx in BIAS_SUFFIXES if layer + sfx in files]
    return (files.get(found[0]), found[0]) if found else (None, None)


def load_w4a8_checkpoint(path, *, device=None, scale_mode: str | None = None, process: bool = True,
                         tp_rank: int = 0, tp_size: int = 1, routing: Mapping | None = None,
                         load_other: bool = True) -> W4A8Checkpoint:
    """Read a compressed-tensors W4A8 checkpoint directory into W4A8MoE layers.

    device: where the layers live (default CPU). scale_mode: "exact" | "fp8" (default: the
    package default). process: run process_weights_after_loading() on each layer (on a stream
    of its own on CUDA). tp_rank / tp_size: load only this rank's shard (see inductor_w4a8.tp).
    routing: overrides of the routing arguments read from config.json (top_k, scoring, ...).
    For whole models (attention, norms, embeddings, W4A8 linears), see `inductor_w4a8.from_pretrained`.
    """
    path = Path(path)
    config = read_config(path)
    with CheckpointFiles(path) as files:
        layers, other = classify_expert_keys(files.keys())
        if not layers:
            raise W4A8CheckpointError(f"{path}: no expert tensors found (expected keys like "
                                      f"'model.layers.0.mlp.experts.0.gate_proj.weight_packed')")
        qc = quantization_section(config)
        route = {**moe_routing_from_config(config), **dict(routing or {})}
        device = torch.device(device) if device is not None else torch.device("cpu")
        consumed, moe_layers, quant = set(), {}, None
        for layer in sorted(layers, key=natural_key):
            quant = expert_layer_scheme(qc, layer, layers[layer])
            w13p, w13s, w2p, w2s = read_expert_layer(layer, layers[layer], files, quant)
            bias = None
            if route["scoring"] == "sigmoid":
                bias, key = _correction_bias(layer, files)
                consumed.add(key)
            moe_layers[layer] = build_w4a8_moe(
                w13p, w13s, w2p, w2s, group_size=quant.group_size, routing=route,
                e_score_correction_bias=bias, scale_mode=scale_mode, device=device, tp_rank=tp_rank,
                tp_size=tp_size, process=process)
        tensors = {k: files.get(k).to(device) for k in other if k not in consumed} if load_other else {}
    return W4A8Checkpoint(config=config, quant=quant, moe_layers=moe_layers, tensors=tensors)


def natural_key(s: str):
    """Sort key that orders 'layers.10' after 'layers.9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ================================================================================================
# Writing
# ================================================================================================
def quantized_module_tensors(name: str, packed: torch.Tensor, scale: torch.Tensor, K: int, fmt: str) -> dict:
    """One module's tensors (packed uint4b8 [..., N, ceil(K/8)]) in a W4A8 format's own keys."""
    if fmt == "pack-quantized":
        shape = torch.tensor((packed.shape[-2], K), dtype=torch.int64)
        return {f"{name}.weight_packed": packed.contiguous(), f"{name}.weight_scale": scale.contiguous(),
                f"{name}.weight_shape": shape}
    if fmt == "int-quantized":
        q = formats.unpack_int4(packed, biased=True)[..., :K].to(torch.int8)
        return {f"{name}.weight": q.contiguous(), f"{name}.weight_scale": scale.contiguous()}
    raise ValueError(f"format={fmt!r}: use one of {SUPPORTED_FORMATS}")


def _expert_tensors(layer: str, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, G: int,
                    layout: str, fmt: str) -> dict:
    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"layout={layout!r}: use 'per_expert' (llm-compressor's keys) or 'stacked'")
    E, I, H = w1.shape
    w13p, w13s = formats.quantize_w4(torch.cat([w1, w3], dim=1), G)
    w2p, w2s = formats.quantize_w4(w2, G)
    if layout == "stacked":
        if fmt != "pack-quantized":
            raise ValueError("layout='stacked' writes W4A8MoE parameter names, which are pack-quantized")
        return {f"{layer}.experts.w13_weight_packed": w13p, f"{layer}.experts.w13_weight_scale": w13s,
                f"{layer}.experts.w2_weight_packed": w2p, f"{layer}.experts.w2_weight_scale": w2s}
    parts = {"gate_proj": (w13p[:, :I], w13s[:, :I], H), "up_proj": (w13p[:, I:], w13s[:, I:], H),
             "down_proj": (w2p, w2s, I)}
    out = {}
    for name, (packed, scale, K) in parts.items():
        for e in range(E):
            out.update(quantized_module_tensors(f"{layer}.experts.{e}.{name}", packed[e], scale[e], K, fmt))
    return out


def save_w4a8_checkpoint(path, experts: Mapping[str, tuple], *, group_size: int = 128,
                         config: Mapping | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                         layout: str = "per_expert", max_shard_bytes: int | None = None,
                         format: str = "pack-quantized", quantization_config: Mapping | None = None) -> Path:
    """Write a compressed-tensors W4A8 checkpoint.

    experts: layer prefix (e.g. "model.layers.0.mlp") -> (w1 gate [E, I, H], w3 up [E, I, H],
    w2 down [E, H, I]) bf16 expert weights, quantized here with `formats.quantize_w4`.
    config: the model's config.json content (routing: num_experts_per_tok, norm_topk_prob, ...);
    `quantization_config` is added (`quantization_config_dict(group_size, format=format)` unless
    given). tensors: other tensors stored as they are (router weights, e_score_correction_bias,
    norms, already-quantized linears, ...). layout: "per_expert" writes llm-compressor's keys,
    "stacked" the W4A8MoE / FusedMoE parameter names. format: "pack-quantized" or "int-quantized"
    (llm-compressor's two W4AFP8 formats). max_shard_bytes: split into shards with an index file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for layer, (w1, w3, w2) in experts.items():
        state.update(_expert_tensors(layer, w1, w3, w2, group_size, layout, format))
    for k, v in (tensors or {}).items():
        if k in state:
            raise ValueError(f"tensor {k!r} collides with an expert tensor")
        state[k] = v
    cfg = dict(config or {})
    cfg["quantization_config"] = dict(quantization_config) if quantization_config is not None else \
        quantization_config_dict(group_size, format=format)
    return write_safetensors(path, state, cfg, max_shard_bytes)


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], config: Mapping,
                      max_shard_bytes: int | None = None) -> Path:
    """config.json plus one model.safetensors, or shards and their index when max_shard_bytes is set."""
    import json
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # a checkpoint written here before (single file or shards + index) would otherwise be read
    # instead of, or mixed with, this one: its weight files go first, as save_pretrained does
    for old in [path / SINGLE_FILE_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2) + "\n")
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
