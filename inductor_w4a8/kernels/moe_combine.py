"""Weighted combine of the expert outputs: out[t] = sum_j w[t, j] * y[flat_to_sorted[t, j]].

One program per [BLOCK_T, BLOCK_H] tile of the output; each gathers its top_k rows (no atomics,
fixed order j = 0..top_k-1, so the result is deterministic). The products of an fp32 weight and a
bf16 value are exact in fp64 and the sum runs in fp64, so fused multiply-adds cannot change a bit:
the result, rounded once to fp32 and then to bf16, is the same on every device and equals
`reference.combine(...).to(torch.bfloat16)`. Row indices are clamped into [0, R); offsets int64.
"""
import triton
import triton.language as tl

from .bf16 import fp32_to_bf16
from .rows import clamped_row
from .pdl import wait_for_prior_kernels


@triton.jit
def combine_kernel(y_ptr, f2s_ptr, w_ptr, out_ptr, T, H, R, TOP_K: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HW: tl.constexpr,
                   PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = t < T
    mask = t_ok[:, None] & (h < H)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float64)
    for j in tl.static_range(TOP_K):
        r = tl.load(f2s_ptr + t * TOP_K + j, mask=t_ok, other=0)
        r = clamped_row(r, R)
        w = tl.load(w_ptr + t * TOP_K + j, mask=t_ok, other=0.0).to(tl.float64)
        y = tl.load(y_ptr + r[:, None] * H + h[None, :], mask=mask, other=0.0)
        acc += w[:, None] * y.to(tl.float64)
    out = fp32_to_bf16(acc.to(tl.float32), HW)
    tl.store(out_ptr + t[:, None] * H + h[None, :], out, mask=mask)
