"""Every `w4a8::` custom op: schema, input checks, fake (meta) kernel, CPU kernel, CUDA kernel.

CPU kernels are the pure-torch math of `formats` / `reference`; CUDA kernels are Triton launchers
in `inductor_w4a8.launch` (the @triton.jit code itself lives in `inductor_w4a8.kernels`). The
launchers are imported lazily so that CPU-only installs never import triton.

Checks: `_check_*` run in the fake kernel and in every real kernel before any launch or write.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from . import formats, reference
from .checks import (check_contiguous, check_dtype, check_min_rank, check_rank, check_same_device,
                     check_shape, fail, value_checks_enabled)

FP8 = formats.FP8_DTYPE
SCORING_FUNCTIONS = ("softmax", "sigmoid")


_launchers: dict = {}


def _launcher(name: str):
    module = _launchers.get(name)  # a dict hit per call, not importlib's lookup
    if module is None:
        module = _launchers[name] = importlib.import_module(f"inductor_w4a8.launch.{name}")
    return module


def _inference_only(op, name: str) -> None:
    """Refuse, at the call, a call of `op` that autograd would record: the ops have no backward,
    and a tensor whose grad_fn fails in backward() is worse than an error naming the fix. Runs
    only where autograd is involved (grad mode on and an input requiring grad), so the
    inference path pays nothing."""
    def setup_context(ctx, inputs, output):
        fail(name, "is inference only (it has no backward) and an input requires grad; call it "
                   "under torch.no_grad() or torch.inference_mode(), or pass detached inputs")

    def backward(ctx, *grads):  # never reached: setup_context refuses first
        raise AssertionError(f"w4a8::{name} has no backward")

    op.register_autograd(backward, setup_context=setup_context)


# ============================================================================================
# Post-processing
# ============================================================================================
def _check_packed_weights(op: str, packed: Tensor, *, need_contiguous: bool = True) -> None:
    check_dtype(op, "packed", packed, torch.int32)
    check_min_rank(op, "packed", packed, 2, "[..., N, K // 8] int32 words of 8 int4 nibbles")
    if need_contiguous:
        check_contiguous(op, "packed", packed)


@torch.library.custom_op("w4a8::convert_packed_uint4b8_to_signed_int4_", mutates_args=("packed",))
def convert_packed_uint4b8_to_signed_int4_(packed: Tensor) -> None:
    """In place: every nibble v of the compressed-tensors words becomes (v - 8) & 0xF."""
    raise NotImplementedError(f"w4a8::convert_packed_uint4b8_to_signed_int4_ has no kernel for {packed.device}")


@convert_packed_uint4b8_to_signed_int4_.register_fake
def _(packed: Tensor) -> None:
    _check_packed_weights("convert_packed_uint4b8_to_signed_int4_", packed)


@convert_packed_uint4b8_to_signed_int4_.register_kernel("cpu")
def _(packed: Tensor) -> None:
    _check_packed_weights("convert_packed_uint4b8_to_signed_int4_", packed)
    formats.uint4b8_to_signed_int4_(packed)


@convert_packed_uint4b8_to_signed_int4_.register_kernel("cuda")
def _(packed: Tensor) -> None:
    _check_packed_weights("convert_packed_uint4b8_to_signed_int4_", packed)
    _launcher("int4_convert").convert_uint4b8_to_signed_(packed)


def _check_reorder(packed: Tensor) -> None:
    op = "encode_and_reorder_int4b_grouped"
    _check_packed_weights(op, packed)
    check_rank(op, "packed", packed, 3, "[E, N, K // 8] signed int4 words")
    K = packed.shape[2] * formats.NIBBLES_PER_WORD
    if K % formats.GEMM_CHUNK:
        fail(op, f"packed holds K={K} weights per row (shape[2] * 8); the GEMM layout needs K to be "
                 f"a multiple of {formats.GEMM_CHUNK} (the smallest group size); pad K up to one")


@torch.library.custom_op("w4a8::encode_and_reorder_int4b_grouped", mutates_args=())
def encode_and_reorder_int4b_grouped(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Signed int32 [E, N, K // 8] -> (weights in the GEMM layout, int64 [E, 3] strides).

    The layout and the unit of the strides are documented in `formats.encode_gemm_layout`.
    """
    raise NotImplementedError(f"w4a8::encode_and_reorder_int4b_grouped has no kernel for {packed.device}")


