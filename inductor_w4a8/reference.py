"""The MoE math in pure torch, fp32/fp64: what every kernel is checked against.

These functions take plain tensors (no layout tricks beyond `formats`), run on any device, and
make no attempt to be fast. The CPU kernels of the ops call them too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import formats


def grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor,
                 w_chan_scale: torch.Tensor | None, expert_offsets: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """fp64 [R, N]: out[r, n] = a_scale[r] * sum_k a[r, k] * q[e, n, k] * s_eff[e, n, k // G].

    `q` is int8 [E, N, K] in natural K order (decode the GEMM layout first). s_eff is the bf16
    group scale (exact mode) or the fp8 group scale times the fp32 channel scale (fp8 mode), the
    product taken in fp64: exact, so this is the exact product of the op's own inputs up to fp64
    summation.
    """
    E, N, K = q.shape
    R = a.shape[0]
    out = torch.zeros((R, N), dtype=torch.float64, device=a.device)
    offsets = [min(max(int(o), 0), R) for o in expert_offsets.tolist()]
    s = formats.effective_group_scales(w_scale, w_chan_scale, dtype=torch.float64)
    for e in range(E):
        start, end = offsets[e], max(offsets[e + 1], offsets[e])
        if end <= start:
            continue
        w = formats.dequantize_w4(q[e], s[e], group_size, dtype=torch.float64)
        out[start:end] = (a[start:end].double() @ w.T) * a_scale[start:end].double()
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """fp32 silu(x[:, :I]) * x[:, I:]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half].float()) * x[..., half:].float()


def silu_mul_quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return formats.quantize_fp8_per_token(silu_mul(x))


