"""Per-token fp8 quantization fused with the scatter into expert-sorted rows.

bf16 x [T, K] and flat_to_sorted int32 [T, top_k] -> fp8 a [T * top_k, K], fp32 a_scale [T * top_k]:
row flat_to_sorted[t, j] of a is token t quantized (the math of `formats.quantize_fp8_per_token`,
bit for bit), so a is what `gather_rows_fp8(quantize_fp8_per_token(x), sorted_rows, top_k)` gives,
without the [T, K] intermediate: x is read once and each row is written top_k times, where the
two kernels read x, write it quantized, then read that top_k times and write it again.

One program per token. With ONE_TILE (K <= BLOCK_K) the row is read once and kept in registers
(one memory latency, not one per chunk and pass: at a few tokens that latency is the kernel's
time); otherwise two passes over K in BLOCK_K chunks (amax, then quantize and store to the top_k
rows; the second read of the row hits L2). Positions are clamped into [0, T * top_k) and
offsets are int64, so no value of flat_to_sorted can address memory out of bounds.
"""
import triton
import triton.language as tl

from .fp8 import bf16_row_fp8_scale, bf16_row_to_fp8_one_tile, quantize_e4m3_bits
from .rows import clamped_row
from .pdl import wait_for_prior_kernels


@triton.jit
def _sorted_row(f2s_ptr, pair, R):
    """Sorted row of flat pair index `pair`, clamped into [0, R), as int64."""
    return clamped_row(tl.load(f2s_ptr + pair), R)


@triton.jit
def quantize_scatter_fp8_kernel(x_ptr, f2s_ptr, a_ptr, a_scale_ptr, K, R, top_k,
                                MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, HW: tl.constexpr,
                                ONE_TILE: tl.constexpr, PDL: tl.constexpr = False):
    # top_k is a runtime loop bound, not unrolled: any top_k (up to E) compiles once, quickly
    wait_for_prior_kernels(PDL)
    t = tl.program_id(0).to(tl.int64)
    x_base = t * K
    if ONE_TILE:
        cols, mask, q, scale = bf16_row_to_fp8_one_tile(x_ptr, x_base, K, MIN_SCALE, BLOCK_K, HW)
        for j in range(top_k):
            row = _sorted_row(f2s_ptr, t * top_k + j, R)
            tl.store(a_scale_ptr + row, scale)
            tl.store(a_ptr + row * K + cols, q, mask=mask)
        return
    scale = bf16_row_fp8_scale(x_ptr, x_base, K, MIN_SCALE, BLOCK_K)
    for j in range(top_k):
        tl.store(a_scale_ptr + _sorted_row(f2s_ptr, t * top_k + j, R), scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = cols < K
        v = tl.load(x_ptr + x_base + cols, mask=mask, other=0.0).to(tl.float32)
        q = quantize_e4m3_bits(v, scale, HW)
        for j in range(top_k):
            row = _sorted_row(f2s_ptr, t * top_k + j, R)
            tl.store(a_ptr + row * K + cols, q, mask=mask)
