"""The Triton launchers of the post-processing ops under TRITON_INTERPRET=1 (CPU tensors), bit
exact against formats.

Triton decides interpreted vs compiled when a kernel is decorated, and reads TRITON_INTERPRET at
that moment; setting it inside this process would also turn every kernel imported later (the GPU
tests') into an interpreted one. So when the suite runs without the variable, this file runs
itself once in a child process with TRITON_INTERPRET=1 (its output is shown on failure); run it
directly as `TRITON_INTERPRET=1 pytest tests/test_kernels_postprocess_interpret.py`.
"""
import os

import pytest
import torch
from inductor_w4a8.testing import run_interpreted

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:
    def test_under_triton_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__)

else:
    import triton
    import triton.language as tl

    from inductor_w4a8 import formats
    from inductor_w4a8.kernels.fp8 import e4m3_bits_to_fp32, fp32_to_e4m3_bits
    from inductor_w4a8.launch import fp8_quant, int4_convert, scale_convert
    from inductor_w4a8.testing import every_bf16_fp8_range_row
    from inductor_w4a8.testing import poisoned_empty  # unwritten outputs show as NaN / 0x7F

    FP8 = torch.float8_e4m3fn

    def u8(t):
        return t.view(torch.uint8)

    # --- int4 convert --------------------------------------------------------------------
    @pytest.mark.parametrize("shape", [(2, 3), (3, 5, 7), (2, 3, 4, 5), (3, 4097)])
    def test_int4_convert(shape, seed):
        packed = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)
        packed.view(-1)[:4] = torch.tensor([-2**31, -1, 0, 2**31 - 1], dtype=torch.int32)
        expect = formats.uint4b8_to_signed_int4(packed)
        ptr = packed.data_ptr()
        int4_convert.convert_uint4b8_to_signed_(packed)
        assert packed.data_ptr() == ptr and torch.equal(packed, expect)

    def test_int4_convert_every_nibble():
        nib = (torch.arange(16)[:, None] + torch.arange(8)[None, :]) % 16
        words = (nib.long() << (4 * torch.arange(8))).sum(-1)
        packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(2, 8)
        expect = formats.pack_int4(nib.reshape(2, 64) - 8, biased=False)
        int4_convert.convert_uint4b8_to_signed_(packed)
        assert torch.equal(packed, expect)

    def test_int4_convert_empty_and_refusal():
        int4_convert.convert_uint4b8_to_signed_(torch.empty(0, 8, dtype=torch.int32))
        x = torch.randint(0, 100, (8, 4), dtype=torch.int32)
        before = x.clone()
        with pytest.raises(ValueError, match="contiguous"):
            int4_convert.convert_uint4b8_to_signed_(x.t())
        assert torch.equal(x, before)

    # --- the e4m3 helpers themselves -----------------------------------------------------
    @triton.jit
    def _roundtrip_kernel(x_ptr, bits_ptr, back_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        b = fp32_to_e4m3_bits(tl.load(x_ptr + offs, mask=mask, other=0.0), False)
        tl.store(bits_ptr + offs, b, mask=mask)
        tl.store(back_ptr + offs, e4m3_bits_to_fp32(b, False), mask=mask)

    def test_e4m3_helpers_match_torch(seed):
        # random fp32 bit patterns over the whole e4m3 range (including fp32 subnormals and
        # both zeros), every e4m3 value, every midpoint between neighbours, and their fp32
        # neighbours: all the rounding cases
        codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
        vals = codes.view(FP8).float().unique()
        mids = (vals[1:].double() + vals[:-1].double()).div(2).float()
        near = torch.cat([torch.nextafter(mids, torch.tensor(float("inf"))),
                          torch.nextafter(mids, torch.tensor(float("-inf")))])
        rand_bits = torch.randint(0, 0x43E00001, (20000,), dtype=torch.int32)  # 0 .. 448
        rand = rand_bits.view(torch.float32) * torch.where(torch.rand(20000) < 0.5, -1.0, 1.0)
        x = torch.cat([vals, mids, near, rand, torch.tensor([0.0, -0.0, 448.0, -448.0, float("nan")])])
        x = x.clamp(-448, 448).contiguous()
        n = x.numel()
        got = torch.empty(n, dtype=torch.uint8)
        back = torch.empty(n, dtype=torch.float32)
        _roundtrip_kernel[(triton.cdiv(n, 1024),)](x, got, back, n, BLOCK=1024)
        want = x.to(FP8)
        finite = ~torch.isnan(x)
        assert torch.equal(got[finite], u8(want)[finite])
        assert bool((got[~finite] & 0x7F == 0x7F).all())
        assert torch.equal(back[finite], want.float()[finite])
        assert bool(torch.isnan(back[~finite]).all())

    # --- scale conversion ----------------------------------------------------------------
    @pytest.mark.parametrize("shape", [(5, 12), (3, 7, 40), (2, 3, 4, 4), (2, 300), (70, 1)])
    def test_scale_convert(shape, seed):
        s = (torch.rand(shape) * 0.02 + 1e-4).to(torch.bfloat16)
        s.view(-1, shape[-1])[0] = 0
        if shape[-1] > 1:
            s.view(-1, shape[-1])[1, 0] = 3.0
        with poisoned_empty():
            fp8, chan = scale_convert.convert_bf16_scales_to_fp8(s)
        ref_fp8, ref_chan = formats.convert_bf16_scales_to_fp8(s)
        assert fp8.dtype == FP8 and chan.dtype == torch.float32
        assert tuple(chan.shape) == (*shape[:-1], 1)
        assert torch.equal(u8(fp8), u8(ref_fp8))
        assert torch.equal(chan, ref_chan)

    def test_scale_convert_every_bf16_value():
        row = every_bf16_fp8_range_row()
        fp8, chan = scale_convert.convert_bf16_scales_to_fp8(row)
        ref_fp8, ref_chan = formats.convert_bf16_scales_to_fp8(row)
        assert torch.equal(u8(fp8), u8(ref_fp8)) and torch.equal(chan, ref_chan)

    def test_scale_convert_special_values():
        s = torch.tensor([[0.0] * 4, [-0.0] * 4, [float("inf"), 1, 2, -3], [1e-30, -1e-30, 0, 0],
                          [float("nan"), 1, 2, 3]], dtype=torch.bfloat16)
        fp8, chan = scale_convert.convert_bf16_scales_to_fp8(s)
        ref_fp8, ref_chan = formats.convert_bf16_scales_to_fp8(s)
        nan = torch.isnan(ref_fp8.float())
        assert torch.equal(torch.isnan(fp8.float()), nan)
        assert torch.equal(u8(fp8)[~nan], u8(ref_fp8)[~nan])
        assert torch.equal(chan[:4], ref_chan[:4]) and bool(torch.isnan(chan[4]))

    def test_scale_convert_empty():
        fp8, chan = scale_convert.convert_bf16_scales_to_fp8(torch.empty(0, 3, 4, dtype=torch.bfloat16))
        assert fp8.shape == (0, 3, 4) and chan.shape == (0, 3, 1)

    # --- per-token quantization ----------------------------------------------------------
    @pytest.mark.parametrize("T,K", [(1, 8), (3, 100), (4, 2048), (2, 5000), (3, 0)])
    @pytest.mark.parametrize("one_tile_max_k", [None, 128])   # 128: rows over it loop in chunks
    def test_quantize(T, K, one_tile_max_k, seed, monkeypatch):
        if one_tile_max_k is not None:
            monkeypatch.setattr(fp8_quant, "ONE_TILE_MAX_K", one_tile_max_k)
            monkeypatch.setattr(fp8_quant, "LOOP_BLOCK_K", 128)
        x = (torch.randn(T, K) * torch.rand(T, 1) * 10).to(torch.bfloat16)
        if T > 1:
            x[1] = 0
        with poisoned_empty():
            q, s = fp8_quant.quantize_fp8_per_token(x)
        rq, rs = formats.quantize_fp8_per_token(x)
        assert q.dtype == FP8 and q.shape == (T, K) and s.shape == (T, 1)
        assert torch.equal(u8(q), u8(rq)) and torch.equal(s, rs)

    def test_quantize_every_bf16_value():
        x = every_bf16_fp8_range_row()
        q, s = fp8_quant.quantize_fp8_per_token(x)
        rq, rs = formats.quantize_fp8_per_token(x)
        assert float(s) == 1.0 and torch.equal(u8(q), u8(rq))

    def test_quantize_empty_and_special():
        q, s = fp8_quant.quantize_fp8_per_token(torch.empty(0, 64, dtype=torch.bfloat16))
        assert q.shape == (0, 64) and s.shape == (0, 1)
        x = torch.tensor([[float("inf"), 1, -2, 0], [float("-inf"), float("inf"), 1, 0],
                          [1e-30, 0, -0.0, 0]], dtype=torch.bfloat16)
        q, s = fp8_quant.quantize_fp8_per_token(x)
        rq, rs = formats.quantize_fp8_per_token(x)
        nan = torch.isnan(rq.float())
        assert torch.equal(torch.isnan(q.float()), nan)
        assert torch.equal(u8(q)[~nan], u8(rq)[~nan]) and torch.equal(s, rs)

    def test_launchers_refuse_bad_layouts():
        with pytest.raises(ValueError, match="contiguous bf16"):
            scale_convert.convert_bf16_scales_to_fp8(torch.rand(4, 3).bfloat16().t())
        with pytest.raises(ValueError, match="contiguous bf16"):
            fp8_quant.quantize_fp8_per_token(torch.rand(4, 3).bfloat16().t())
