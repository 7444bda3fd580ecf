"""The one definition of every W4A8 format and its math.

Kernels, references and tests import from here; nothing else re-derives packing, unpacking or
scale math. Everything is pure torch and runs on any device (meta included, where shapes allow).

Checkpoint format (compressed-tensors "pack-quantized", symmetric int4, strategy group):
    weight_packed  int32 [..., K // 8]: nibble i (bits 4i..4i+3) of word j holds the weight at
                   K index 8*j + i, stored as q + 8 ("uint4b8"), q in [-8, 7]; low nibble = lowest K.
    weight_scale   bf16  [..., K // G]
    W[..., k] = q[..., k] * weight_scale[..., k // G]

Signed form (after `convert_packed_uint4b8_to_signed_int4_`): same words, each nibble holds
q as two's-complement int4, i.e. `(v - 8) & 0xF`.

GEMM layout (output of `encode_and_reorder_int4b_grouped`): see `encode_gemm_layout`.
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------
NIBBLES_PER_WORD = 8
INT4_MIN, INT4_MAX = -8, 7
UINT4B8_BIAS = 8
SUPPORTED_GROUP_SIZES = (32, 64, 128)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# vLLM's floor for dynamic fp8 scales: keeps an all-zero row from dividing by zero and keeps
# the quantized values of tiny rows in fp8's normal range.
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
# The fp8 scale contract stores scales divided by this and folds it into the channel scale, so
# that group scales near the row maximum keep headroom after conversion (vLLM's contract).
FP8_SCALE_HEADROOM = 8.0
# compressed-tensors symmetric rule: s = amax / ((q_max - q_min) / 2) = amax / 7.5
W4_SCALE_DIVISOR = 7.5

SCALE_MODES = ("fp8", "exact")
# "exact" keeps the checkpoint's bf16 group scales untouched: it is the bit-faithful reading of
# the checkpoint, costs nothing to convert, and the kernel applies scales per group in fp32 either
# way, so there is no speed reason to lose scale precision. "fp8" exists for vLLM parity.
DEFAULT_SCALE_MODE = "exact"


# --------------------------------------------------------------------------------------------
# compressed-tensors pack / unpack (uint4b8) and the signed form
# --------------------------------------------------------------------------------------------
def _nibble_shifts(device) -> torch.Tensor:
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def pack_int4(q: torch.Tensor, *, biased: bool) -> torch.Tensor:
    """int values in [-8, 7], shape [..., K] (K % 8 == 0) -> int32 [..., K // 8].

    biased=True stores q + 8 (uint4b8, the checkpoint form); biased=False stores the
    two's-complement nibble (the signed form). Nibble i of word j holds K index 8j + i.
    """
    if q.shape[-1] % NIBBLES_PER_WORD:
        raise ValueError(f"pack_int4: last dim {q.shape[-1]} is not a multiple of 8")
    q = q.to(torch.int32)
    nibbles = (q + UINT4B8_BIAS) if biased else q
    nibbles = (nibbles & 0xF).reshape(*q.shape[:-1], q.shape[-1] // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    words = (nibbles << _nibble_shifts(q.device)).sum(dim=-1, dtype=torch.int64)
    # sum of disjoint bit fields in int64, then wrap to int32 two's complement
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, *, biased: bool) -> torch.Tensor:
    """int32 [..., K // 8] -> int8 q in [-8, 7], shape [..., K]. Inverse of `pack_int4`."""
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> _nibble_shifts(packed.device)) & 0xF
    q = nibbles - UINT4B8_BIAS if biased else torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * NIBBLES_PER_WORD).to(torch.int8)


# (v - 8) & 0xF == v ^ 8 for every nibble v in [0, 15]: flipping bit 3 of each nibble moves
# between uint4b8 and two's complement in both directions, one XOR per 32-bit word.
NIBBLE_SIGN_FLIP = -0x77777778  # 0x88888888 as int32
# The same word is also eight uint4b8 nibbles of value 8: eight zero weights.
UINT4B8_ZERO_WORD = NIBBLE_SIGN_FLIP


def uint4b8_to_signed_int4(packed: torch.Tensor) -> torch.Tensor:
    """Every nibble v -> (v - 8) & 0xF. Out of place; the op of the same name works in place."""
    return packed ^ NIBBLE_SIGN_FLIP


def uint4b8_to_signed_int4_(packed: torch.Tensor) -> torch.Tensor:
    """In-place form of `uint4b8_to_signed_int4` (no temporaries: safe on full-size weights)."""
    return packed.bitwise_xor_(NIBBLE_SIGN_FLIP)


