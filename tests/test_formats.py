"""formats.py against an independent numpy implementation written from DESIGN.md section 2.

The numpy side never calls formats: packing is bit ops on uint32, e4m3 rounding picks the nearest
value from a table of all e4m3fn values (ties to the even code), bf16 rounding is done on the
fp32 bit pattern.
"""
import numpy as np
import pytest
import torch

from inductor_w4a8 import formats
from inductor_w4a8.testing import every_bf16_fp8_range_row


# ------------------------------------------------------------------------------------------
# numpy reference, from the spec
# ------------------------------------------------------------------------------------------
def np_pack(q: np.ndarray, biased: bool) -> np.ndarray:
    """int q in [-8, 7], [..., K] -> int32 [..., K // 8]; nibble i of word j = K index 8j + i."""
    q = q.astype(np.int64)
    nib = ((q + 8) if biased else q) & 0xF
    nib = nib.astype(np.uint32).reshape(*q.shape[:-1], q.shape[-1] // 8, 8)
    words = np.zeros(nib.shape[:-1], dtype=np.uint32)
    for i in range(8):
        words |= nib[..., i] << np.uint32(4 * i)
    return words.view(np.int32)


def np_unpack(words: np.ndarray, biased: bool) -> np.ndarray:
    """int32 [..., W] -> int q [..., 8 W]."""
    w = np.ascontiguousarray(words).view(np.uint32)
    nib = np.stack([(w >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(8)], axis=-1).astype(np.int64)
    q = nib - 8 if biased else np.where(nib >= 8, nib - 16, nib)
    return q.reshape(*words.shape[:-1], words.shape[-1] * 8)


def np_bf16_round(x: np.ndarray) -> np.ndarray:
    """fp32 -> nearest bf16 (ties to even), returned as fp32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def _e4m3_table():
    """All finite non-negative e4m3fn values, ascending, with their codes."""
    codes = np.arange(0, 0x7F, dtype=np.int64)  # 0x7F is NaN
    e, m = codes >> 3, codes & 7
    vals = np.where(e == 0, m * 2.0 ** -9, (1 + m / 8.0) * 2.0 ** (e - 7))
    return vals, codes


E4M3_VALS, E4M3_CODES = _e4m3_table()


def np_e4m3_bits(x: np.ndarray) -> np.ndarray:
    """fp32 (|x| <= 448) -> uint8 e4m3fn bits, nearest value, ties to the even code."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x).astype(np.float64)
    hi = np.clip(np.searchsorted(E4M3_VALS, a, side="left"), 0, len(E4M3_VALS) - 1)
    lo = np.clip(hi - 1, 0, None)
    d_lo, d_hi = a - E4M3_VALS[lo], E4M3_VALS[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (E4M3_CODES[hi] % 2 == 0))
    code = np.where(pick_hi, E4M3_CODES[hi], E4M3_CODES[lo])
    sign = np.signbit(x).astype(np.int64) << 7
    return (code | sign).astype(np.uint8)


def np_e4m3_value(bits: np.ndarray) -> np.ndarray:
    mag = bits.astype(np.int64) & 0x7F
    v = E4M3_VALS[np.clip(mag, 0, 0x7E)]
    return np.where(bits & 0x80, -v, v).astype(np.float32)


def np_convert_scales(s: np.ndarray):
    """vLLM's bf16 -> fp8 scale contract on fp32 values [..., G]."""
    rows = s.reshape(-1, s.shape[-1]).astype(np.float32)
    amax = np.abs(rows).max(axis=-1, keepdims=True)
    chan = np.maximum(amax / np.float32(448.0), np.float32(1.0 / (448.0 * 512.0)))
    q = np_e4m3_bits(np.clip(rows / chan, np.float32(-448), np.float32(448)))
    fp8 = np_e4m3_bits(np_e4m3_value(q) / np.float32(8.0))
    return fp8.reshape(s.shape), (chan * np.float32(8.0)).reshape(*s.shape[:-1], 1)


def np_quantize_w4(w: np.ndarray, G: int):
    """compressed-tensors symmetric RTN: s = bf16(amax / 7.5), q = clip(round(w / s), -8, 7)."""
    w = w.astype(np.float32)
    wg = w.reshape(*w.shape[:-1], w.shape[-1] // G, G)
    s = np_bf16_round(np.abs(wg).max(axis=-1) / np.float32(7.5))
    safe = np.where(s == 0, np.float32(1), s)[..., None]
    q = np.clip(np.round(wg / safe), -8, 7).reshape(w.shape)  # np.round: half to even, as torch
    return np_pack(q, biased=True), s


def u8(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------
# pack / unpack
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (2, 5, 64), (2, 3, 4, 24)])
@pytest.mark.parametrize("biased", [True, False])
def test_pack_unpack_match_numpy(shape, biased, seed):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = formats.pack_int4(q, biased=biased)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    np.testing.assert_array_equal(packed.numpy(), np_pack(q.numpy(), biased))
    np.testing.assert_array_equal(formats.unpack_int4(packed, biased=biased).numpy(), q.numpy())


@pytest.mark.parametrize("biased", [True, False])
def test_unpack_any_word_matches_numpy(biased, seed):
    words = torch.randint(-2**31, 2**31 - 1, (4, 33), dtype=torch.int32)
    words[0, :4] = torch.tensor([-2**31, -1, 0, 2**31 - 1], dtype=torch.int32)
    q = formats.unpack_int4(words, biased=biased)
    assert q.dtype == torch.int8 and q.shape == (4, 33 * 8)
    np.testing.assert_array_equal(q.numpy(), np_unpack(words.numpy(), biased))
    np.testing.assert_array_equal(formats.pack_int4(q, biased=biased).numpy(), words.numpy())


def test_every_nibble_value_at_every_position():
    # word r, position i holds nibble (r + i) % 16: all 16 values at all 8 positions
    nib = (np.arange(16)[:, None] + np.arange(8)[None, :]) % 16
    words = np.zeros(16, dtype=np.uint32)
    for i in range(8):
        words |= nib[:, i].astype(np.uint32) << np.uint32(4 * i)
    words_t = torch.from_numpy(words.view(np.int32).copy()).reshape(2, 8)
    q = formats.unpack_int4(words_t, biased=True).reshape(16, 8).numpy()
    np.testing.assert_array_equal(q, nib - 8)  # uint4b8: q = v - 8
    signed = formats.uint4b8_to_signed_int4(words_t).reshape(16).numpy().view(np.uint32)
    for i in range(8):
        np.testing.assert_array_equal((signed >> np.uint32(4 * i)) & 0xF, (nib[:, i] - 8) & 0xF)
    # (v - 8) & 0xF == v ^ 8 for every nibble: the signed form is one XOR with 0x88888888
    np.testing.assert_array_equal(signed, words ^ np.uint32(0x88888888))
    np.testing.assert_array_equal(formats.unpack_int4(formats.uint4b8_to_signed_int4(words_t),
                                                      biased=False).reshape(16, 8).numpy(), nib - 8)


def test_sign_boundary_exact_words():
    q = torch.tensor([[-8, 7, -1, 0, -8, 7, -1, 0]], dtype=torch.int8)
    # uint4b8 nibbles (q + 8): 0, 15, 7, 8 -> word 0x87F087F0 (lowest K in the lowest nibble)
    biased = formats.pack_int4(q, biased=True)
    assert biased.numpy().view(np.uint32)[0, 0] == 0x87F087F0
    # two's complement nibbles: 8, 7, F, 0 -> word 0x0F780F78
    signed = formats.pack_int4(q, biased=False)
    assert signed.numpy().view(np.uint32)[0, 0] == 0x0F780F78
    assert torch.equal(formats.uint4b8_to_signed_int4(biased), signed)
    assert torch.equal(formats.unpack_int4(signed, biased=False), q)
    assert torch.equal(formats.unpack_int4(biased, biased=True), q)


def test_uint4b8_to_signed_matches_numpy(seed):
    words = torch.randint(-2**31, 2**31 - 1, (3, 7, 16), dtype=torch.int32)
    expect = np_pack(np_unpack(words.numpy(), biased=True), biased=False)
    np.testing.assert_array_equal(formats.uint4b8_to_signed_int4(words).numpy(), expect)


def test_pack_rejects_k_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        formats.pack_int4(torch.zeros(2, 12, dtype=torch.int8), biased=True)


# ------------------------------------------------------------------------------------------
# GEMM layout (its design belongs to the GEMM kernel; here: the contract any design keeps)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E,N,K", [(1, 1, 32), (2, 3, 64), (3, 5, 256), (2, 4, 1536)])
def test_gemm_layout_round_trip(E, N, K, seed):
    q = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)
    signed = torch.from_numpy(np_pack(q.numpy(), biased=False))
    w, strides = formats.encode_gemm_layout(signed)
    assert tuple(w.shape) == formats.gemm_layout_shape(E, N, K)
    assert w.dtype == formats.gemm_layout_dtype() and w.is_contiguous()
    assert strides.dtype == torch.int64 and tuple(strides.shape) == (E, 3)
    assert torch.equal(strides, formats.gemm_layout_strides(E, N, K))
    for e in range(E):  # the strides describe the tensor returned (in its elements)
        assert tuple(strides[e].tolist()) == w.stride()
    np.testing.assert_array_equal(formats.decode_gemm_layout(w).numpy(), q.numpy())
    # the encoder reads the signed form: every nibble value decodes to itself
    assert torch.equal(signed, formats.pack_int4(formats.decode_gemm_layout(w), biased=False))


def test_gemm_layout_every_value():
    q = (torch.arange(16 * 8) % 16 - 8).to(torch.int8).reshape(1, 2, 64)
    w, _ = formats.encode_gemm_layout(formats.pack_int4(q, biased=False))
    assert torch.equal(formats.decode_gemm_layout(w), q)


# ------------------------------------------------------------------------------------------
# quantize_w4
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("shape", [(4, 256), (2, 3, 384)])
def test_quantize_w4_matches_numpy(G, shape, seed):
    w = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    w[..., :G] = 0  # an all-zero group: scale 0, q 0
    packed, scale = formats.quantize_w4(w, G)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert scale.dtype == torch.bfloat16 and scale.shape == (*shape[:-1], shape[-1] // G)
    np_packed, np_scale = np_quantize_w4(w.float().numpy(), G)
    np.testing.assert_array_equal(packed.numpy(), np_packed)
    np.testing.assert_array_equal(scale.float().numpy(), np_scale)
    # RTN: every weight within half a step of its grid point, plus at the group maximum what the
    # bf16 rounding of s (relative 2^-8) pushes past 7.5 steps
    q = formats.unpack_int4(packed, biased=True)
    err = (formats.dequantize_w4(q, scale, G) - w.float()).abs()
    assert bool((err <= (0.5 + 7.5 * 2**-8) * formats.expand_group_scales(scale, G)).all())
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_quantize_w4_uses_full_range():
    w = torch.tensor([[7.5, -7.5, 1.0, 0.0] * 8], dtype=torch.float32)  # amax 7.5 -> s = 1
    packed, scale = formats.quantize_w4(w, 32)
    assert float(scale) == 1.0
    q = formats.unpack_int4(packed, biased=True)[0, :4].tolist()
    assert q == [7, -8, 1, 0]  # round(7.5) = 8 clamps to 7; round(-7.5) = -8


@pytest.mark.parametrize("G", [0, 16, 48, 96, 256])
def test_quantize_w4_rejects_group_size(G):
    with pytest.raises(ValueError, match="group_size"):
        formats.quantize_w4(torch.randn(2, 768), G)


def test_quantize_w4_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size"):
        formats.quantize_w4(torch.randn(2, 96), 64)
    with pytest.raises(TypeError, match="floating"):
        formats.quantize_w4(torch.zeros(2, 128, dtype=torch.int32), 128)
    with pytest.raises(ValueError, match="rank"):
        formats.quantize_w4(torch.randn(128), 128)
    with pytest.raises(ValueError, match="not supported"):
        formats.check_group_size(256, 100)


# ------------------------------------------------------------------------------------------
# fp8: scale conversion and per-token quantization
# ------------------------------------------------------------------------------------------
def test_numpy_e4m3_table_agrees_with_torch_on_representable_values():
    # sanity of the numpy side: the 253 finite codes decode to the values torch gives them
    bits = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    np.testing.assert_array_equal(np_e4m3_value(bits.numpy()),
                                  bits.view(torch.float8_e4m3fn).float().numpy())


def _scale_data(shape):
    s = (torch.rand(shape) * 0.02 + 1e-4).to(torch.bfloat16)
    s.view(-1, shape[-1])[0] = 0  # all-zero row: the floor 1 / (448 * 512)
    s.view(-1, shape[-1])[1, 0] = 3.0  # one large scale: the rest of the row goes subnormal
    return s


@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 40), (2, 3, 4, 4), (2, 1, 3, 130)])
def test_convert_bf16_scales_to_fp8_matches_numpy(shape, seed):
    s = _scale_data(shape)
    fp8, chan = formats.convert_bf16_scales_to_fp8(s)
    assert fp8.dtype == torch.float8_e4m3fn and tuple(fp8.shape) == shape
    assert chan.dtype == torch.float32 and tuple(chan.shape) == (*shape[:-1], 1)
    np_fp8, np_chan = np_convert_scales(s.float().numpy())
    np.testing.assert_array_equal(u8(fp8), np_fp8)
    np.testing.assert_array_equal(chan.numpy(), np_chan)
    # what it means: fp8 * chan reproduces the scales to fp8 precision (relative 2^-4 and the
    # subnormal floor of the row)
    approx = fp8.float() * chan
    tol = 2.0 ** -4 * s.float().abs() + chan * 2.0 ** -9
    assert bool(((approx - s.float()).abs() <= tol).all())


