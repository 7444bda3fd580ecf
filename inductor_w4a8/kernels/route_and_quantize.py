"""One token's routing, sort and fp8 dispatch in one program (decode): what
`routing_kernel` with SORT_ONE_TOKEN and then `quantize_scatter_fp8_kernel` write, bit for bit,
in one launch instead of two.

The token's hidden row is loaded whole (one tile of BLOCK_X >= K columns) before the router
runs, so its load overlaps the router's; its fp8 scale is the same max-and-divide as
quantize_scatter's (a max is exact in any order), and its quantized values are stored to the
TOP_K sorted rows the sort gives, each in [0, TOP_K) by construction.
"""
import triton
import triton.language as tl

from .fp8 import fp8_row_scale, quantize_e4m3_bits
from .moe_sort import sort_one_token
from .pdl import wait_for_prior_kernels
from .routing import route_token


@triton.jit
def route_and_quantize_one_token_kernel(
        logits_ptr, bias_ptr, x_ptr, weights_ptr, ids_ptr, sorted_rows_ptr, flat_to_sorted_ptr,
        offsets_ptr, a_ptr, a_scale_ptr, E, n_group, group_len, topk_group, scaling, K,
        TOP_K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GL: tl.constexpr,
        BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
        GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E1: tl.constexpr,
        MIN_SCALE: tl.constexpr, BLOCK_X: tl.constexpr, HW: tl.constexpr,
        PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    cols = tl.arange(0, BLOCK_X)
    cmask = cols < K
    v = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    top_w, top_id = route_token(logits_ptr, bias_ptr, 0, 0, E, n_group, group_len, topk_group,
                                scaling, TOP_K, BLOCK_G, BLOCK_GL, BLOCK_K, SOFTMAX, HAS_BIAS,
                                GROUPED, RENORMALIZE)
    kk = tl.arange(0, BLOCK_K)
    tl.store(weights_ptr + kk, top_w, mask=kk < TOP_K)
    tl.store(ids_ptr + kk, top_id, mask=kk < TOP_K)
    pos = sort_one_token(top_id, sorted_rows_ptr, flat_to_sorted_ptr, offsets_ptr, E, TOP_K,
                         BLOCK_K, BLOCK_E1)
    scale = fp8_row_scale(tl.max(tl.abs(v), axis=0), tl.sum((v != v).to(tl.int32), axis=0),
                          MIN_SCALE)
    tl.store(a_scale_ptr + pos, tl.full([BLOCK_K], 0.0, tl.float32) + scale, mask=kk < TOP_K)
    q = quantize_e4m3_bits(v, scale, HW)
    for j in tl.static_range(TOP_K):
        row = tl.sum(tl.where(kk == j, pos, 0), axis=0).to(tl.int64)
        tl.store(a_ptr + row * K + cols, q, mask=cmask)