# --------------------------------------------------------------------------------------------
# The GEMM layout (ours): what `w4a8::encode_and_reorder_int4b_grouped` returns
# --------------------------------------------------------------------------------------------
# Layout v3 ("32-chunk interleaved"), what the Triton grouped GEMM reads fastest:
#   int32 [E, N, K // 8], row-major and contiguous (per-expert strides (N * K // 8, K // 8, 1) in
#   int32 elements, as `gemm_layout_strides` returns); K must be a multiple of 32 (the smallest
#   group size). Each run of 32 K values of a row (one "chunk", 4 words) is stored as:
#       word w (0..3) of chunk j, nibble p (bits 4p..4p+3):
#           p = 0..3  ->  K = 32 j + 4 w + p
#           p = 4..7  ->  K = 32 j + 16 + 4 w + (p - 4)
#   and every nibble holds q as two's-complement int4 (the signed form, not uint4b8).
#   (GEMM_CHUNK = 32; `_to_gemm_order` / `_from_gemm_order` give the permutation as tensor ops.)
#
# Why (kernels/grouped_gemm.py, docs/perf.md): the kernel feeds the converted weights to Hopper's
# fp8 wgmma as the register operand. There a thread holds, per 32-wide K slice and row, the fp8
# values of K = 4t..4t+3 in one register and K = 16+4t..16+4t+3 in another (t = lane % 4). With
# this layout one loaded 32-bit word is exactly those 8 weights, low 16 bits -> first register,
# high 16 bits -> second, so no shuffles or byte permutes are needed after the convert. The
# convert itself is a byte lookup (CUTLASS's trick): PRMT uses each nibble's low 3 bits as a byte
# index into an 8-byte table of e4m3(0..7) and into one of e4m3(-8..-1), and a third PRMT picks
# per byte by the sign bit (moved into the selector with one shift + LOP3): about 11
# instructions per 8 weights, no int -> float converts, q exact in fp8.
# The layout does not depend on the group size (the encode op is not told it): chunks of 32
# tile every group of 32, 64 or 128.
GEMM_CHUNK = 32
GEMM_NIBBLES_BIASED = False


def _check_chunk(K: int) -> None:
    if K % GEMM_CHUNK:
        raise ValueError(f"the GEMM weight layout needs K to be a multiple of {GEMM_CHUNK} (the smallest "
                         f"group size), got K={K}; pad K up to a multiple of {GEMM_CHUNK}")


