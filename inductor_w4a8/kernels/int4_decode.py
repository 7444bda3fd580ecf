"""The layout-v3 int4 decodes on the device, written once (formats.py holds the host definition
of the layout, `encode_gemm_layout` / `decode_gemm_layout`): to e4m3 for the tensor-core kernels
(below), to fp32 for the CUDA-core decode kernel (`s4x8_to_scaled_f32`), and the nibble -> K map
(`layout_v3_k`).

One layout-v3 word (4 bytes = 8 signed nibbles) -> (e4m3 of nibbles 0..3, e4m3 of nibbles 4..7),
each 4 fp8 in one 32-bit register. CUTLASS-style lookup: PRMT indexes an 8-byte table with a
nibble's low 3 bits; tables e4m3(0..7) and e4m3(-8..-1); the final PRMT takes byte i from the
first (sign 0) or the second (sign 1) lookup, its selector i + 4 * sign built with one shift and
one LOP3. The same PTX serves the Triton kernel and the Gluon kernel (each language has its own
inline-asm builtin, so each gets a two-line wrapper around this one text).
"""
import triton
import triton.language as tl

# The lookup tables, as the 32-bit halves PRMT indexes: e4m3 of q = 0..3 | 4..7 (sign 0) and of
# q = -8..-5 | -4..-1 (sign 1), byte i of a half holding the value at index i.
_E4M3_POS = ("0x44403800", "0x4E4C4A48")
_E4M3_NEG = ("0xCACCCED0", "0xB8C0C4C8")

# One line, no newlines: Inductor copies this global into its generated kernel source as a
# plain quoted string, where a multi-line literal is a syntax error.
S4X8_TO_FP8_PTX = tl.constexpr(" ".join((
    "{",
    ".reg .b32 pa, pb, na, nb, idx, s, idxh, sh, p0, n0, p1, n1;",
    f"mov.b32 pa, {_E4M3_POS[0]};",
    f"mov.b32 pb, {_E4M3_POS[1]};",
    f"mov.b32 na, {_E4M3_NEG[0]};",
    f"mov.b32 nb, {_E4M3_NEG[1]};",
    "and.b32 idx, $2, 0x77777777;",
    "shr.u32 s, $2, 1;",
    "lop3.b32 s, s, 0x44444444, 0x32103210, 0xEA;",
    "shr.u32 idxh, idx, 16;",
    "shr.u32 sh, s, 16;",
    "prmt.b32 p0, pa, pb, idx;",
    "prmt.b32 n0, na, nb, idx;",
    "prmt.b32 $0, p0, n0, s;",
    "prmt.b32 p1, pa, pb, idxh;",
    "prmt.b32 n1, na, nb, idxh;",
    "prmt.b32 $1, p1, n1, sh;",
    "}",
)))
S4X8_TO_FP8_CONSTRAINTS = tl.constexpr("=r,=r,r")

# The low half of the same lookup: nibbles 0..3 of a word -> 4 e4m3 in one register (the high
# 16 bits are ignored, so nibbles 4..7 are converted by passing the word shifted right by 16).
# The Gluon kernel's decode (kernels/grouped_gemm_wgmma.py) calls it on int32 words, each
# repeated once per output byte (pack 4: four copies of one word in, four fp8 out): an int32
# tensor can be put in the wgmma fragment order by renaming registers alone, where the two
# outputs of S4X8_TO_FP8_PTX, joined byte by byte, need PRMT shuffles.
S4X4_TO_FP8_PTX = tl.constexpr(" ".join((
    "{",
    ".reg .b32 idx, s, p, n;",
    "and.b32 idx, $1, 0x7777;",
    "shr.u32 s, $1, 1;",
    "lop3.b32 s, s, 0x4444, 0x3210, 0xEA;",
    f"prmt.b32 p, {_E4M3_POS[0]}, {_E4M3_POS[1]}, idx;",
    f"prmt.b32 n, {_E4M3_NEG[0]}, {_E4M3_NEG[1]}, idx;",
    "prmt.b32 $0, p, n, s;",
    "}",
)))
S4X4_TO_FP8_CONSTRAINTS = tl.constexpr("=r,r,r,r,r")


@triton.jit
def s4x8_to_fp8(b):
    """uint8 tensor of layout-v3 bytes (4 per word, contiguous per thread) -> two fp8 tensors of
    its shape: element c = 4 w + i of a word's four is nibble i (first) or 4 + i (second)."""
    return tl.inline_asm_elementwise(asm=S4X8_TO_FP8_PTX, constraints=S4X8_TO_FP8_CONSTRAINTS,
                                     args=[b], dtype=(tl.float8e4nv, tl.float8e4nv),
                                     is_pure=True, pack=4)