@encode_and_reorder_int4b_grouped.register_fake
def _(packed: Tensor) -> tuple[Tensor, Tensor]:
    _check_reorder(packed)
    E, N, words = packed.shape
    w = packed.new_empty(formats.gemm_layout_shape(E, N, words * formats.NIBBLES_PER_WORD),
                         dtype=formats.gemm_layout_dtype())
    return w, packed.new_empty((E, 3), dtype=torch.int64)


@encode_and_reorder_int4b_grouped.register_kernel("cpu")
def _(packed: Tensor) -> tuple[Tensor, Tensor]:
    _check_reorder(packed)
    return formats.encode_gemm_layout(packed)


@encode_and_reorder_int4b_grouped.register_kernel("cuda")
def _(packed: Tensor) -> tuple[Tensor, Tensor]:
    _check_reorder(packed)
    return _launcher("int4_reorder").encode_and_reorder(packed)


def _check_scales(scales: Tensor) -> None:
    op = "convert_bf16_scales_to_fp8"
    check_dtype(op, "scales", scales, torch.bfloat16)
    check_min_rank(op, "scales", scales, 2, "[..., N, K // group_size] bf16 group scales")
    check_contiguous(op, "scales", scales)
    if scales.shape[-1] == 0:
        fail(op, "scales has 0 groups in its last dim; K // group_size must be >= 1")


