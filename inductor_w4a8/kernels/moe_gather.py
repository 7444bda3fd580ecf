"""Gather of the expert-sorted GEMM input rows: a[r] = xq[sorted_rows[r] // top_k] and its scale.

fp8 rows travel as raw words (the launcher views them as int32 when K % 4 == 0, else uint8), so the
copy is bit exact. One program copies a [BLOCK_R, BLOCK_K] tile; source rows are clamped into
[0, T), so no value of sorted_rows can address memory out of bounds; offsets are int64.
"""
import triton
import triton.language as tl

from .rows import clamped_row
from .pdl import wait_for_prior_kernels


@triton.jit
def gather_rows_kernel(xq_ptr, xs_ptr, rows_ptr, a_ptr, as_ptr, R, T, K, top_k,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """xq [T, K] words, xs fp32 [T], rows int32 [R] -> a [R, K] words, as fp32 [R]."""
    wait_for_prior_kernels(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    src = tl.load(rows_ptr + r, mask=r_ok, other=0) // top_k
    src = clamped_row(src, T)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = r_ok[:, None] & (k < K)[None, :]
    v = tl.load(xq_ptr + src[:, None] * K + k[None, :], mask=mask)
    tl.store(a_ptr + r[:, None] * K + k[None, :], v, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(as_ptr + r, tl.load(xs_ptr + src, mask=r_ok), mask=r_ok)
