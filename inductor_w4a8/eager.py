"""W4A8MoE's direct eager path: the ops' own kernels called without the dispatcher.

In eager mode each `torch.ops.w4a8` call pays the dispatcher and torch.library's Python wrappers
(autograd, aliasing checks) before our kernel runs, and each kernel re-checks inputs that the
block produced itself. When nothing can observe the difference, W4A8MoE.forward calls the same
kernels (`ops._<op>_<device>`, the functions registered for the op) directly, and after the
first call for a given set of shapes, dtypes, devices and parameters, their bodies without the
checks (the checks would pass again: every input is either checked by W4A8MoE.__call__ or made
by the previous kernel from them). Outputs are bit for bit those of the ops.

"Nothing can observe" means: not compiling or tracing (torch.compile, export), plain tensors (no
FakeTensor or other subclass), no TorchDispatchMode / TorchFunctionMode (tracers, recorders,
`with torch.device(...)`), the profiler off (so profiles keep showing the w4a8:: ops), no
gradient needed. Otherwise, and with `direct_calls(False)` or W4A8_DIRECT_EAGER=0, the forward
calls torch.ops.w4a8 as before. The value-check debug switch (checks.value_checks) keeps the
checked kernels on every call.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import ops, reference
from .checks import value_checks_enabled
from .switches import ThreadSwitch

DIRECT_ENV = "W4A8_DIRECT_EAGER"
CHECKED_ATTR = "_w4a8_direct_checked"  # per module: the keys whose checks passed once

OP_NAMES = ("select_and_sort_experts", "quantize_scatter_fp8", "grouped_gemm", "silu_mul_quantize_fp8",
            "combine")

# direct_calls(False): forbid W4A8MoE's direct eager calls in this thread (default: allowed)
direct_calls = ThreadSwitch(DIRECT_ENV)


def _checked_kernels(device_type: str) -> SimpleNamespace:
    return SimpleNamespace(**{n: getattr(ops, f"_{n}_{device_type}") for n in OP_NAMES})


def _unchecked_kernels(device_type: str) -> SimpleNamespace:
    if device_type == "cpu":
        return SimpleNamespace(
            select_and_sort_experts=ops.select_and_sort_cpu_math,
            quantize_scatter_fp8=reference.quantize_scatter_fp8, grouped_gemm=ops.grouped_gemm_cpu_math,
            silu_mul_quantize_fp8=reference.silu_mul_quantize_fp8, combine=ops.combine_cpu_math)
    from .launch import grouped_gemm, moe_combine, quantize_scatter, routing, silu_mul_quant
    return SimpleNamespace(
        select_and_sort_experts=routing.select_and_sort_experts,
        quantize_scatter_fp8=quantize_scatter.quantize_scatter_fp8, grouped_gemm=grouped_gemm.grouped_gemm,
        silu_mul_quantize_fp8=silu_mul_quant.silu_mul_quantize_fp8, combine=moe_combine.combine)


_tables: dict = {}


def _table(device_type: str):
    table = _tables.get(device_type)
    if table is None:
        table = _tables[device_type] = (_checked_kernels(device_type), _unchecked_kernels(device_type))
    return table


def _observed() -> bool:
    global _dispatch_observed
    if _dispatch_observed is None:
        from .lowerings import _compat  # imported late: the package registers lowerings first
        _dispatch_observed = _compat.dispatch_observed
    return _dispatch_observed()


_dispatch_observed = None
CALL_OPS = (None, None, False)


def direct_kernels(moe, hidden_states, router_logits):
    """(kernels, key, checked) for W4A8MoE.forward. kernels: a namespace with the ops' names, or
    None (call torch.ops.w4a8). key: what the ops' checks read (None when kernels is None or the
    value checks are on). checked: kernels are the checked ones; pass key to `remember_checked`
    once the forward succeeded with them, so that later calls with this key run unchecked."""
    if not direct_calls.enabled() or torch.compiler.is_compiling():
        return CALL_OPS
    if type(hidden_states) is not torch.Tensor or type(router_logits) is not torch.Tensor:
        return CALL_OPS
    device = hidden_states.device
    if device.type not in ("cpu", "cuda") or _observed():
        return CALL_OPS
    if torch.is_grad_enabled() and (hidden_states.requires_grad or router_logits.requires_grad):
        return CALL_OPS
    checked, unchecked = _table(device.type)
    if value_checks_enabled(hidden_states):
        return checked, None, True
    # everything the ops' checks read: the inputs' shapes, dtypes and devices; each parameter by
    # identity, shape, dtype, device and strides (replaced -- a freed one's id can come back --
    # or converted in place: module.to() keeps the Parameter object); the module's settings the
    # forward passes to the ops (routing and group size can be reassigned after a call)
    params = tuple(None if p is None else (id(p), p.shape, p.dtype, p.device, p.stride())
                   for p in moe._parameters.values())
    settings = (moe.num_experts, moe.top_k, moe.scoring, moe.renormalize, moe.n_group, moe.topk_group,
                moe.routed_scaling_factor, moe.group_size)
    key = (hidden_states.shape, router_logits.shape, hidden_states.dtype, router_logits.dtype,
           device, router_logits.device, params, settings)
    if key in moe.__dict__.get(CHECKED_ATTR, ()):
        return unchecked, key, False
    return checked, key, True


def remember_checked(moe, key) -> None:
    moe.__dict__.setdefault(CHECKED_ATTR, set()).add(key)