def test_convert_bf16_scales_to_fp8_every_bf16_value():
    # a row holding 448 (so chan = 1 before the x8 headroom) and every bf16 value in [-448, 448]:
    # every rounding case of the two e4m3 conversions, ties and subnormals included
    row = every_bf16_fp8_range_row()
    fp8, chan = formats.convert_bf16_scales_to_fp8(row)
    np_fp8, np_chan = np_convert_scales(row.float().numpy())
    np.testing.assert_array_equal(u8(fp8), np_fp8)
    assert float(chan) == 8.0


@pytest.mark.parametrize("T,K", [(1, 8), (5, 300), (7, 5120)])
def test_quantize_fp8_per_token_matches_numpy(T, K, seed):
    x = (torch.randn(T, K) * torch.rand(T, 1) * 10).to(torch.bfloat16)
    x[0] = 0
    q, scale = formats.quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (T, K)
    assert scale.dtype == torch.float32 and scale.shape == (T, 1)
    xf = x.float().numpy()
    np_scale = np.maximum(np.abs(xf).max(axis=-1, keepdims=True) / np.float32(448),
                          np.float32(1 / (448 * 512)))
    np.testing.assert_array_equal(scale.numpy(), np_scale)
    np.testing.assert_array_equal(u8(q), np_e4m3_bits(np.clip(xf / np_scale, -448, 448)))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_fp8_per_token_divides_truly_on_every_device(device, seed):
    """amax = 3.875: 3.875 * fp32(1 / 448) is one ulp above 3.875 / 448, and with that scale
    x = 1.453125 lands just below the tie 168 (e4m3 160 instead of 176): torch on CUDA divides
    by a Python number that way, so a row of such ties came out wrong there (found on the H200)."""
    x = (torch.randn(4, 5120) * 1.2).clamp(-3.8, 3.8).to(torch.bfloat16)
    x[:, 0], x[:, 1], x[:, 2] = 3.875, 1.453125, -0.181640625
    x[3, 0] = 4.0
    q, scale = formats.quantize_fp8_per_token(x.to(device))
    xf = x.float().numpy()
    np_scale = np.abs(xf).max(axis=-1, keepdims=True) / np.float32(448)
    np.testing.assert_array_equal(scale.cpu().numpy(), np_scale)
    np.testing.assert_array_equal(u8(q.cpu()), np_e4m3_bits(np.clip(xf / np_scale, -448, 448)))
    assert u8(q.cpu())[0, 1] == np_e4m3_bits(np.float32([176.0]))[0]


