"""Triton kernel: signed int4 words -> the GEMM layout (formats.py, "Layout v3")."""
import triton
import triton.language as tl


@triton.jit
def encode_int4_gemm_layout_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
    """Layout v3 over flat int32 words (rows hold a multiple of 4 words, so chunks never cross rows).

    Output word 4j + w (w = 0..3) of a 32-K chunk takes K = 4w..4w+3 (16 bits of source word
    4j + w // 2) into its low half and K = 16+4w..16+4w+3 (16 bits of source word 4j + 2 + w // 2)
    into its high half; nibbles stay two's complement.
    Out of place: `src` is only read.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    w = offs % 4
    base = offs - w
    shift = ((w % 2) * 16).to(tl.int32)
    lo_src = tl.load(src_ptr + base + w // 2, mask=mask, other=0)
    hi_src = tl.load(src_ptr + base + 2 + w // 2, mask=mask, other=0)
    lo = (lo_src >> shift) & 0xFFFF
    hi = (hi_src >> shift) & 0xFFFF
    tl.store(dst_ptr + offs, lo | (hi << 16), mask=mask)
