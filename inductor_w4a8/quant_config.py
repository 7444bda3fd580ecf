"""compressed-tensors `quantization_config`: which config group covers a module, and is it W4A8.

W4A8 means, for the config group that targets a module:

    "format": "pack-quantized" | "int-quantized"   (the group's own "format", else the top level)
    "weights":           {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
                          "group_size": 32 | 64 | 128, "actorder": null | "weight" | "static"}
    "input_activations": {"num_bits": 8, "type": "float", "dynamic": true, "strategy": "token",
                          "symmetric": true}

A module is read by the group that targets it, compressed-tensors' way: `ignore` first (then the
module is stored unquantized), then each group's `targets` ('re:<regex>' matched at the start of
the module name, a class name such as 'Linear', or a module name / name suffix). A group whose
`weights` and `input_activations` are both null quantizes nothing. Any other scheme (other bits,
asymmetric weights, channel/tensor strategies, static or per-tensor activations, int8
activations, activation ordering by group) is refused with a message that says what was found.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import formats
from .checks import W4A8CheckpointError

__all__ = ["W4A8QuantConfig", "SUPPORTED_FORMATS", "quantization_config_dict", "quantization_section",
           "module_scheme", "module_is_w4a8", "check_every_group_is_w4a8", "parse_quantization_config", "module_matches"]

SUPPORTED_FORMATS = ("pack-quantized", "int-quantized")


@dataclass(frozen=True)
class W4A8QuantConfig:
    """What the loader needs from the W4A8 config group of a module."""
    group_size: int
    group_name: str = "group_0"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    format: str = "pack-quantized"


def quantization_config_dict(group_size: int, *, targets: Iterable[str] = ("re:.*experts.*",),
                             ignore: Iterable[str] = ("lm_head",), format: str = "pack-quantized") -> dict:
    """The compressed-tensors `quantization_config` of a W4A8 (int4 group weights, fp8 dynamic
    per-token activations) checkpoint, as llm-compressor writes it."""
    formats.check_group_size(group_size, group_size, "group_size")
    if format not in SUPPORTED_FORMATS:
        raise ValueError(f"format={format!r}: use one of {SUPPORTED_FORMATS}")
    return {
        "quant_method": "compressed-tensors",
        "format": format,
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


def module_matches(name: str, patterns: Iterable[str], class_name: str = "Linear") -> bool:
    """compressed-tensors' target rule: 're:<regex>' (re.match on the module name), the module's
    class name ('Linear' covers every linear layer, experts included), or a name / name suffix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == class_name or name == p or name.endswith("." + p):
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


def quantization_section(config: Mapping) -> Mapping:
    """config.json (or its `quantization_config`) -> the validated compressed-tensors section."""
    qc = config.get("quantization_config", config.get("compression_config")) \
        if "config_groups" not in config else config
    if not isinstance(qc, Mapping):
        raise W4A8CheckpointError("config.json has no quantization_config: this is not a "
                                  "compressed-tensors checkpoint (need a W4A8 one)")
    method = qc.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise W4A8CheckpointError(f"quantization_config.quant_method={method!r}; need "
                                  f"'compressed-tensors' (W4A8 pack-quantized or int-quantized)")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise W4A8CheckpointError(f"quantization_config has no config_groups (found keys "
                                  f"{sorted(qc)}); need a W4A8 group")
    status = qc.get("quantization_status")
    if status not in (None, "compressed"):
        raise W4A8CheckpointError(f"quantization_config.quantization_status={status!r}; the weights "
                                  f"must be stored compressed (status 'compressed')")
    return qc


def _quantizes_nothing(group: Mapping) -> bool:
    return group.get("weights") is None and group.get("input_activations") is None


def _as_w4a8(qc: Mapping, gname: str, group: Mapping, what: str) -> W4A8QuantConfig:
    problems = _w4a8_problems(group)
    fmt = group.get("format") or qc.get("format")
    if fmt not in SUPPORTED_FORMATS:
        problems.append(f"format={fmt!r} (need one of {SUPPORTED_FORMATS})")
    if problems:
        raise W4A8CheckpointError(f"quantization_config group {gname!r}{what} is not W4A8 (int4 "
                                  f"symmetric group weights, fp8 dynamic per-token activations, "
                                  f"pack-quantized or int-quantized): found " + "; ".join(problems))
    return W4A8QuantConfig(group_size=int(group["weights"]["group_size"]), group_name=gname,
                           targets=tuple(group.get("targets") or ()), ignore=tuple(qc.get("ignore") or ()),
                           format=fmt)


def check_every_group_is_w4a8(qc: Mapping) -> None:
    """W4A8CheckpointError naming the first config group that quantizes something other than
    W4A8: for a whole model, refused before any module is read (nothing half-loaded)."""
    for gname, group in qc["config_groups"].items():
        if not _quantizes_nothing(group):
            _as_w4a8(qc, gname, group, f" (targets {list(group.get('targets') or [])})")


def module_scheme(qc: Mapping, name: str, class_name: str = "Linear") -> W4A8QuantConfig | None:
    """The W4A8 scheme of the module `name` (checkpoint spelling); None when the module is stored
    unquantized (ignored, or targeted by no group); W4A8CheckpointError for any other scheme."""
    if module_matches(name, qc.get("ignore") or (), class_name):
        return None
    for gname, group in qc["config_groups"].items():
        if module_matches(name, group.get("targets") or (), class_name):
            return None if _quantizes_nothing(group) else _as_w4a8(qc, gname, group, f" (targets {name})")
    return None


def module_is_w4a8(qc: Mapping, name: str, class_name: str = "Linear") -> bool:
    return module_scheme(qc, name, class_name) is not None


def parse_quantization_config(config: Mapping, module_names: Iterable[str] | None = None) -> W4A8QuantConfig:
    """config.json (or its `quantization_config`) -> W4A8QuantConfig, or W4A8CheckpointError.

    With `module_names` (the expert linear modules of the checkpoint), each is read by the group
    that targets it and must be W4A8 (all with one group size); without, every group must be W4A8.
    """
    qc = quantization_section(config)
    groups = qc["config_groups"]
    if module_names is None:
        chosen = [_as_w4a8(qc, g, grp, "") for g, grp in groups.items()]
    else:
        names = list(module_names)
        kept = [n for n in names if not module_matches(n, qc.get("ignore") or ())]
        if names and not kept:
            raise W4A8CheckpointError("every expert module is in quantization_config.ignore: the "
                                      "experts are not quantized")
        chosen = [s for s in (module_scheme(qc, n) for n in kept) if s is not None]
        if not chosen:
            raise W4A8CheckpointError(f"no quantization_config group targets the experts "
                                      f"(groups: {sorted(groups)}; e.g. {kept[:1]})")
    sizes = {s.group_size for s in chosen}
    if len(sizes) > 1:
        raise W4A8CheckpointError(f"the expert config groups disagree on group_size: {sorted(sizes)}")
    return chosen[0]
