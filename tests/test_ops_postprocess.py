"""The four post-processing / quantization ops on CPU and meta: opcheck, CPU kernel vs formats,
fake shapes, and every bad input refused with a clear error before anything is written."""
import pytest
import torch

from inductor_w4a8 import W4A8InputError, formats
from inductor_w4a8.testing import opcheck

ops = torch.ops.w4a8
FP8 = torch.float8_e4m3fn


def random_words(*shape, device="cpu"):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device)


def random_scales(*shape):
    return (torch.rand(shape) * 0.02 + 1e-4).to(torch.bfloat16)


def bits(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def assert_bitwise_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


# ------------------------------------------------------------------------------------------
# opcheck (schema, fake tensor, autograd registration, AOT dispatch with dynamic shapes)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 4), (4, 16), (2, 2, 3, 8)])
def test_opcheck_convert_uint4b8(shape, seed):
    opcheck(ops.convert_packed_uint4b8_to_signed_int4_, (random_words(*shape),))


@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 3, 8), (3, 8, 16)])
def test_opcheck_encode_and_reorder(shape, seed):
    opcheck(ops.encode_and_reorder_int4b_grouped, (random_words(*shape),))


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 12), (2, 3, 4, 4)])
def test_opcheck_convert_scales(shape, seed):
    opcheck(ops.convert_bf16_scales_to_fp8, (random_scales(*shape),))


@pytest.mark.parametrize("T,K", [(1, 64), (5, 320), (0, 128)])
def test_opcheck_quantize_fp8_per_token(T, K, seed):
    opcheck(ops.quantize_fp8_per_token, ((torch.randn(T, K) * 3).to(torch.bfloat16),))


# ------------------------------------------------------------------------------------------
# CPU kernels vs formats
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6), (2, 2, 2, 8)])
def test_cpu_convert_in_place(shape, seed):
    packed = random_words(*shape)
    expect = formats.uint4b8_to_signed_int4(packed)
    ptr = packed.data_ptr()
    assert ops.convert_packed_uint4b8_to_signed_int4_(packed) is None
    assert packed.data_ptr() == ptr
    assert torch.equal(packed, expect)


def test_cpu_encode_and_reorder(seed):
    signed = random_words(3, 6, 16)
    before = signed.clone()
    w, strides = ops.encode_and_reorder_int4b_grouped(signed)
    ref_w, ref_strides = formats.encode_gemm_layout(signed)
    assert torch.equal(signed, before)  # not mutated
    assert_bitwise_equal(w, ref_w)
    assert_bitwise_equal(strides, ref_strides)
    assert torch.equal(formats.decode_gemm_layout(w), formats.unpack_int4(signed, biased=False))


@pytest.mark.parametrize("shape", [(6, 40), (3, 7, 12), (2, 3, 4, 4)])
def test_cpu_convert_scales(shape, seed):
    s = random_scales(*shape)
    fp8, chan = ops.convert_bf16_scales_to_fp8(s)
    ref_fp8, ref_chan = formats.convert_bf16_scales_to_fp8(s)
    assert_bitwise_equal(fp8, ref_fp8)
    assert_bitwise_equal(chan, ref_chan)
    assert tuple(chan.shape) == (*shape[:-1], 1)


def test_cpu_quantize_fp8_per_token(seed):
    x = (torch.randn(9, 1000) * 5).to(torch.bfloat16)
    q, s = ops.quantize_fp8_per_token(x)
    rq, rs = formats.quantize_fp8_per_token(x)
    assert_bitwise_equal(q, rq)
    assert_bitwise_equal(s, rs)


# ------------------------------------------------------------------------------------------
# meta / fake shapes
# ------------------------------------------------------------------------------------------
def test_meta_shapes():
    p = torch.empty(160, 3072, 640, dtype=torch.int32, device="meta")
    assert ops.convert_packed_uint4b8_to_signed_int4_(p) is None
    w, strides = ops.encode_and_reorder_int4b_grouped(p)
    assert w.device.type == "meta" and tuple(w.shape) == formats.gemm_layout_shape(160, 3072, 5120)
    assert w.dtype == formats.gemm_layout_dtype()
    assert strides.shape == (160, 3) and strides.dtype == torch.int64
    for shape in [(160, 3072, 40), (7, 3), (2, 3, 4, 5)]:
        fp8, chan = ops.convert_bf16_scales_to_fp8(torch.empty(shape, dtype=torch.bfloat16, device="meta"))
        assert fp8.shape == shape and fp8.dtype == FP8
        assert chan.shape == (*shape[:-1], 1) and chan.dtype == torch.float32
    q, s = ops.quantize_fp8_per_token(torch.empty(8192, 5120, dtype=torch.bfloat16, device="meta"))
    assert q.shape == (8192, 5120) and q.dtype == FP8 and s.shape == (8192, 1) and s.dtype == torch.float32


