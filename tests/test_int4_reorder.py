"""The Triton encode/reorder kernel (signed int4 words -> GEMM layout v3), bit exact vs formats.

CPU: under TRITON_INTERPRET=1 (this file re-runs itself in a child process with the variable set,
because Triton reads it when a kernel is decorated). GPU (`-m cuda`): real sizes, GLM-4.6 w13/w2.
"""
import os

import pytest
import torch

from inductor_w4a8 import formats
from inductor_w4a8.testing import run_interpreted

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _signed_words(*shape, device="cpu"):
    w = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device)
    w.view(-1)[:4] = torch.tensor([-2**31, -1, 0, 2**31 - 1], dtype=torch.int32, device=device)
    return w


def test_layout_roundtrip_every_nibble():
    """Pure-torch encoder/decoder: every nibble value at every position of a chunk."""
    q = ((torch.arange(16)[:, None] + torch.arange(64)[None, :]) % 16 - 8).reshape(1, 16, 64)
    signed = formats.pack_int4(q, biased=False)
    w, strides = formats.encode_gemm_layout(signed)
    assert w.dtype == formats.gemm_layout_dtype() and tuple(w.shape) == formats.gemm_layout_shape(1, 16, 64)
    assert torch.equal(formats.decode_gemm_layout(w).long(), q)
    assert strides.tolist() == [[16 * 8, 8, 1]]


def test_layout_v3_positions():
    """Word w of chunk j: nibbles 0..3 hold K = 32j + 4w + p, nibbles 4..7 hold K = 32j + 16 + 4w + p."""
    K = 96
    q = (torch.arange(K) % 15 - 7).reshape(1, 1, K)
    w, _ = formats.encode_gemm_layout(formats.pack_int4(q, biased=False))
    nib = formats.unpack_int4(w, biased=False).reshape(-1)       # stream order, signed
    for j in range(K // 32):
        for wd in range(4):
            for p in range(8):
                k = 32 * j + (4 * wd + p if p < 4 else 16 + 4 * wd + p - 4)
                assert nib[32 * j + 8 * wd + p] == q.reshape(-1)[k]


def test_layout_refuses_k_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        formats.encode_gemm_layout(torch.zeros(1, 2, 3, dtype=torch.int32))


if not INTERPRETED:
    def test_under_triton_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="interp")
else:
    from inductor_w4a8.launch import int4_reorder

    @pytest.mark.parametrize("shape", [(1, 1, 4), (2, 3, 8), (3, 5, 20), (1, 7, 640)])
    def test_interp_encode_bit_exact(shape, seed):
        signed = _signed_words(*shape)
        w, strides = int4_reorder.encode_and_reorder(signed)
        ref_w, ref_strides = formats.encode_gemm_layout(signed)
        assert torch.equal(w, ref_w) and torch.equal(strides, ref_strides)

    def test_interp_encode_empty():
        w, strides = int4_reorder.encode_and_reorder(torch.zeros(0, 3, 8, dtype=torch.int32))
        assert w.shape == (0, 3, 8) and strides.shape == (0, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("E,N,K", [(3, 5, 32), (7, 200, 352), (160, 3072, 5120), (160, 5120, 1536)])
def test_cuda_encode_bit_exact(E, N, K, seed):
    from inductor_w4a8.launch import int4_reorder
    signed = _signed_words(E, N, K // 8, device="cuda")
    w, strides = int4_reorder.encode_and_reorder(signed)
    ref_strides = formats.gemm_layout_strides(E, N, K, device="cuda")
    assert torch.equal(strides, ref_strides)
    step = max(1, (1 << 26) // max(1, N * K))          # compare a few experts at a time
    for e in range(0, E, step):
        ref_w, _ = formats.encode_gemm_layout(signed[e:e + step])
        assert torch.equal(w[e:e + step], ref_w), f"experts {e}..{e + step}"
