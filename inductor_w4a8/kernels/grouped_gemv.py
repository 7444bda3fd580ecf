"""CUDA-core kernel of `w4a8::grouped_gemm` for decode: a few rows per expert, weights streamed.

    out[r, n] = a_scale[r] * chan[e, n] * sum_g s[e, n, g] * sum_{k in g} a[r, k] * q[e, n, k]

Why a second kernel (docs/perf.md, session 5): with one or two rows per expert the tensor-core
kernel runs a serial load -> convert -> wgmma -> wait chain per K step and its few programs keep
too few weight bytes in flight; here each program is a (expert, up to BLOCK_M rows, BLOCK_N weight
rows) tile whose K loop has no dependency but the accumulators, so many small programs per SM
keep HBM busy. The math is fp32 FMA on CUDA cores:
  * int4 -> fp32 without converts or shifts: a layout-v3 nibble n (two's complement) xor 8 is
    q + 8; left where it sits (bits 4c..4c+3, c <= 4) under 2^23's exponent bits, the word reads
    as fp32 2^23 + (q + 8) 16^c, so one LOP3 and one FADD give q 16^c exactly, and the
    activation is pre-scaled by 16^-c (nibbles 5..7 are read from the word shifted by 20);
  * the activations are read in the layout's nibble order (formats.py: nibble p of word w of
    chunk j is K = 32 j + 16 (p // 4) + 4 w + p % 4), so no weight is ever permuted;
  * q * a is exact in fp32, and so is the sum of a word's 8 products; each word's sum is scaled
    by its group's s[e, n, g] in fp32 and accumulated per word slot, and the word slots are summed
    once per tile: the numerics contract of the tensor-core kernel (q * s never rounded), with
    fp32 (not wgmma's reduced-precision) sums.
Persistent grid from shapes, the tile list from the offsets on the device (expert_tiles.py),
int64 rows: memory-safe for any offsets, CUDA-graph safe.
"""
import triton
import triton.language as tl

from .expert_tiles import expert_m_tiles, locate_m_tile
from .fp8 import e4m3_bits_to_fp32
from .int4_decode import layout_v3_k, s4x8_to_scaled_f32
from .pdl import wait_for_prior_kernels


@triton.jit
def _a_nibble(a_row, k0, words, p: tl.constexpr, valid, HW: tl.constexpr):
    """fp32 [GW]: row a_row's activation for nibble p of each word of the group, times
    16^-place (exact: fp8 values are >= 2^-9), 0 where not valid."""
    ab = tl.load(a_row + k0 + layout_v3_k(words, p), mask=valid, other=0)
    place: tl.constexpr = p if p <= 4 else p - 5
    return e4m3_bits_to_fp32(ab, HW) * (1.0 / 16.0 ** place)


@triton.jit
def _group_partials(w_rows, a_row0, a_row1, g, nmask, valid0, valid1, words,
                    TWO_ROWS: tl.constexpr, GROUP: tl.constexpr, HW: tl.constexpr, USE_ASM: tl.constexpr):
    """fp32 [BLOCK_N, GROUP // 8] per row (one or two rows of the expert): per weight word of
    group g, the sum over its 8 nibbles of q[n, k] * a[k] (exact products); reduced over the
    words only once per tile."""
    GW: tl.constexpr = GROUP // 8
    w = tl.load(w_rows + (g * GW + words)[None, :], mask=nmask[:, None], other=0)   # int32 [BN, GW]
    k0 = g * GROUP   # a group is whole 32-K chunks, so its words' K offsets are the layout's
    part0 = tl.zeros(w.shape, dtype=tl.float32)
    part1 = tl.zeros(w.shape, dtype=tl.float32)
    q0, q1, q2, q3, q4, q5, q6, q7 = s4x8_to_scaled_f32(w, USE_ASM)     # q * 16^c
    for p in tl.static_range(8):
        q = q0 if p == 0 else q1 if p == 1 else q2 if p == 2 else q3 if p == 3 else \
            q4 if p == 4 else q5 if p == 5 else q6 if p == 6 else q7
        part0 += q * _a_nibble(a_row0, k0, words, p, valid0, HW)[None, :]
        if TWO_ROWS:
            part1 += q * _a_nibble(a_row1, k0, words, p, valid1, HW)[None, :]
    return part0, part1


