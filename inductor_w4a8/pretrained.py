"""`from_pretrained(path)`: a compressed-tensors W4A8 checkpoint directory -> a transformers model.

1. config.json -> the transformers config; the model of its class (`architectures[0]`) is built
   on the meta device (no weights allocated, no random init).
2. Every sparse-MoE block (`hf.find_moe_blocks`) becomes a W4A8SparseMoeBlock whose experts are a
   W4A8MoE built by `moe_builder.build_w4a8_moe` from the checkpoint's own int4 words and scales
   (never re-quantized; sharded over `process_group` when given). Every nn.Linear that a W4A8
   config group targets becomes a W4A8Linear holding the checkpoint's int4.
3. Every other tensor is read from the safetensors files one at a time, moved to `device` and
   assigned as stored (no intermediate copy); weights transformers ties (lm_head to the
   embeddings when `tie_word_embeddings`) are tied; non-persistent buffers (rotary inv_freq) are
   computed by a fresh instance of their module. Peak host memory is about one MoE layer's int4.
4. Everything is post-processed (MoE layers as they are built, W4A8 linears after loading).

Checkpoint names are the file's (llm-compressor writes transformers 4.x names, e.g. Mixtral's
`block_sparse_moe`); `CHECKPOINT_ALIASES` maps them onto the model's module names.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from . import formats
from .checks import W4A8InputError
from .checkpoint_files import CheckpointFiles, read_config
from .hf import find_moe_blocks, moe_routing_of, w4a8_block
from .linear import W4A8Linear
from .moe_builder import W4A8CheckpointError, build_w4a8_moe, process_group_rank
from .quant_config import check_every_group_is_w4a8, module_scheme, quantization_section
from .weights import (BIAS_SUFFIXES, classify_expert_keys, expert_layer_scheme, natural_key,
                      read_expert_layer, read_linear)

__all__ = ["from_pretrained", "CHECKPOINT_ALIASES"]

# checkpoint module-name spelling -> the transformers 5.x model's, tried when a name is not the model's own
CHECKPOINT_ALIASES = ((re.compile(r"\.block_sparse_moe(?=\.|$)"), ".mlp"),)
_QUANT_FIELDS = ("weight_packed", "weight_scale", "weight_shape")


def _model_on_meta(path: Path, config_dict: dict):
    try:
        import transformers
    except ImportError as e:
        raise ImportError("from_pretrained needs transformers (pip install 'inductor_w4a8[hf]')") from e
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise W4A8CheckpointError(f"{path / 'config.json'}: transformers cannot read this config ({e})") from e
    for attr in ("quantization_config", "compression_config"):   # we run the quantized modules ourselves
        if hasattr(config, attr):
            delattr(config, attr)
    archs = config_dict.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):
        model = cls(config)
    return model.to(torch.bfloat16).eval()


class _Names:
    """Checkpoint names <-> the model's: identity where the model has the name, else an alias."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())

    def module(self, ckpt_name: str) -> str | None:
        if ckpt_name in self.modules:
            return ckpt_name
        for pattern, repl in CHECKPOINT_ALIASES:
            alias = pattern.sub(repl, ckpt_name)
            if alias in self.modules:
                return alias
        return None

    def tensor(self, ckpt_key: str) -> tuple[str, str] | None:
        """checkpoint key -> (model module name, attribute), or None when the model has no such tensor."""
        owner, _, attr = ckpt_key.rpartition(".")
        name = self.module(owner) if owner else ""
        return None if name is None else (name, attr)