@triton.jit
def s4_tile_to_fp8_ops(b, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """uint8 [BLOCK_N, GROUP // 2] layout-v3 bytes -> fp8 q [BLOCK_N, GROUP] in natural K order,
    in plain Triton ops (the interpreter path): u = n ^ 8 = q + 8, and 0x6400 | u read as fp16
    is 1024 + u, so subtracting 1032 gives q exactly."""
    lo = (((b & 0xF) ^ 8).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    hi = (((b >> 4) ^ 8).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    # nibble p of word w of chunk j: p = 2 * (byte in word) + (0 low | 1 high)
    q = tl.join(lo, hi).reshape(BLOCK_N, GROUP // 32, 4, 2, 4)   # [n, j, w, h, b]
    q = tl.permute(q, (0, 1, 3, 2, 4)).reshape(BLOCK_N, GROUP)    # k = 32 j + 16 h + 4 w + b
    return q.to(tl.float8e4nv)


@triton.jit
def s4_tile_to_fp8_asm(b, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """As s4_tile_to_fp8_ops, by the PRMT lookup (compiled for the GPU)."""
    wlo, whi = s4x8_to_fp8(b)
    # element c = 16 j + 4 w + i of the two outputs: K = 32 j + 4 w + i and 32 j + 16 + 4 w + i
    wq = tl.join(wlo, whi).reshape(BLOCK_N, GROUP // 32, 4, 4, 2)   # [n, j, w, i, h]
    return tl.permute(wq, (0, 1, 4, 2, 3)).reshape(BLOCK_N, GROUP)


@triton.jit
def layout_v3_k(word, nibble: tl.constexpr):
    """K index (within the row) of nibble `nibble` of layout-v3 word index `word` (formats.py:
    chunk j = word // 4, w = word % 4; nibble p < 4 -> 32 j + 4 w + p, else 32 j + 16 + 4 w + p - 4),
    for kernels that read the activations in the weights' nibble order."""
    return 32 * (word // 4) + 4 * (word % 4) + (16 * (nibble // 4) + nibble % 4)


@triton.jit
def _magic_nibble_ops(word, p: tl.constexpr):
    """fp32 2^23 + (q + 8) 16^place of nibble p, its bits made with plain ops (the interpreter's
    path): (n & mask) ^ (8 << 4 place) is (q + 8) << 4 place, under 2^23's exponent bits. `word`
    is the layout-v3 word (p <= 4) or it shifted right by 20 (p >= 5)."""
    place: tl.constexpr = p if p <= 4 else p - 5
    bits = (word & (0xF << (4 * place))) ^ (0x4B000000 | (8 << (4 * place)))
    return bits.to(tl.float32, bitcast=True)


# The same 8 values as _magic_nibble_ops gives, from one word in 11
# instructions: the biased nibbles 0..4 under 2^23's exponent once per word, then one AND with
# one immediate per nibble. Inline PTX because LLVM folds (w ^ c) & m back into (w & m) ^ c',
# which needs two constants per nibble (a register move each on sm_90).
S4X8_TO_MAGIC_F32_PTX = tl.constexpr(" ".join((
    "{",
    ".reg .b32 lo, hi;",
    "and.b32 lo, $8, 0x000FFFFF;",
    "xor.b32 lo, lo, 0x4B088888;",
    "shr.u32 hi, $8, 20;",
    "xor.b32 hi, hi, 0x4B000888;",
    "and.b32 $0, lo, 0x7F80000F;",
    "and.b32 $1, lo, 0x7F8000F0;",
    "and.b32 $2, lo, 0x7F800F00;",
    "and.b32 $3, lo, 0x7F80F000;",
    "and.b32 $4, lo, 0x7F8F0000;",
    "and.b32 $5, hi, 0x7F80000F;",
    "and.b32 $6, hi, 0x7F8000F0;",
    "and.b32 $7, hi, 0x7F800F00;",
    "}",
)))


@triton.jit
def _magic_nibbles_asm(w):
    f32 = tl.float32
    return tl.inline_asm_elementwise(asm=S4X8_TO_MAGIC_F32_PTX, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
                                     args=[w], dtype=(f32, f32, f32, f32, f32, f32, f32, f32),
                                     is_pure=True, pack=1)


@triton.jit
def s4x8_to_scaled_f32(w, USE_ASM: tl.constexpr):
    """int32 layout-v3 words -> 8 fp32 tensors of its shape: nibble p (two's complement q) as
    q * 16^c exactly, c = p for p <= 4 and p - 5 above (the caller scales its other operand by
    16^-c). Each is read as 2^23 + (q + 8) * 16^c and the bias subtracted: no int -> float
    converts, no per-nibble shifts. USE_ASM: the 11-instruction PTX (compiled); else plain ops
    (the interpreter)."""
    if USE_ASM:
        m0, m1, m2, m3, m4, m5, m6, m7 = _magic_nibbles_asm(w)
    else:
        w_hi = (w.to(tl.uint32, bitcast=True) >> 20).to(tl.int32, bitcast=True)      # nibbles 5..7
        m0, m1 = _magic_nibble_ops(w, 0), _magic_nibble_ops(w, 1)
        m2, m3 = _magic_nibble_ops(w, 2), _magic_nibble_ops(w, 3)
        m4, m5 = _magic_nibble_ops(w, 4), _magic_nibble_ops(w_hi, 5)
        m6, m7 = _magic_nibble_ops(w_hi, 6), _magic_nibble_ops(w_hi, 7)
    return (m0 - 8388616.0, m1 - 8388736.0, m2 - 8390656.0, m3 - 8421376.0, m4 - 8912896.0,
            m5 - 8388616.0, m6 - 8388736.0, m7 - 8390656.0)    # 2^23 + 8 * 16^c