@triton.jit
def w4a8_grouped_gemv_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, chan_ptr, off_ptr, out_ptr,
    R, N, K, E,
    GROUP: tl.constexpr, HAS_CHAN: tl.constexpr,
    TWO_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    GROUPS_PER_STEP: tl.constexpr, HW: tl.constexpr, USE_ASM: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """a uint8 (fp8 bits) [R, K] (rows sorted by expert), a_scale fp32 [R], w int32 [E, N, K // 8]
    (layout v3), s fp8/bf16 [E, N, K // GROUP], chan fp32 [E, N] (if HAS_CHAN), off int64
    [E + 1], out bf16 [R, N]."""
    wait_for_prior_kernels(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    BLOCK_M: tl.constexpr = 2 if TWO_ROWS else 1    # rows of one expert per tile
    start, count, m_tiles, cum_tiles, total_m = expert_m_tiles(off_ptr, R, E, BLOCK_M, BLOCK_E)
    n_tiles = tl.cdiv(N, BLOCK_N)
    total = total_m * n_tiles
    KW = K // 8
    KG = K // GROUP
    words = tl.arange(0, GROUP // 8)

    for tile in range(pid, total, nprog):
        mt = tile // n_tiles
        nt = tile % n_tiles
        e, row0, cnt, mt_in = locate_m_tile(mt, start, count, m_tiles, cum_tiles, BLOCK_E)
        m_in = mt_in * BLOCK_M
        rows = row0 + m_in                                    # int64, the tile's first row
        rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rn64 = rn.to(tl.int64)
        e64 = e.to(tl.int64)
        w_rows = w_ptr + e64 * N * KW + rn64[:, None] * KW    # [BLOCK_N, 1]
        s_rows = s_ptr + e64 * N * KG + rn64 * KG             # [BLOCK_N]
        row1 = row0 + m_in + 1                                # int64; used when TWO_ROWS
        # row validity as vectors (the interpreter turns bool-tensor & bool-scalar into int32);
        # the second row's are read only when TWO_ROWS
        ok0, ok1 = m_in < cnt, m_in + 1 < cnt
        ok0_w, ok1_w = (words * 0 + m_in) < cnt, (words * 0 + m_in + 1) < cnt
        ok0_n, ok1_n = (rn * 0 + m_in) < cnt, (rn * 0 + m_in + 1) < cnt

        acc0 = tl.zeros((BLOCK_N, GROUP // 8), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, GROUP // 8), dtype=tl.float32)
        for g0 in range(0, KG, GROUPS_PER_STEP):
            # independent groups per step: their loads are in flight together
            for j in tl.static_range(GROUPS_PER_STEP):
                g = g0 + j
                live = (words * 0 + g) < KG     # past the last group: no activation, zero scale
                live_n = (rn * 0 + g) < KG
                p0, p1 = _group_partials(w_rows, a_ptr + rows * K, a_ptr + row1 * K, g, nmask & live_n,
                                         live & ok0_w, live & ok1_w, words, TWO_ROWS, GROUP, HW, USE_ASM)
                sg = tl.load(s_rows + g, mask=nmask & live_n, other=0.0).to(tl.float32)
                acc0 += p0 * sg[:, None]
                if TWO_ROWS:
                    acc1 += p1 * sg[:, None]

        scale_n = tl.full((BLOCK_N,), 1.0, tl.float32)
        if HAS_CHAN:
            scale_n = tl.load(chan_ptr + e64 * N + rn64, mask=nmask, other=0.0)
        out0 = tl.sum(acc0, axis=1) * scale_n * tl.load(a_scale_ptr + rows, mask=ok0, other=0.0)
        tl.store(out_ptr + rows * N + rn64, out0.to(tl.bfloat16), mask=nmask & ok0_n)
        if TWO_ROWS:
            out1 = tl.sum(acc1, axis=1) * scale_n * tl.load(a_scale_ptr + row1, mask=ok1, other=0.0)
            tl.store(out_ptr + row1 * N + rn64, out1.to(tl.bfloat16), mask=nmask & ok1_n)