def _assign(model: nn.Module, module_name: str, attr: str, value: torch.Tensor, key: str) -> None:
    module = model.get_submodule(module_name)
    current = module._parameters.get(attr, module._buffers.get(attr))
    if current is None:
        raise W4A8CheckpointError(f"{key}: the model's {type(module).__name__} has no tensor {attr!r}")
    if tuple(current.shape) != tuple(value.shape):
        raise W4A8CheckpointError(f"{key} has shape {tuple(value.shape)} but the model's "
                                  f"{module_name}.{attr} is {tuple(current.shape)}")
    if value.dtype != current.dtype:
        if not (value.is_floating_point() and current.is_floating_point()):
            raise W4A8CheckpointError(f"{key} has dtype {value.dtype} but the model's {module_name}.{attr} "
                                      f"is {current.dtype}")
        value = value.to(current.dtype)   # the model runs in bf16 (as transformers casts to its dtype)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _swap_moe_blocks(model, names: _Names, layers: dict, files, qc, consumed: set, *, device, scale_mode,
                     process_group) -> None:
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    by_model_name = {}
    for layer in layers:
        target = names.module(layer)
        if target is None:
            warnings.warn(f"from_pretrained: the checkpoint's expert layer {layer} has no module in "
                          f"{type(model).__name__}; its tensors are not loaded")
            consumed.update(_layer_keys(layers[layer]))
        else:
            by_model_name[target] = layer
    rank, world = process_group_rank(process_group)
    for name, block in find_moe_blocks(model):
        layer = by_model_name.get(name)
        if layer is None:
            raise W4A8CheckpointError(f"{files.path}: no expert tensors for the model's MoE block {name} "
                                      f"(expected keys like '{name}.experts.0.gate_proj.weight_packed')")
        entry = layers[layer]
        quant = expert_layer_scheme(qc, layer, entry)
        routing = moe_routing_of(block, text_config)
        bias = None
        if routing["scoring"] == "sigmoid":
            found = [layer + sfx for sfx in BIAS_SUFFIXES if layer + sfx in files]
            bias = files.get(found[0]) if found else None
        moe = build_w4a8_moe(*read_expert_layer(layer, entry, files, quant), group_size=quant.group_size,
                             routing=routing, e_score_correction_bias=bias, scale_mode=scale_mode,
                             device=device, tp_rank=rank, tp_size=world, process_group=process_group)
        consumed.update(_layer_keys(entry))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, w4a8_block(name, block, moe))


def _layer_keys(entry: dict) -> list[str]:
    return list(entry["per_expert"].values()) + list(entry["stacked"].values()) + list(entry["module"].values())


def _ckpt_linear_names(files, names: _Names) -> dict:
    """model module name -> checkpoint module name, for every module whose weight the file holds."""
    out = {}
    for key in files.keys():
        owner, _, attr = key.rpartition(".")
        if attr in _QUANT_FIELDS + ("weight",):
            target = names.module(owner)
            if target is not None:
                out.setdefault(target, owner)
    return out


def _swap_linears(model, names: _Names, files, qc, consumed: set, *, device, scale_mode) -> int:
    ckpt_of = _ckpt_linear_names(files, names)
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        ckpt = ckpt_of.get(name, name)
        quant = module_scheme(qc, ckpt)
        if quant is None:
            continue
        packed, scale, (N, K) = read_linear(ckpt, files, quant)
        if (N, K) != (module.out_features, module.in_features):
            raise W4A8CheckpointError(f"{ckpt}: the checkpoint's weight is [{N}, {K}] but the model's "
                                      f"{name} is [{module.out_features}, {module.in_features}]")
        kwargs = {} if scale_mode is None else {"scale_mode": scale_mode}
        lin = W4A8Linear(K, N, quant.group_size, bias=module.bias is not None, device="meta", **kwargs)
        lin.load_state_dict({"weight_packed": packed.to(device), "weight_scale": scale.to(device, torch.bfloat16)},
                            strict=False, assign=True)
        consumed.update(f"{ckpt}.{f}" for f in _QUANT_FIELDS + ("weight",))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
        count += 1
    return count