def select_experts(router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int,
                   scoring: str, renormalize: bool, n_group: int, topk_group: int,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM FusedMoE routing -> (fp32 [T, k] weights, int32 [T, k] ids).

    The bias (sigmoid scoring) changes which experts are chosen, never their weights.
    """
    logits = router_logits.float()
    T, E = logits.shape
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group:
        per_group = choice.view(T, n_group, E // n_group)
        if correction_bias is not None:
            group_scores = per_group.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
        else:
            group_scores = per_group.amax(dim=-1)
        groups = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        keep = keep.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~keep, float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (weights * routed_scaling_factor).float(), ids.to(torch.int32)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """Stable counting sort of the (token, slot) pairs by expert id (ids clamped into range)."""
    flat = topk_ids.reshape(-1).long().clamp(0, num_experts - 1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order.to(torch.int32), inverse.view(topk_ids.shape).to(torch.int32), offsets


def gather_rows_fp8(xq: torch.Tensor, x_scale: torch.Tensor, sorted_rows: torch.Tensor, top_k: int):
    tokens = (sorted_rows.long() // top_k).clamp(0, max(xq.shape[0] - 1, 0))
    rows = xq.view(torch.uint8).index_select(0, tokens).view(xq.dtype)
    return rows, x_scale.index_select(0, tokens)


def quantize_scatter_fp8(x: torch.Tensor, flat_to_sorted: torch.Tensor):
    """(fp8 [T * k, K], fp32 [T * k, 1]): row flat_to_sorted[t, j] is token t of x quantized per
    token; with flat_to_sorted from sort_by_expert this is gather_rows_fp8 of the quantized
    tokens. Positions are clamped into [0, T * k); rows no pair points at are zero."""
    xq, x_scale = formats.quantize_fp8_per_token(x)
    T, k = flat_to_sorted.shape
    R = T * k
    rows = flat_to_sorted.long().clamp(0, max(R - 1, 0)).reshape(-1)
    a = torch.zeros((R, x.shape[1]), dtype=torch.uint8, device=x.device)
    a_scale = torch.zeros((R, 1), dtype=torch.float32, device=x.device)
    a.index_copy_(0, rows, xq.view(torch.uint8).repeat_interleave(k, dim=0))
    a_scale.index_copy_(0, rows, x_scale.repeat_interleave(k, dim=0))
    return a.view(formats.FP8_DTYPE), a_scale


def combine(y: torch.Tensor, flat_to_sorted: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """fp32 [T, H]: out[t] = sum_j topk_weights[t, j] * y[flat_to_sorted[t, j]].

    Summed in fp64 in the order j = 0..k-1 and rounded once to fp32: the products of fp32
    weights and bf16 values are exact in fp64, so this is the bit pattern every device's kernel
    gives (fused multiply-adds cannot change it).
    """
    T, k = flat_to_sorted.shape
    idx = flat_to_sorted.long().clamp(0, max(y.shape[0] - 1, 0))
    out = torch.zeros((T, y.shape[1]), dtype=torch.float64, device=y.device)
    for j in range(k):
        out += topk_weights[:, j].double().unsqueeze(-1) * y.index_select(0, idx[:, j]).double()
    return out.float()


def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, w13_q: torch.Tensor,
                w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor, *, top_k: int,
                group_size: int, w13_chan_scale: torch.Tensor | None = None,
                w2_chan_scale: torch.Tensor | None = None, scoring: str = "softmax",
                renormalize: bool = True, n_group: int = 0, topk_group: int = 0,
                routed_scaling_factor: float = 1.0, correction_bias: torch.Tensor | None = None,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None,
                quantize_activations: bool = True, bf16_intermediates: bool = True,
                intermediate: torch.Tensor | None = None, return_intermediate: bool = False):
    """The whole W4A8 MoE block in fp64 (silu * mul in fp32): [T, H] -> fp64 [T, H].

    w13_q int8 [E, 2I, H] and w2_q int8 [E, H, I] in natural K order (`formats.unpack_int4`), with
    their group scales (bf16, or fp8 with fp32 channel scales [E, N, 1]: `formats.
    effective_group_scales`). Steps: routing (`select_experts`, or the given (weights, ids)) ->
    per-token fp8 quantization of the hidden states -> w13 GEMM -> silu(gate) * up -> fp8
    quantization -> w2 GEMM -> sum over the top_k slots of weight * expert output.

    quantize_activations=False skips both fp8 activation quantizations (the weight-only-int4
    answer). bf16_intermediates=True rounds each GEMM output to bf16, where the ops store it, so
    the CPU ops reproduce this up to summation order. Each expert's tokens are found by looping
    over experts: plain, slow and independent of the sort the ops use.

    The intermediate (the w2 GEMM's input, dequantized, [T * top_k, I]) is in expert-sorted order:
    experts ascending, each expert's rows by token, as `sort_by_expert` orders them.
    `intermediate=` replaces the one computed here (to check the second half of a block on the
    first half's own rounding); return_intermediate=True returns (out, h, intermediate), h being
    the w13 GEMM's output [T * top_k, 2I] in the same order.
    """
    T, H = hidden_states.shape
    E = w13_q.shape[0]
    if routing is None:
        routing = select_experts(router_logits, correction_bias, top_k, scoring, renormalize,
                                 n_group, topk_group, routed_scaling_factor)
    weights, ids = routing

    def activations(x: torch.Tensor) -> torch.Tensor:
        if not quantize_activations:
            return x.double()
        q, s = formats.quantize_fp8_per_token(x)
        return q.double() * s.double()

    def rounded(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16) if bf16_intermediates else x

    w13 = w13_q.double() * formats.expand_group_scales(formats.effective_group_scales(
        w13_scale, w13_chan_scale, dtype=torch.float64), group_size, torch.float64)
    w2 = w2_q.double() * formats.expand_group_scales(formats.effective_group_scales(
        w2_scale, w2_chan_scale, dtype=torch.float64), group_size, torch.float64)
    x = activations(hidden_states)
    if intermediate is not None and tuple(intermediate.shape) != (ids.numel(), w2_q.shape[2]):
        raise ValueError(f"intermediate must be [tokens * top_k, I] = [{ids.numel()}, {w2_q.shape[2]}] "
                         f"rows in expert-sorted order, got {list(intermediate.shape)}")
    out = torch.zeros((T, H), dtype=torch.float64, device=hidden_states.device)
    inter_rows, start = [], 0
    for e in range(E):
        tokens, slots = (ids.long() == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = rounded(x[tokens] @ w13[e].T)
        if intermediate is None:
            a2 = activations(silu_mul(h))
        else:
            a2 = intermediate[start:start + tokens.numel()].double()
        start += tokens.numel()
        inter_rows.append((h, a2))
        y = rounded(a2 @ w2[e].T)
        out.index_add_(0, tokens, weights[tokens, slots].double().unsqueeze(-1) * y.double())
    if return_intermediate:
        h_rows = [h for h, _ in inter_rows] or [out.new_zeros((0, w13.shape[1]))]
        a2_rows = [a2 for _, a2 in inter_rows] or [out.new_zeros((0, w2.shape[2]))]
        return out, torch.cat(h_rows).double(), torch.cat(a2_rows)
    return out
