"""Decompositions of the elementwise / row-reduction ops for the compile path, so Inductor fuses them.

Each decomposition is the op's own pure-torch definition (the math the CPU kernels run, from
`formats` / `reference`), so compiled code computes what the op specifies; Inductor turns it into
its own Triton (or C++) kernels and can fuse it with neighbours (an RMSNorm before the block, the
residual add after it, the activation between the GEMMs). They are applied by a
FunctionalTensorMode rule (AOTAutograd traces under that mode, so in-place steps inside a
definition are functionalized) and only while the "w4a8" backend compiles; eager, export and
other backends keep the ops.

Not decomposed by default: `sort_by_expert` (a counting sort our kernel does in one pass; the
aten decomposition is an argsort) and `gather_rows_fp8` (its consumer is the GEMM, which cannot
fuse a gather). `select_experts` and `select_and_sort_experts` (the same routing, then our sort) are available
(softmax/sigmoid + top-k; Inductor falls back to aten.topk for the top-k) but off by default: our
routing kernel does it in one launch, and for one token sorts in the same launch.
"""
from __future__ import annotations

import torch

from inductor_w4a8 import formats, reference


def _quantize_fp8_per_token(x):
    return formats.quantize_fp8_per_token(x)


def _silu_mul_quantize_fp8(x):
    return reference.silu_mul_quantize_fp8(x)


def _combine(y, flat_to_sorted, topk_weights):
    return reference.combine(y, flat_to_sorted, topk_weights).to(torch.bfloat16)


def _select_experts(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group,
                    routed_scaling_factor):
    return reference.select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                    n_group, topk_group, routed_scaling_factor)


def _select_and_sort_experts(router_logits, correction_bias, top_k, scoring, renormalize, n_group,
                             topk_group, routed_scaling_factor):
    # the routing decomposed, the sort kept as our op (its aten form is an argsort)
    weights, ids = _select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                   n_group, topk_group, routed_scaling_factor)
    return (weights, ids, *torch.ops.w4a8.sort_by_expert(ids, router_logits.shape[1]))


def _gather_rows_fp8(xq, x_scale, sorted_rows, top_k):
    return reference.gather_rows_fp8(xq, x_scale, sorted_rows, top_k)


def _quantize_scatter_fp8(x, flat_to_sorted):
    return reference.quantize_scatter_fp8(x, flat_to_sorted)


# op name -> decomposition of its .default overload
DECOMPOSITIONS = {
    "quantize_fp8_per_token": _quantize_fp8_per_token,
    "silu_mul_quantize_fp8": _silu_mul_quantize_fp8,
    "combine": _combine,
    "select_experts": _select_experts,
    "select_and_sort_experts": _select_and_sort_experts,
    "gather_rows_fp8": _gather_rows_fp8,
    "quantize_scatter_fp8": _quantize_scatter_fp8,
}
# Nothing is fused by default, by measurement (H100, torch 2.11, GLM-4.6 layer, examples/
# graph_report.py --fuse none|default|all): Inductor's fused combine (one pointwise kernel over the
# k gathered rows) takes 371 us at 8192 tokens against our combine kernel's 260 us, and is no
# faster at 1 or 64 tokens; fusing everything adds 9 kernels (amax reductions, routing pieces):
# 93 us against 74 us of kernels at M = 1, 7209 against 6680 us at 8192. The fp8 quantizers have
# a second reason: Inductor rewrites `amax / 448` as `amax * (1 / 448)`, one ulp off the kernels'
# true division, which fp8 re-rounding amplifies (compiled vs eager 3.6% at T = 3 on a small
# layer). Opt in with options={"w4a8.fuse": "all"} or a list of op names.
DEFAULT_FUSED: tuple[str, ...] = ()


def check_names(names) -> None:
    unknown = sorted(set(names) - set(DECOMPOSITIONS))
    if unknown:
        raise ValueError(f"w4a8.fuse: no decomposition for {unknown}; known: {sorted(DECOMPOSITIONS)}")


def functional_rule(name: str, settings_fn):
    """FunctionalTensorMode rule for w4a8::<name>: while a "w4a8" compile fuses `name`, trace its
    decomposition under functionalization (so in-place steps inside it stay legal), else keep
    the op."""
    from . import _compat
    known = _compat.functional_tensor_types()
    fn = DECOMPOSITIONS[name]

    def rule(mode, op, types, args, kwargs):
        settings = settings_fn()
        if settings is None or name not in settings.fuse or not all(issubclass(t, known) for t in types):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return fn(*args, **kwargs)
    return rule