def _load_rest(model, names: _Names, files, consumed: set, device) -> None:
    unexpected = []
    for key in sorted(files.keys(), key=natural_key):
        if key in consumed:
            continue
        where = names.tensor(key)
        if where is None:
            unexpected.append(key)
            continue
        _assign(model, *where, files.get(key).to(device), key)
    if unexpected:
        warnings.warn(f"from_pretrained: {len(unexpected)} checkpoint tensors have no place in "
                      f"{type(model).__name__} and were not loaded, e.g. {unexpected[:4]}")


def _materialize_remaining(model, path: Path, device) -> None:
    """Tie weights, compute non-persistent buffers; refuse if any parameter is still unloaded."""
    if getattr(model.config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if isinstance(out, nn.Linear) and out.weight.is_meta and not inp.weight.is_meta:
            out.weight = inp.weight
    for name, module in model.named_modules():
        stale = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        if not stale:
            continue
        try:
            fresh = type(module)(config=module.config)
        except Exception as e:  # noqa: BLE001 - any module we cannot rebuild from its config
            raise W4A8CheckpointError(f"{path}: the checkpoint has no {name}.{stale[0]} and "
                                      f"{type(module).__name__} cannot be rebuilt from the config to "
                                      f"compute it ({e})") from e
        for b in stale:
            module._buffers[b] = fresh._buffers[b].to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise W4A8CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensors the model needs, "
                                  f"e.g. {missing[:4]}")


def from_pretrained(path, *, device=None, scale_mode: str | None = None, process_group=None):
    """A compressed-tensors W4A8 checkpoint directory (llm-compressor's W4AFP8, pack-quantized or
    int-quantized) -> the transformers model of its config's class, ready for generate().

    device: where the weights go (default CPU). scale_mode: "exact" | "fp8" for every W4A8 module
    (default: the package default). process_group: shard the MoE experts over this
    torch.distributed group (tensor parallel, `inductor_w4a8.tp`); everything else is replicated.
    """
    device = _target_device(device)        # the arguments first, before any file is read
    if scale_mode is not None and scale_mode not in formats.SCALE_MODES:
        raise W4A8InputError(f"from_pretrained: scale_mode={scale_mode!r} is not supported; use one "
                             f"of {formats.SCALE_MODES} or None (the default, {formats.DEFAULT_SCALE_MODE!r})")
    process_group_rank(process_group)
    path = Path(path)
    config_dict = read_config(path)
    qc = quantization_section(config_dict)
    check_every_group_is_w4a8(qc)       # a group we cannot run fails now, before any layer loads
    model = _model_on_meta(path, config_dict)
    names = _Names(model)
    consumed: set = set()
    with CheckpointFiles(path) as files, torch.no_grad():
        layers, _ = classify_expert_keys(files.keys())
        _swap_moe_blocks(model, names, layers, files, qc, consumed, device=device, scale_mode=scale_mode,
                         process_group=process_group)
        names = _Names(model)
        _swap_linears(model, names, files, qc, consumed, device=device, scale_mode=scale_mode)
        _load_rest(model, names, files, consumed, device)
    _materialize_remaining(model, path, device)
    for module in model.modules():
        if isinstance(module, W4A8Linear):
            module.process_weights_after_loading()
    _load_generation_config(model, path)
    return model.eval()


def _target_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise W4A8InputError(f"from_pretrained: device={device!r} is not a device; use 'cpu', "
                             f"'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise W4A8InputError(f"from_pretrained: device={str(device)!r} but torch {torch.__version__} "
                             f"sees no CUDA GPU; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise W4A8InputError(f"from_pretrained: device={str(device)!r} but there are only "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise W4A8InputError(f"from_pretrained: device={str(device)!r}: only cpu and cuda are supported")
    return device


def _load_generation_config(model, path: Path) -> None:
    if not (path / "generation_config.json").exists():
        return
    from transformers import GenerationConfig
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise W4A8CheckpointError(f"{path / 'generation_config.json'}: cannot read it ({e})") from e
