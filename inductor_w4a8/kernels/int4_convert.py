"""uint4b8 -> signed int4 nibbles, in place: every nibble v -> (v - 8) & 0xF.

For a nibble, (v - 8) mod 16 == (v + 8) mod 16 == v ^ 8 (adding 8 only flips bit 3), so a whole
int32 word converts with one XOR against formats.NIBBLE_SIGN_FLIP (0x88888888).
"""
import triton
import triton.language as tl


@triton.jit
def uint4b8_to_signed_kernel(words_ptr, n_words, SIGN_FLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_words
    w = tl.load(words_ptr + offs, mask=mask)
    tl.store(words_ptr + offs, w ^ SIGN_FLIP, mask=mask)