def test_divide_exactly_promotes_to_fp32_and_refuses_integers():
    x = torch.tensor([3.875, 1.0, -7.5], dtype=torch.bfloat16)
    out = formats.divide_exactly(x, 448.0)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), x.float().numpy() / np.float32(448))
    with pytest.raises(TypeError, match="floating"):
        formats.divide_exactly(torch.tensor([7], dtype=torch.int32), 7.5)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_w4_scales_divide_truly_on_every_device(device, seed):
    w = (torch.randn(64, 512) * 0.05).to(torch.bfloat16)
    packed, scale = formats.quantize_w4(w.to(device), 128)
    np_packed, np_scale = np_quantize_w4(w.float().numpy(), 128)
    np.testing.assert_array_equal(scale.float().cpu().numpy(), np_scale)
    np.testing.assert_array_equal(packed.cpu().numpy(), np_packed)


def test_quantize_fp8_per_token_every_bf16_value():
    x = every_bf16_fp8_range_row()
    q, scale = formats.quantize_fp8_per_token(x)
    assert float(scale) == 1.0
    np.testing.assert_array_equal(u8(q), np_e4m3_bits(x.float().numpy()))


def test_quantize_fp8_per_token_empty():
    q, s = formats.quantize_fp8_per_token(torch.zeros(0, 64, dtype=torch.bfloat16))
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s = formats.quantize_fp8_per_token(torch.zeros(3, 0, dtype=torch.bfloat16))
    assert q.shape == (3, 0) and torch.equal(s, torch.full((3, 1), formats.FP8_MIN_SCALE))