@torch.library.custom_op("w4a8::convert_bf16_scales_to_fp8", mutates_args=())
def convert_bf16_scales_to_fp8(scales: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 [..., G_count] -> (fp8 [..., G_count], fp32 [..., 1]): vLLM's contract, bit for bit."""
    raise NotImplementedError(f"w4a8::convert_bf16_scales_to_fp8 has no kernel for {scales.device}")


@convert_bf16_scales_to_fp8.register_fake
def _(scales: Tensor) -> tuple[Tensor, Tensor]:
    _check_scales(scales)
    chan_shape = tuple(scales.shape[:-1]) + (1,)
    return scales.new_empty(scales.shape, dtype=FP8), scales.new_empty(chan_shape, dtype=torch.float32)


@convert_bf16_scales_to_fp8.register_kernel("cpu")
def _(scales: Tensor) -> tuple[Tensor, Tensor]:
    _check_scales(scales)
    return formats.convert_bf16_scales_to_fp8(scales)


@convert_bf16_scales_to_fp8.register_kernel("cuda")
def _(scales: Tensor) -> tuple[Tensor, Tensor]:
    _check_scales(scales)
    return _launcher("scale_convert").convert_bf16_scales_to_fp8(scales)


# ============================================================================================
# Activation quantization
# ============================================================================================
def _check_activations(op: str, x: Tensor, layout: str) -> None:
    check_dtype(op, "x", x, torch.bfloat16)
    check_rank(op, "x", x, 2, layout)
    check_contiguous(op, "x", x)


@torch.library.custom_op("w4a8::quantize_fp8_per_token", mutates_args=())
def quantize_fp8_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 [T, K] -> (fp8 [T, K], fp32 [T, 1]); scale = max(amax_row / 448, 1 / (448 * 512))."""
    raise NotImplementedError(f"w4a8::quantize_fp8_per_token has no kernel for {x.device}")


@quantize_fp8_per_token.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_activations("quantize_fp8_per_token", x, "[T, K] bf16 tokens")
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@quantize_fp8_per_token.register_kernel("cpu")
def _quantize_fp8_per_token_cpu(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_activations("quantize_fp8_per_token", x, "[T, K] bf16 tokens")
    return formats.quantize_fp8_per_token(x)


@quantize_fp8_per_token.register_kernel("cuda")
def _quantize_fp8_per_token_cuda(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_activations("quantize_fp8_per_token", x, "[T, K] bf16 tokens")
    return _launcher("fp8_quant").quantize_fp8_per_token(x)


@torch.library.custom_op("w4a8::silu_mul_quantize_fp8", mutates_args=())
def silu_mul_quantize_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """bf16 [R, 2I] -> fp8 [R, I], fp32 [R, 1] of silu(x[:, :I]) * x[:, I:] (fp32 math)."""
    raise NotImplementedError(f"w4a8::silu_mul_quantize_fp8 has no kernel for {x.device}")


def _check_silu_mul(x: Tensor) -> None:
    _check_activations("silu_mul_quantize_fp8", x, "[R, 2 * I] bf16 gate|up rows")
    if x.shape[1] % 2:
        fail("silu_mul_quantize_fp8", f"x has {x.shape[1]} columns; it must be even ([gate | up])")


@silu_mul_quantize_fp8.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_silu_mul(x)
    return (x.new_empty((x.shape[0], x.shape[1] // 2), dtype=FP8),
            x.new_empty((x.shape[0], 1), dtype=torch.float32))


@silu_mul_quantize_fp8.register_kernel("cpu")
def _silu_mul_quantize_fp8_cpu(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_silu_mul(x)
    return reference.silu_mul_quantize_fp8(x)


@silu_mul_quantize_fp8.register_kernel("cuda")
def _silu_mul_quantize_fp8_cuda(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_silu_mul(x)
    return _launcher("silu_mul_quant").silu_mul_quantize_fp8(x)


# ============================================================================================
# Grouped GEMM
# ============================================================================================
def _check_gemm_weights(op: str, w: Tensor, w_scale: Tensor, w_chan_scale: Tensor | None, K: int,
                        group_size: int, x_name: str, w_layout: str) -> tuple[int, int]:
    """The weight side of the GEMM ops (grouped_gemm, linear): w in the GEMM layout sharing K with
    the activations `x_name`, its group scales (and channel scales in fp8 mode). Returns (E, N)."""
    check_dtype(op, "w", w, formats.gemm_layout_dtype())
    check_rank(op, "w", w, 3, w_layout)
    check_contiguous(op, "w", w)
    E, N, words = w.shape
    if words * formats.NIBBLES_PER_WORD != K:
        fail(op, f"{x_name} has K={K} but w holds K={words * formats.NIBBLES_PER_WORD} "
                 f"(w.shape[2] * 8); activations and weights must share K")
    if problem := formats.group_size_problem(group_size, K):
        fail(op, problem)
    if w_chan_scale is None:
        check_dtype(op, "w_scale", w_scale, torch.bfloat16)
    else:
        check_dtype(op, "w_scale", w_scale, FP8)
        check_dtype(op, "w_chan_scale", w_chan_scale, torch.float32)
        check_shape(op, "w_chan_scale", w_chan_scale, (E, N, 1), f"[{E}, N, 1] fp32 channel scales")
        check_contiguous(op, "w_chan_scale", w_chan_scale)
    check_shape(op, "w_scale", w_scale, (E, N, K // group_size), f"[{E}, N, K // group_size] group scales")
    check_contiguous(op, "w_scale", w_scale)
    return E, N


def _check_grouped_gemm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor,
                        w_chan_scale: Tensor | None, expert_offsets: Tensor, group_size: int) -> None:
    op = "grouped_gemm"
    check_dtype(op, "a", a, FP8)
    check_rank(op, "a", a, 2, "[R, K] fp8 rows sorted by expert")
    check_contiguous(op, "a", a)
    check_dtype(op, "a_scale", a_scale, torch.float32)
    check_dtype(op, "expert_offsets", expert_offsets, torch.int64)
    check_same_device(op, a=a, a_scale=a_scale, w=w, w_scale=w_scale, w_chan_scale=w_chan_scale,
                      expert_offsets=expert_offsets)
    R, K = a.shape
    E, _ = _check_gemm_weights(op, w, w_scale, w_chan_scale, K, group_size, "a",
                               "[E, N, K // 8] from w4a8::encode_and_reorder_int4b_grouped")
    check_shape(op, "a_scale", a_scale, (R, 1), "[R, 1] fp32 per-row scales")
    check_contiguous(op, "a_scale", a_scale)
    check_shape(op, "expert_offsets", expert_offsets, (E + 1,), "[E + 1] int64 cumulative row offsets")


def _check_offset_values(op: str, offsets: Tensor, total: int, what: str = "rows") -> None:
    if not value_checks_enabled(offsets):
        return
    off = offsets.cpu()
    if off.numel() and int(off[0]) != 0:
        fail(op, f"expert_offsets[0] must be 0, got {int(off[0])}")
    if off.numel() and int(off[-1]) != total:
        fail(op, f"expert_offsets[-1] must equal the number of {what} ({total}), got {int(off[-1])}")
    if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
        fail(op, "expert_offsets must be non-decreasing (cumulative row counts per expert)")


@torch.library.custom_op("w4a8::grouped_gemm", mutates_args=())
def grouped_gemm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, w_chan_scale: Tensor | None,
                 expert_offsets: Tensor, group_size: int) -> Tensor:
    """out[r, n] = a_scale[r] * chan[e, n] * sum_g s[e, n, g] * sum_{k in g} a[r, k] * q[e, n, k]."""
    raise NotImplementedError(f"w4a8::grouped_gemm has no kernel for {a.device}")


@grouped_gemm.register_fake
def _(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size):
    _check_grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size)
    return a.new_empty((a.shape[0], w.shape[1]), dtype=torch.bfloat16)


@grouped_gemm.register_kernel("cpu")
def _grouped_gemm_cpu(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size):
    _check_grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size)
    _check_offset_values("grouped_gemm", expert_offsets, a.shape[0])
    return grouped_gemm_cpu_math(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size)


def grouped_gemm_cpu_math(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size):
    """The CPU kernel of w4a8::grouped_gemm without its checks."""
    q = formats.decode_gemm_layout(w)
    return reference.grouped_gemm(a, a_scale, q, w_scale, w_chan_scale, expert_offsets,
                                  group_size).to(torch.bfloat16)


@grouped_gemm.register_kernel("cuda")
def _grouped_gemm_cuda(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size):
    _check_grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size)
    _check_offset_values("grouped_gemm", expert_offsets, a.shape[0])
    return _launcher("grouped_gemm").grouped_gemm(a, a_scale, w, w_scale, w_chan_scale,
                                                  expert_offsets, group_size)


# ============================================================================================
# MoE plumbing: routing, sort by expert, gather, combine
# ============================================================================================
def _check_select_experts(router_logits, correction_bias, top_k, scoring, n_group, topk_group,
                          op="select_experts"):
    check_dtype(op, "router_logits", router_logits, torch.bfloat16, torch.float16, torch.float32)
    check_rank(op, "router_logits", router_logits, 2, "[T, E] router logits")
    E = router_logits.shape[1]
    if scoring not in SCORING_FUNCTIONS:
        fail(op, f"scoring={scoring!r} is not supported; use one of {SCORING_FUNCTIONS}")
    if not 1 <= top_k <= E:
        fail(op, f"top_k={top_k} must be in [1, E={E}]")
    if correction_bias is not None:
        check_dtype(op, "correction_bias", correction_bias, torch.float32, torch.bfloat16)
        check_shape(op, "correction_bias", correction_bias, (E,), "[E] e_score_correction_bias")
        check_same_device(op, router_logits=router_logits, correction_bias=correction_bias)
    if n_group:
        if E % n_group:
            fail(op, f"E={E} is not a multiple of n_group={n_group}")
        if not 1 <= topk_group <= n_group:
            fail(op, f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        if top_k > topk_group * (E // n_group):
            fail(op, f"top_k={top_k} exceeds the experts in the {topk_group} selected groups")


@torch.library.custom_op("w4a8::select_experts", mutates_args=())
def select_experts(router_logits: Tensor, correction_bias: Tensor | None, top_k: int, scoring: str,
                   renormalize: bool, n_group: int, topk_group: int,
                   routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    """[T, E] logits -> (fp32 [T, top_k] weights, int32 [T, top_k] expert ids); vLLM FusedMoE routing.

    n_group = 0 means no grouped top-k.
    """
    raise NotImplementedError(f"w4a8::select_experts has no kernel for {router_logits.device}")


@select_experts.register_fake
def _(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor):
    _check_select_experts(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.float32),
            router_logits.new_empty((T, top_k), dtype=torch.int32))


@select_experts.register_kernel("cpu")
def _select_experts_cpu(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor):
    _check_select_experts(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    return reference.select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                    n_group, topk_group, routed_scaling_factor)


@select_experts.register_kernel("cuda")
def _select_experts_cuda(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor):
    _check_select_experts(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    return _launcher("routing").select_experts(router_logits, correction_bias, top_k, scoring,
                                               renormalize, n_group, topk_group, routed_scaling_factor)


def _check_pairs_fit_int32(op: str, T, top_k) -> None:
    """Sorted positions are int32: T * top_k pairs must stay below 2^31. Checked where T is a
    number; a symbolic T (export with an unbounded token dim) is not constrained by it."""
    if isinstance(T, int) and T * top_k >= 2**31:
        fail(op, f"T * top_k = {T * top_k} (token, slot) pairs do not fit int32 sorted positions; "
                 f"split the batch into chunks of fewer than {2**31 // top_k} tokens")


def _check_select_and_sort(router_logits, correction_bias, top_k, scoring, n_group, topk_group):
    _check_select_experts(router_logits, correction_bias, top_k, scoring, n_group, topk_group,
                          op="select_and_sort_experts")
    _check_pairs_fit_int32("select_and_sort_experts", router_logits.shape[0], top_k)


@torch.library.custom_op("w4a8::select_and_sort_experts", mutates_args=())
def select_and_sort_experts(router_logits: Tensor, correction_bias: Tensor | None, top_k: int,
                            scoring: str, renormalize: bool, n_group: int, topk_group: int,
                            routed_scaling_factor: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """select_experts then sort_by_expert over E = router_logits.shape[1] experts, in one op:
    (weights, ids, sorted_rows, flat_to_sorted, expert_offsets). On CUDA a single token (decode)
    is routed and sorted by one kernel."""
    raise NotImplementedError(f"w4a8::select_and_sort_experts has no kernel for {router_logits.device}")


@select_and_sort_experts.register_fake
def _(router_logits, correction_bias, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor):
    _check_select_and_sort(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    T, E = router_logits.shape
    i32 = dict(dtype=torch.int32)
    return (router_logits.new_empty((T, top_k), dtype=torch.float32), router_logits.new_empty((T, top_k), **i32),
            router_logits.new_empty((T * top_k,), **i32), router_logits.new_empty((T, top_k), **i32),
            router_logits.new_empty((E + 1,), dtype=torch.int64))


@select_and_sort_experts.register_kernel("cpu")
def _select_and_sort_experts_cpu(router_logits, correction_bias, top_k, scoring, renormalize, n_group,
                                 topk_group, routed_scaling_factor):
    _check_select_and_sort(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    return select_and_sort_cpu_math(router_logits, correction_bias, top_k, scoring, renormalize, n_group,
                                    topk_group, routed_scaling_factor)


def select_and_sort_cpu_math(router_logits, correction_bias, top_k, scoring, renormalize, n_group,
                             topk_group, routed_scaling_factor):
    """The CPU kernel of w4a8::select_and_sort_experts without its checks."""
    weights, ids = reference.select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                            n_group, topk_group, routed_scaling_factor)
    return (weights, ids, *reference.sort_by_expert(ids, router_logits.shape[1]))


@select_and_sort_experts.register_kernel("cuda")
def _select_and_sort_experts_cuda(router_logits, correction_bias, top_k, scoring, renormalize, n_group,
                                  topk_group, routed_scaling_factor):
    _check_select_and_sort(router_logits, correction_bias, top_k, scoring, n_group, topk_group)
    return _launcher("routing").select_and_sort_experts(router_logits, correction_bias, top_k, scoring,
                                                        renormalize, n_group, topk_group,
                                                        routed_scaling_factor)


def _check_sort(topk_ids: Tensor, num_experts: int) -> None:
    op = "sort_by_expert"
    check_dtype(op, "topk_ids", topk_ids, torch.int32)
    check_rank(op, "topk_ids", topk_ids, 2, "[T, top_k] expert ids")
    check_contiguous(op, "topk_ids", topk_ids)
    if num_experts < 1:
        fail(op, f"num_experts={num_experts} must be >= 1")
    _check_pairs_fit_int32(op, topk_ids.shape[0], topk_ids.shape[1])
    if value_checks_enabled(topk_ids) and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            fail(op, f"topk_ids holds expert ids in [{lo}, {hi}], outside [0, {num_experts})")


@torch.library.custom_op("w4a8::sort_by_expert", mutates_args=())
def sort_by_expert(topk_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """[T, k] ids -> (sorted_rows int32 [T*k], flat_to_sorted int32 [T, k], expert_offsets int64 [E+1]).

    sorted_rows[r] is the flat index t * k + j of the (token, slot) that sorted row r holds, rows
    grouped by expert in ascending order, stable within an expert; flat_to_sorted is its inverse.
    """
    raise NotImplementedError(f"w4a8::sort_by_expert has no kernel for {topk_ids.device}")


@sort_by_expert.register_fake
def _(topk_ids, num_experts):
    _check_sort(topk_ids, num_experts)
    return (topk_ids.new_empty((topk_ids.numel(),), dtype=torch.int32),
            topk_ids.new_empty(topk_ids.shape, dtype=torch.int32),
            topk_ids.new_empty((num_experts + 1,), dtype=torch.int64))


@sort_by_expert.register_kernel("cpu")
def _sort_by_expert_cpu(topk_ids, num_experts):
    _check_sort(topk_ids, num_experts)
    return reference.sort_by_expert(topk_ids, num_experts)


@sort_by_expert.register_kernel("cuda")
def _sort_by_expert_cuda(topk_ids, num_experts):
    _check_sort(topk_ids, num_experts)
    return _launcher("moe_sort").sort_by_expert(topk_ids, num_experts)


def _check_gather(xq: Tensor, x_scale: Tensor, sorted_rows: Tensor, top_k: int) -> None:
    op = "gather_rows_fp8"
    check_dtype(op, "xq", xq, FP8)
    check_rank(op, "xq", xq, 2, "[T, K] fp8 tokens")
    check_contiguous(op, "xq", xq)
    check_dtype(op, "x_scale", x_scale, torch.float32)
    check_shape(op, "x_scale", x_scale, (xq.shape[0], 1), "[T, 1] fp32")
    check_dtype(op, "sorted_rows", sorted_rows, torch.int32)
    check_shape(op, "sorted_rows", sorted_rows, (xq.shape[0] * top_k,), "[T * top_k] int32")
    check_same_device(op, xq=xq, x_scale=x_scale, sorted_rows=sorted_rows)
    if top_k < 1:
        fail(op, f"top_k={top_k} must be >= 1")


@torch.library.custom_op("w4a8::gather_rows_fp8", mutates_args=())
def gather_rows_fp8(xq: Tensor, x_scale: Tensor, sorted_rows: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """a[r] = xq[sorted_rows[r] // top_k], with its scale: the GEMM's expert-sorted input rows."""
    raise NotImplementedError(f"w4a8::gather_rows_fp8 has no kernel for {xq.device}")


@gather_rows_fp8.register_fake
def _(xq, x_scale, sorted_rows, top_k):
    _check_gather(xq, x_scale, sorted_rows, top_k)
    R = sorted_rows.shape[0]
    return xq.new_empty((R, xq.shape[1])), x_scale.new_empty((R, 1))


@gather_rows_fp8.register_kernel("cpu")
def _gather_rows_fp8_cpu(xq, x_scale, sorted_rows, top_k):
    _check_gather(xq, x_scale, sorted_rows, top_k)
    return reference.gather_rows_fp8(xq, x_scale, sorted_rows, top_k)


@gather_rows_fp8.register_kernel("cuda")
def _gather_rows_fp8_cuda(xq, x_scale, sorted_rows, top_k):
    _check_gather(xq, x_scale, sorted_rows, top_k)
    return _launcher("moe_gather").gather_rows_fp8(xq, x_scale, sorted_rows, top_k)


def _check_quantize_scatter(x: Tensor, flat_to_sorted: Tensor) -> None:
    op = "quantize_scatter_fp8"
    _check_activations(op, x, "[T, K] bf16 tokens")
    check_dtype(op, "flat_to_sorted", flat_to_sorted, torch.int32)
    check_rank(op, "flat_to_sorted", flat_to_sorted, 2, "[T, top_k] int32 from w4a8::sort_by_expert")
    check_contiguous(op, "flat_to_sorted", flat_to_sorted)
    check_same_device(op, x=x, flat_to_sorted=flat_to_sorted)
    T, top_k = flat_to_sorted.shape
    if T != x.shape[0]:
        fail(op, f"flat_to_sorted has {T} rows but x has {x.shape[0]} tokens; they must match")
    if top_k < 1:
        fail(op, "flat_to_sorted has 0 columns; it must hold top_k >= 1 sorted rows per token")
    if value_checks_enabled(flat_to_sorted) and flat_to_sorted.numel():
        seen = torch.sort(flat_to_sorted.reshape(-1).cpu()).values
        if not torch.equal(seen, torch.arange(seen.numel(), dtype=torch.int32)):
            fail(op, f"flat_to_sorted must be a permutation of [0, T * top_k) = [0, {seen.numel()}) "
                     f"(as w4a8::sort_by_expert returns); some rows would be written twice or never")


@torch.library.custom_op("w4a8::quantize_scatter_fp8", mutates_args=())
def quantize_scatter_fp8(x: Tensor, flat_to_sorted: Tensor) -> tuple[Tensor, Tensor]:
    """Row flat_to_sorted[t, j] of the fp8 [T * top_k, K] output (and of its fp32 [T * top_k, 1]
    scales) is token t quantized per token: quantize_fp8_per_token then gather_rows_fp8, in one
    kernel. flat_to_sorted must be a permutation (positions are clamped; rows that no pair points
    at are unspecified: zero on CPU)."""
    raise NotImplementedError(f"w4a8::quantize_scatter_fp8 has no kernel for {x.device}")


@quantize_scatter_fp8.register_fake
def _(x, flat_to_sorted):
    _check_quantize_scatter(x, flat_to_sorted)
    R = flat_to_sorted.numel()
    return x.new_empty((R, x.shape[1]), dtype=FP8), x.new_empty((R, 1), dtype=torch.float32)


@quantize_scatter_fp8.register_kernel("cpu")
def _quantize_scatter_fp8_cpu(x, flat_to_sorted):
    _check_quantize_scatter(x, flat_to_sorted)
    return reference.quantize_scatter_fp8(x, flat_to_sorted)


@quantize_scatter_fp8.register_kernel("cuda")
def _quantize_scatter_fp8_cuda(x, flat_to_sorted):
    _check_quantize_scatter(x, flat_to_sorted)
    return _launcher("quantize_scatter").quantize_scatter_fp8(x, flat_to_sorted)


def _check_combine(y: Tensor, flat_to_sorted: Tensor, topk_weights: Tensor) -> None:
    op = "combine"
    check_dtype(op, "y", y, torch.bfloat16)
    check_rank(op, "y", y, 2, "[T * top_k, H] expert outputs, sorted by expert")
    check_contiguous(op, "y", y)
    check_dtype(op, "flat_to_sorted", flat_to_sorted, torch.int32)
    check_rank(op, "flat_to_sorted", flat_to_sorted, 2, "[T, top_k] int32")
    check_dtype(op, "topk_weights", topk_weights, torch.float32)
    check_shape(op, "topk_weights", topk_weights, tuple(flat_to_sorted.shape), "[T, top_k] fp32")
    check_same_device(op, y=y, flat_to_sorted=flat_to_sorted, topk_weights=topk_weights)
    if y.shape[0] != flat_to_sorted.numel():
        fail(op, f"y has {y.shape[0]} rows but flat_to_sorted holds {flat_to_sorted.numel()} "
                 f"(T * top_k); they must match")


@torch.library.custom_op("w4a8::combine", mutates_args=())
def combine(y: Tensor, flat_to_sorted: Tensor, topk_weights: Tensor) -> Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[flat_to_sorted[t, j]] in fp32, stored bf16 [T, H]."""
    raise NotImplementedError(f"w4a8::combine has no kernel for {y.device}")


@combine.register_fake
def _(y, flat_to_sorted, topk_weights):
    _check_combine(y, flat_to_sorted, topk_weights)
    return y.new_empty((flat_to_sorted.shape[0], y.shape[1]))


@combine.register_kernel("cpu")
def _combine_cpu(y, flat_to_sorted, topk_weights):
    _check_combine(y, flat_to_sorted, topk_weights)
    return combine_cpu_math(y, flat_to_sorted, topk_weights)


def combine_cpu_math(y, flat_to_sorted, topk_weights):
    """The CPU kernel of w4a8::combine without its checks."""
    return reference.combine(y, flat_to_sorted, topk_weights).to(torch.bfloat16)


@combine.register_kernel("cuda")
def _combine_cuda(y, flat_to_sorted, topk_weights):
    _check_combine(y, flat_to_sorted, topk_weights)
    return _launcher("moe_combine").combine(y, flat_to_sorted, topk_weights)


# ============================================================================================
# W4A8 linear: the grouped GEMM with one expert (inductor_w4a8.linear.W4A8Linear)
# ============================================================================================
def _check_linear(x: Tensor, w: Tensor, w_scale: Tensor, w_chan_scale: Tensor | None,
                  group_size: int) -> None:
    op = "linear"
    check_dtype(op, "x", x, torch.bfloat16)
    check_rank(op, "x", x, 2, "[T, K] bf16 tokens")
    check_contiguous(op, "x", x)
    check_same_device(op, x=x, w=w, w_scale=w_scale, w_chan_scale=w_chan_scale)
    if w.dim() == 3 and w.shape[0] != 1:
        fail(op, f"w holds {w.shape[0]} experts; a linear layer's weight is one [1, N, K // 8] matrix")
    _check_gemm_weights(op, w, w_scale, w_chan_scale, x.shape[1], group_size, "x",
                        "[1, N, K // 8] from w4a8::encode_and_reorder_int4b_grouped")


def _single_expert_offsets(T: int, device) -> Tensor:
    # [0, T] made on the device from the shape: no host-to-device copy, so capture-safe
    return torch.arange(2, dtype=torch.int64, device=device) * T


@torch.library.custom_op("w4a8::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, w_scale: Tensor, w_chan_scale: Tensor | None, group_size: int) -> Tensor:
    """bf16 [T, K] -> bf16 [T, N]: x quantized to fp8 per token, times the int4 weight with its
    group scales (and channel scales in fp8 mode), fp32 accumulation; `grouped_gemm` with E = 1."""
    raise NotImplementedError(f"w4a8::linear has no kernel for {x.device}")


@linear.register_fake
def _(x, w, w_scale, w_chan_scale, group_size):
    _check_linear(x, w, w_scale, w_chan_scale, group_size)
    return x.new_empty((x.shape[0], w.shape[1]), dtype=torch.bfloat16)


@linear.register_kernel("cpu")
def _(x, w, w_scale, w_chan_scale, group_size):
    _check_linear(x, w, w_scale, w_chan_scale, group_size)
    xq, x_scale = formats.quantize_fp8_per_token(x)
    return grouped_gemm_cpu_math(xq, x_scale, w, w_scale, w_chan_scale,
                                 _single_expert_offsets(x.shape[0], x.device), group_size)


def linear_triton(x: Tensor, w: Tensor, w_scale: Tensor, w_chan_scale: Tensor | None, group_size: int) -> Tensor:
    """The Triton path of w4a8::linear (CUDA, or CPU under TRITON_INTERPRET=1): the fp8 quantizer
    and the grouped GEMM launchers, no host synchronization. Inputs already checked."""
    if x.shape[0] == 0:
        return x.new_empty((0, w.shape[1]), dtype=torch.bfloat16)
    xq, x_scale = _launcher("fp8_quant").quantize_fp8_per_token(x)
    return _launcher("grouped_gemm").grouped_gemm(xq, x_scale, w, w_scale, w_chan_scale,
                                                  _single_expert_offsets(x.shape[0], x.device), group_size)


@linear.register_kernel("cuda")
def _(x, w, w_scale, w_chan_scale, group_size):
    _check_linear(x, w, w_scale, w_chan_scale, group_size)
    return linear_triton(x, w, w_scale, w_chan_scale, group_size)


# every op with a floating input (the others cannot be handed a tensor that requires grad)
for _name in ("convert_bf16_scales_to_fp8", "quantize_fp8_per_token", "silu_mul_quantize_fp8",
              "grouped_gemm", "select_experts", "select_and_sort_experts", "gather_rows_fp8",
              "quantize_scatter_fp8", "combine", "linear"):
    _inference_only(globals()[_name], _name)