def test_fake_shapes_are_symbolic():
    # under torch.compile with dynamic shapes the fake kernels must carry symbols, not constants
    def f(x):
        q, s = ops.quantize_fp8_per_token(x)
        return q.view(torch.uint8).float().sum() + s.sum()

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    for T in (3, 5):
        x = torch.randn(T, 64).to(torch.bfloat16)
        assert torch.allclose(compiled(x), f(x))


# ------------------------------------------------------------------------------------------
# bad inputs: refused with W4A8InputError naming the argument, nothing written
# ------------------------------------------------------------------------------------------
def _refuses(fn, arg, match, device):
    with pytest.raises(W4A8InputError, match=match):
        fn(arg.to(device) if device != "cpu" else arg)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randint(0, 9, (4, 8), dtype=torch.int64), "packed must have dtype torch.int32"),
    (lambda: torch.randint(0, 9, (4, 8), dtype=torch.int32).to(torch.uint8), "packed must have dtype"),
    (lambda: torch.randint(0, 9, (8,), dtype=torch.int32), "packed must have rank >= 2"),
    (lambda: torch.randint(0, 9, (8, 4), dtype=torch.int32).t(), "packed must be contiguous"),
])
def test_convert_refuses(bad, match, device):
    _refuses(ops.convert_packed_uint4b8_to_signed_int4_, bad(), match, device)


@pytest.mark.parametrize("bad", [
    lambda: torch.randint(-100, 100, (8, 4), dtype=torch.int32).t(),        # non-contiguous
    lambda: torch.randint(-100, 100, (4, 8), dtype=torch.int64),            # wrong dtype
    lambda: torch.randint(-100, 100, (16,), dtype=torch.int32),             # wrong rank
    lambda: torch.randint(-100, 100, (4, 8, 4), dtype=torch.int32)[:, ::2],  # strided slice
])
def test_convert_refusal_leaves_input_untouched(bad):
    x = bad()
    base = x._base if x._base is not None else x
    before = base.clone()
    with pytest.raises(W4A8InputError):
        ops.convert_packed_uint4b8_to_signed_int4_(x)
    assert torch.equal(base, before)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.zeros(2, 3, 4, dtype=torch.int64), "packed must have dtype torch.int32"),
    (lambda: torch.zeros(3, 4, dtype=torch.int32), "packed must have rank 3"),
    (lambda: torch.zeros(2, 2, 3, 4, dtype=torch.int32), "packed must have rank 3"),
    (lambda: torch.zeros(2, 8, 4, dtype=torch.int32).transpose(1, 2), "packed must be contiguous"),
    (lambda: torch.zeros(2, 3, 1, dtype=torch.int32), "K=8 weights per row"),  # layout needs K % 32
])
def test_encode_refuses(bad, match, device):
    _refuses(ops.encode_and_reorder_int4b_grouped, bad(), match, device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.rand(3, 4), "scales must have dtype torch.bfloat16"),
    (lambda: torch.rand(3, 4).half(), "scales must have dtype torch.bfloat16"),
    (lambda: torch.rand(4).bfloat16(), "scales must have rank >= 2"),
    (lambda: torch.rand(4, 3).bfloat16().t(), "scales must be contiguous"),
    (lambda: torch.rand(3, 0).bfloat16(), "0 groups"),
])
def test_convert_scales_refuses(bad, match, device):
    _refuses(ops.convert_bf16_scales_to_fp8, bad(), match, device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(3, 8), "x must have dtype torch.bfloat16"),
    (lambda: torch.randn(3, 8).half(), "x must have dtype torch.bfloat16"),
    (lambda: torch.randn(2, 3, 8).bfloat16(), "x must have rank 2"),
    (lambda: torch.randn(8).bfloat16(), "x must have rank 2"),
    (lambda: torch.randn(8, 3).bfloat16().t(), "x must be contiguous"),
])
def test_quantize_refuses(bad, match, device):
    _refuses(ops.quantize_fp8_per_token, bad(), match, device)


def test_error_names_op_and_fix():
    with pytest.raises(W4A8InputError) as info:
        ops.convert_bf16_scales_to_fp8(torch.rand(4, 3).bfloat16().t())
    msg = str(info.value)
    assert "w4a8::convert_bf16_scales_to_fp8" in msg and ".contiguous()" in msg
