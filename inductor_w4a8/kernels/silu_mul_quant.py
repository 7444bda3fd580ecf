"""silu(gate) * up fused with the per-row fp8 quantization: bf16 [R, 2I] -> fp8 [R, I], fp32 [R, 1].

One program per row. v = silu(g) * u in fp32 with silu(g) = g / (1 + exp(-g)) (IEEE division, as
torch); scale = max(amax(|v|) / 448, 1 / (448 * 512)); q = e4m3(clamp(v / scale, -448, 448)),
the math of `reference.silu_mul_quantize_fp8`. Only exp may differ from torch's by an ulp.

NUM_CHUNKS > 0: the row is read once and kept in registers as NUM_CHUNKS chunks of BLOCK_I
columns (the last one masked). Many rows: one warp a row and 256-column chunks, so I = 1536 wastes
no lanes and the row's reductions stay inside the warp (no barrier). Few rows: one chunk of
next_pow2(I) over several warps, so each row finishes sooner. NUM_CHUNKS = 0 (long rows): a first
loop over I finds amax and a second recomputes v (the row is then in L2) and stores it.
"""
import triton
import triton.language as tl

from .fp8 import fp8_row_scale, quantize_e4m3_bits
from .pdl import wait_for_prior_kernels


@triton.jit
def _silu_mul(x_ptr, row_base, I, cols, mask):
    g = tl.load(x_ptr + row_base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row_base + I + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u


@triton.jit
def _row_in_registers(x_ptr, q_ptr, scale_ptr, x_base, q_base, row, I, MIN_SCALE: tl.constexpr,
                      BLOCK_I: tl.constexpr, NUM_CHUNKS: tl.constexpr, HW: tl.constexpr):
    vs = ()
    amax = tl.zeros([BLOCK_I], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK_I], dtype=tl.int32)
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_I + tl.arange(0, BLOCK_I)
        v = _silu_mul(x_ptr, x_base, I, cols, cols < I)
        amax = tl.maximum(amax, tl.abs(v))
        n_nan += (v != v).to(tl.int32)
        vs = vs + (v,)
    scale = fp8_row_scale(tl.max(amax, axis=0), tl.sum(n_nan, axis=0), MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for c in tl.static_range(NUM_CHUNKS):
        cols = c * BLOCK_I + tl.arange(0, BLOCK_I)
        tl.store(q_ptr + q_base + cols, quantize_e4m3_bits(vs[c], scale, HW), mask=cols < I)


@triton.jit
def _row_in_two_passes(x_ptr, q_ptr, scale_ptr, x_base, q_base, row, I, MIN_SCALE: tl.constexpr,
                       BLOCK_I: tl.constexpr, HW: tl.constexpr):
    amax = tl.zeros([BLOCK_I], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK_I], dtype=tl.int32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        v = _silu_mul(x_ptr, x_base, I, cols, cols < I)
        amax = tl.maximum(amax, tl.abs(v))
        n_nan += (v != v).to(tl.int32)
    scale = fp8_row_scale(tl.max(amax, axis=0), tl.sum(n_nan, axis=0), MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = cols < I
        v = _silu_mul(x_ptr, x_base, I, cols, mask)
        tl.store(q_ptr + q_base + cols, quantize_e4m3_bits(v, scale, HW), mask=mask)


@triton.jit
def silu_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, I, MIN_SCALE: tl.constexpr,
                          BLOCK_I: tl.constexpr, NUM_CHUNKS: tl.constexpr, HW: tl.constexpr,
                          PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_base = row * 2 * I
    q_base = row * I
    if NUM_CHUNKS > 0:
        _row_in_registers(x_ptr, q_ptr, scale_ptr, x_base, q_base, row, I, MIN_SCALE, BLOCK_I,
                          NUM_CHUNKS, HW)
    else:
        _row_in_two_passes(x_ptr, q_ptr, scale_ptr, x_base, q_base, row, I, MIN_SCALE, BLOCK_I, HW)