def _to_gemm_order(q: torch.Tensor) -> torch.Tensor:
    """int q [..., K] in natural K order -> the same values in layout-v3 nibble-stream order."""
    lead, K = q.shape[:-1], q.shape[-1]
    # k = 32 j + 16 h + 4 w + b  ->  stream position 32 j + 8 w + 4 h + b
    q = q.reshape(*lead, K // GEMM_CHUNK, 2, 4, 4).transpose(-3, -2)
    return q.reshape(*lead, K)


def _from_gemm_order(q: torch.Tensor) -> torch.Tensor:
    lead, K = q.shape[:-1], q.shape[-1]
    q = q.reshape(*lead, K // GEMM_CHUNK, 4, 2, 4).transpose(-3, -2)
    return q.reshape(*lead, K)


def encode_gemm_layout(signed_packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int32 [E, N, K // 8] -> (GEMM layout v3 int32 [E, N, K // 8], int64 [E, 3] strides).

    Strides are (expert, n, k-word) strides in int32 elements.
    """
    q = unpack_int4(signed_packed, biased=False)
    E, N, K = q.shape
    _check_chunk(K)
    w = pack_int4(_to_gemm_order(q), biased=GEMM_NIBBLES_BIASED).contiguous()
    strides = gemm_layout_strides(E, N, K, device=signed_packed.device)
    return w, strides


def decode_gemm_layout(w: torch.Tensor) -> torch.Tensor:
    """GEMM layout v3 [E, N, K // 8] -> int8 q [E, N, K] in natural K order."""
    q = unpack_int4(w, biased=GEMM_NIBBLES_BIASED)
    _check_chunk(q.shape[-1])
    return _from_gemm_order(q)


def gemm_layout_shape(E: int, N: int, K: int) -> tuple[int, int, int]:
    return (E, N, K // NIBBLES_PER_WORD)


def gemm_layout_dtype() -> torch.dtype:
    return torch.int32


def gemm_layout_strides(E: int, N: int, K: int, device=None) -> torch.Tensor:
    # Filled on the device: torch.tensor(list, device="cuda") is a pageable host->device copy,
    # which waits for the current stream (a hidden sync that breaks stream ordering and capture).
    words = K // NIBBLES_PER_WORD
    strides = torch.empty((E, 3), dtype=torch.int64, device=device)
    for column, value in enumerate((N * words, words, 1)):
        strides[:, column].fill_(value)
    return strides


# --------------------------------------------------------------------------------------------
# Weight quantization (to make test data) and dequantization
# --------------------------------------------------------------------------------------------
def group_size_problem(group_size: int, K: int | None = None, what: str = "K") -> str | None:
    """What is wrong with a quantization group size (and K, when given), or None: the one rule
    every op, module, loader and quantizer applies (each raises it as its own error type)."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        return f"group_size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
    if K is not None and K % group_size:
        return (f"{what}={K} is not a multiple of group_size={group_size}; pad {what} up to a "
                f"multiple of the group size")
    return None


def check_group_size(K: int, group_size: int, what: str = "K") -> None:
    if problem := group_size_problem(group_size, K, what):
        raise ValueError(problem)


def quantize_w4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN int4: bf16/fp32 [..., K] -> (uint4b8 packed int32 [..., K//8], bf16 [..., K//G]).

    s = amax_group / 7.5 (rounded to bf16, the stored scale), q = clamp(round(w / s), -8, 7).
    """
    if not w.is_floating_point():
        raise TypeError(f"quantize_w4: w must be a floating tensor, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"quantize_w4: w must have rank >= 2 ([..., N, K]), got shape {tuple(w.shape)}")
    K = w.shape[-1]
    check_group_size(K, group_size)
    wg = w.float().reshape(*w.shape[:-1], K // group_size, group_size)
    scale = divide_exactly(wg.abs().amax(dim=-1), W4_SCALE_DIVISOR).to(torch.bfloat16)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(wg / safe), INT4_MIN, INT4_MAX).reshape(w.shape)
    return pack_int4(q, biased=True), scale


def expand_group_scales(scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """[..., K // G] -> [..., K] (fp32, or `dtype`), each scale repeated over its group."""
    return scale.to(dtype).repeat_interleave(group_size, dim=-1)


def dequantize_w4(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """int q [..., K] and group scales [..., K // G] -> [..., K] in fp32 (or `dtype`)."""
    return q.to(dtype) * expand_group_scales(scale, group_size, dtype)


def effective_group_scales(w_scale: torch.Tensor, w_chan_scale: torch.Tensor | None,
                           dtype=torch.float32) -> torch.Tensor:
    """The group scale the GEMM applies: s (bf16, exact mode) or fp8 s * chan (fp8 mode). In
    fp32 the product of the 4-bit fp8 mantissa and the 24-bit chan rounds; float64 is exact."""
    s = w_scale.to(dtype)
    return s if w_chan_scale is None else s * w_chan_scale.to(dtype)


# --------------------------------------------------------------------------------------------
# fp8 math: scale conversion (vLLM's contract) and per-token activation quantization
# --------------------------------------------------------------------------------------------
def divide_exactly(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """Floating x / divisor, IEEE-rounded in eager mode on every device (as the kernels' div_rn).
    torch on CUDA multiplies by the reciprocal when the divisor is a Python number, one ulp off
    the true quotient for some x (amax = 3.875: 3.875 * (1 / 448) != 3.875 / 448 in fp32), and an
    fp8 rounding tie then flips many elements of a row; a 0-dim tensor divisor is divided truly.
    (Under Inductor the constant is folded into a multiplication again: the opt-in decompositions
    of lowerings/decompositions.py say so; the kernels never run this code.)"""
    if not x.is_floating_point():
        raise TypeError(f"divide_exactly: x must be a floating tensor, got {x.dtype}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype) / torch.full((), divisor, dtype=dtype, device=x.device)


def fp8_row_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 amax -> fp32 scale = max(amax / 448, FP8_MIN_SCALE), true division on every device."""
    return torch.clamp(divide_exactly(amax.float(), FP8_MAX), min=FP8_MIN_SCALE)


def quantize_fp8_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x / scale, -448, 448)) in fp32 (true division, round-to-nearest-even)."""
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def convert_bf16_scales_to_fp8(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [..., G_count] -> (fp8 [..., G_count], fp32 channel scales [..., 1]).

    Per row r of scales.reshape(-1, G_count):
        chan = max(amax_r / 448, 1 / (448 * 512)); q = e4m3(clamp(S / chan, -448, 448))
        fp8 = e4m3(float(q) / 8);                  chan = chan * 8
    """
    rows = scales.reshape(-1, scales.shape[-1]).float()
    chan = fp8_row_scale(rows.abs().amax(dim=-1, keepdim=True))
    q = quantize_fp8_rows(rows, chan)
    fp8 = (q.float() / FP8_SCALE_HEADROOM).to(FP8_DTYPE)
    chan = chan * FP8_SCALE_HEADROOM
    lead = tuple(scales.shape[:-1])
    return fp8.reshape(scales.shape), chan.reshape(lead + (1,))


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [T, K] -> (fp8 [T, K], fp32 [T, 1]); scale = max(amax_row / 448, FP8_MIN_SCALE)."""
    scale = fp8_row_scale(x.float().abs().amax(dim=-1, keepdim=True)) if x.shape[-1] else (
        torch.full((*x.shape[:-1], 1), FP8_MIN_SCALE, dtype=torch.float32, device=x.device))
    return quantize_fp8_rows(x, scale), scale
