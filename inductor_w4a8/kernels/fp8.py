"""fp32 <-> float8_e4m3fn conversions, bit exact against torch's `.to(torch.float8_e4m3fn)`.

Shared @triton.jit helpers for every kernel that writes fp8 (scale conversion, activation
quantization). Values travel as uint8 bit patterns so that the same code runs compiled on the GPU
and under TRITON_INTERPRET=1 (whose own fp8 cast rounds half away from zero and mishandles the
mantissa carry, so it cannot be used for bit-exact work).

HW=True uses the hardware convert (sm_89+: cvt.rn.satfinite.e4m3x2.f32, round-to-nearest-even);
HW=False is the same rounding done with integer ops (c10's fp8e4m3fn_from_fp32_value).
Precondition for the encoder: |x| <= 448 or x is NaN (callers clamp first, as torch code does).
"""
import triton
import triton.language as tl

from .. import formats

# formats.py holds the fp8 scale math; kernels read its constants as compile-time values
FP8_MAX = tl.constexpr(formats.FP8_MAX)


@triton.jit
def fp32_to_e4m3_bits(x, HW: tl.constexpr):
    """fp32 in [-448, 448] (or NaN) -> uint8 bits of e4m3fn, round to nearest even."""
    if HW:
        return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        bits = x.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = bits & 0x7FFFFFFF
        # |x| >= 2^-6 (normal e4m3): round the 20 dropped mantissa bits to nearest even (the carry
        # may bump the exponent, which is right), then rebias the exponent 127 -> 7.
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # |x| < 2^-6 (subnormal e4m3): |x| / 2^-9 rounded to nearest even, an integer in 0..8
        # (8 encodes 2^-6, the smallest normal). With m the 24-bit significand,
        # |x| / 2^-9 = m >> (141 - e); fp32 subnormals (e = 0) have no implicit bit and e_eff = 1.
        e = a >> 23
        m = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
        s = tl.minimum(141 - tl.maximum(e, 1), 30)
        q = m >> s
        rem = m & ((1 << s) - 1)
        half = 1 << (s - 1)
        q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        out = tl.where(a >= 0x3C800000, normal, q)
        out = tl.where(a > 0x7F800000, 0x7F, out)  # NaN -> 0x7F (| sign), as torch
        return (out | sign).to(tl.uint8)


@triton.jit
def e4m3_bits_to_fp32(b, HW: tl.constexpr):
    """uint8 bits of e4m3fn -> fp32 (exact; 0x7F / 0xFF -> NaN)."""
    if HW:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = b.to(tl.int32)
        mag = v & 0x7F
        e = mag >> 3
        m = mag & 7
        normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125  # m * 2^-9, exact
        r = tl.where(e == 0, sub, normal)
        r = tl.where(mag == 0x7F, float("nan"), r)
        return tl.where((v & 0x80) != 0, -r, r)


@triton.jit
def clamp_fp8_range(x):
    """clamp(x, -448, 448) keeping NaN as NaN (torch.clamp semantics; tl.minimum drops NaN)."""
    c = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return tl.where(x != x, x, c)


@triton.jit
def fp8_row_scale(amax, nan_count, MIN_SCALE: tl.constexpr):
    """formats.fp8_row_scale: max(amax / 448, MIN_SCALE), with IEEE division as formats does;
    NaN when the row held a NaN (nan_count > 0), as torch's amax and clamp propagate it."""
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    return tl.where(nan_count > 0, float("nan"), scale)


@triton.jit
def fp8_scale_of(v, MIN_SCALE: tl.constexpr):
    """fp8_row_scale of the fp32 values v [BLOCK] held in registers (masked lanes 0)."""
    return fp8_row_scale(tl.max(tl.abs(v), axis=0), tl.sum((v != v).to(tl.int32), axis=0), MIN_SCALE)


@triton.jit
def bf16_row_fp8_scale(x_ptr, base, K, MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp8_row_scale of the K values at x_ptr + base (one pass in BLOCK_K chunks)."""
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + base + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        n_nan += (v != v).to(tl.int32)
    return fp8_row_scale(tl.max(amax, axis=0), tl.sum(n_nan, axis=0), MIN_SCALE)


@triton.jit
def bf16_row_to_fp8_one_tile(x_ptr, base, K, MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                             HW: tl.constexpr):
    """A whole row (K <= BLOCK_K) read once: (cols, mask, e4m3 bits, scale) with the scale of
    bf16_row_fp8_scale (a max is the same in any order) and the values of quantize_e4m3_bits."""
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    v = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
    scale = fp8_scale_of(v, MIN_SCALE)
    return cols, mask, quantize_e4m3_bits(v, scale, HW), scale


@triton.jit
def quantize_e4m3_bits(v, scale, HW: tl.constexpr):
    """formats.quantize_fp8_rows as bits: e4m3(clamp(v / scale, -448, 448)), IEEE division."""
    return fp32_to_e4m3_bits(clamp_fp8_range(tl.math.div_rn(v, scale)), HW)
