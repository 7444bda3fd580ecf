"""bf16 group scales -> fp8 group scales + fp32 channel scales (vLLM's contract, bit for bit).

Per row r (the last dim holds the G group scales of one output channel):
    chan = max(amax_r / 448, 1 / (448 * 512));  q = e4m3(clamp(S / chan, -448, 448))
    fp8  = e4m3(float(q) / 8);                   chan_out = chan * 8
Divisions are IEEE round-to-nearest (div_rn), as torch's; see `formats.convert_bf16_scales_to_fp8`.
"""
import triton
import triton.language as tl

from .. import formats
from .fp8 import e4m3_bits_to_fp32, fp32_to_e4m3_bits, fp8_row_scale, quantize_e4m3_bits

HEADROOM = tl.constexpr(formats.FP8_SCALE_HEADROOM)
INV_HEADROOM = tl.constexpr(1.0 / formats.FP8_SCALE_HEADROOM)  # a power of two: exact


@triton.jit
def bf16_scales_to_fp8_kernel(s_ptr, q_ptr, chan_ptr, n_rows, G, MIN_SCALE: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, HW: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows * G
    amax = tl.zeros([BLOCK_R], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK_R], dtype=tl.int32)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = row_ok[:, None] & (cols < G)[None, :]
        v = tl.load(s_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        n_nan += tl.sum((v != v).to(tl.int32), axis=1)
    chan = fp8_row_scale(amax, n_nan, MIN_SCALE)
    for g0 in range(0, G, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        mask = row_ok[:, None] & (cols < G)[None, :]
        offs = base[:, None] + cols[None, :]
        v = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = quantize_e4m3_bits(v, chan[:, None], HW)
        # float(q) / 8 is exact in fp32 (a power-of-two scaling), then rounded to e4m3 again
        fp8 = fp32_to_e4m3_bits(e4m3_bits_to_fp32(q, HW) * INV_HEADROOM, HW)
        tl.store(q_ptr + offs, fp8, mask=mask)
    tl.store(chan_ptr + rows, chan * HEADROOM, mask=row_ok)
