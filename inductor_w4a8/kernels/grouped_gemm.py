"""Triton kernel of `w4a8::grouped_gemm`: fp8 activations x int4 weights, grouped by expert.

    out[r, n] = a_scale[r] * chan[e, n] * sum_g s[e, n, g] * sum_{k in g} a[r, k] * q[e, n, k]

Design (see docs/perf.md for the measurements behind it):
  * Swapped operands: each program computes an out^T tile [BLOCK_N, BLOCK_M] as
    tl.dot(w_tile [BLOCK_N, G], a_tile^T [G, BLOCK_M]): the converted weight tile is the first
    (register-capable) operand of Hopper's fp8 wgmma, whose M dimension (>= 64) is the weight rows,
    so a handful of tokens per expert (BLOCK_M = 16) costs no padding of the MMA M side.
  * One K step = one quantization group: every dot's fp32 result is multiplied by the group scale
    s[e, n, g] in fp32 and accumulated in fp32 (q * s is never rounded to fp8).
  * int4 -> fp8 without int -> float converts: layout v3 (formats.py) puts the 8 nibbles of one
    32-bit word exactly where the two fp8 wgmma register-fragment registers of a thread want
    them, and three PRMT byte lookups per 4 weights (CUTLASS's int4 -> e4m3 trick, inline PTX,
    kernels/int4_decode.py) produce exact e4m3 values of q. The interpreter path
    (TRITON_INTERPRET=1) does the same arithmetic with plain Triton ops.
  * Persistent grid sized from shapes only; the (expert, m-tile, n-tile) list is derived on the
    device from expert_offsets (clamped into [0, R] and made monotone by a running max), so any
    offset values are memory-safe and no host sync is needed. Surplus programs simply find no
    tile. All row / expert address arithmetic is int64.
"""
import triton
import triton.language as tl

from .int4_decode import s4_tile_to_fp8_asm, s4_tile_to_fp8_ops
from .pdl import wait_for_prior_kernels


@triton.jit
def _max_combine(x, y):
    return tl.maximum(x, y)


@triton.jit
def _group_scale(s_rows, g, KG, rn, nmask):
    """The scales [BLOCK_N] of group g in their stored dtype; zero past the last group."""
    return tl.load(s_rows + g, mask=nmask & ((rn * 0 + g) < KG), other=0.0)


@triton.jit
def _group_scale_bits(s_rows, g, KG, rn, nmask):
    """The scales [BLOCK_N] of group g as int32 holding their stored bits; zero past the last
    group. Carried from one K step to the next as int32, a loaded scale needs no byte packing at
    the loop's back edge, so its load latency is paid where it is used, a step later."""
    if s_rows.dtype.element_ty == tl.bfloat16:
        bits = s_rows.to(tl.pointer_type(tl.uint16))
    else:
        bits = s_rows.to(tl.pointer_type(tl.uint8))
    return tl.load(bits + g, mask=nmask & ((rn * 0 + g) < KG), other=0).to(tl.int32)


@triton.jit
def _scale_of_bits(bits, s_dtype: tl.constexpr):
    """fp32 value of `_group_scale_bits`' int32 bits of a scale stored as `s_dtype`."""
    if s_dtype == tl.bfloat16:
        return (bits << 16).to(tl.float32, bitcast=True)
    return bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def _group_dot(w_rows, a_rows, g, nmask, rmask, kh, kk, BLOCK_N: tl.constexpr,
               GROUP: tl.constexpr, USE_ASM: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_M] = q[:, group g] @ a[:, group g]^T. Masked loads, not clamped
    rows: a masked cp.async fetches nothing, and most rows of a small-M tile are padding."""
    wb = tl.load(w_rows + (g * (GROUP // 2) + kh)[None, :], mask=nmask[:, None], other=0)
    at = tl.load(a_rows + (g * GROUP + kk)[None, :], mask=rmask[:, None], other=0.0)
    return tl.dot(_decoded(wb, BLOCK_N, GROUP, USE_ASM), tl.trans(at))


@triton.jit
def _decoded(wb, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, USE_ASM: tl.constexpr):
    """fp8 q [BLOCK_N, GROUP] of a group's layout-v3 bytes [BLOCK_N, GROUP // 2]."""
    if USE_ASM:
        return s4_tile_to_fp8_asm(wb, BLOCK_N, GROUP)
    return s4_tile_to_fp8_ops(wb, BLOCK_N, GROUP)


@triton.jit
def _k_loop_copies(a_rows, w_rows, s_rows, KG, rm, rn, rmask, nmask, kh, kk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                   USE_ASM: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                   PREFETCH_SCALES: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] of one tile, its tiles fetched by per-thread masked copies
    (cp.async, pipelined by Triton)."""
    s_dtype: tl.constexpr = s_rows.dtype.element_ty
    # PREFETCH_SCALES: the group scales are loaded one step ahead, carried as int32 bits and
    # converted where they are used, so a latency-bound step (one tile per program) does not
    # wait for its own scale load. Off for throughput-bound tiles: there the extra live values
    # cost more than the hidden latency (docs/perf.md, sessions 6 and 8).
    if PREFETCH_SCALES:
        s_next0 = _group_scale_bits(s_rows, 0, KG, rn, nmask)
        if GROUPS_PER_STEP == 2:
            s_next1 = _group_scale_bits(s_rows, 1, KG, rn, nmask)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(0, KG, GROUPS_PER_STEP):
        # one group per dot: its fp32 result times its scale, accumulated in fp32. Two
        # groups per step put two independent wgmma chains in flight before the first wait.
        if PREFETCH_SCALES:
            s0 = _scale_of_bits(s_next0, s_dtype)
            s_next0 = _group_scale_bits(s_rows, g + GROUPS_PER_STEP, KG, rn, nmask)
        else:
            s0 = _group_scale(s_rows, g, KG, rn, nmask)
        p0 = _group_dot(w_rows, a_rows, g, nmask, rmask, kh, kk, BLOCK_N, GROUP, USE_ASM)
        if GROUPS_PER_STEP == 2:
            # the last step of an odd KG has no second group: its loads are masked off
            # and its scale is zero
            if PREFETCH_SCALES:
                s1 = _scale_of_bits(s_next1, s_dtype)
                s_next1 = _group_scale_bits(s_rows, g + GROUPS_PER_STEP + 1, KG, rn, nmask)
            else:
                s1 = _group_scale(s_rows, g + 1, KG, rn, nmask)
            has_g1 = (rn * 0 + g + 1) < KG
            p1 = _group_dot(w_rows, a_rows, g + 1, nmask & has_g1, rmask & ((rm * 0 + g + 1) < KG),
                            kh, kk, BLOCK_N, GROUP, USE_ASM)
            acc += p0 * s0.to(tl.float32)[:, None] + p1 * s1.to(tl.float32)[:, None]
        else:
            acc += p0 * s0.to(tl.float32)[:, None]
    return acc


@triton.jit
def _k_loop_tma(a_desc, w_desc, a_row, w_row, s_rows, KG, rn, nmask,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                USE_ASM: tl.constexpr, PREFETCH_SCALES: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] of one tile, its tiles fetched by the TMA engine (descriptor loads
    at rows a_row / w_row, pipelined by Triton): no per-thread addresses or predicates in the
    loop. The tile's rows past its expert's count hold the next expert's rows (zeros past the
    end): computed and never stored."""
    s_dtype: tl.constexpr = s_rows.dtype.element_ty
    if PREFETCH_SCALES:
        s_next = _group_scale_bits(s_rows, 0, KG, rn, nmask)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(0, KG):
        if PREFETCH_SCALES:
            s0 = _scale_of_bits(s_next, s_dtype)
            s_next = _group_scale_bits(s_rows, g + 1, KG, rn, nmask)
        else:
            s0 = _group_scale(s_rows, g, KG, rn, nmask).to(tl.float32)
        wq = _decoded(w_desc.load([w_row, g * (GROUP // 2)]), BLOCK_N, GROUP, USE_ASM)
        acc += tl.dot(wq, tl.trans(a_desc.load([a_row, g * GROUP]))) * s0[:, None]
    return acc


@triton.jit
def w4a8_grouped_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, chan_ptr, off_ptr, out_ptr,
    R, N, K, E,
    GROUP: tl.constexpr, HAS_CHAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_ASM: tl.constexpr, GROUPS_PER_STEP: tl.constexpr, PREFETCH_SCALES: tl.constexpr,
    PDL: tl.constexpr = False, TMA_LOADS: tl.constexpr = False,
):
    """a fp8 [R, K] (rows sorted by expert), a_scale fp32 [R], w uint8 [E, N, K // 2] (layout v3),
    s fp8/bf16 [E, N, K // GROUP], chan fp32 [E, N] (if HAS_CHAN), off int64 [E + 1],
    out bf16 [R, N]. TMA_LOADS: a and w through tensor descriptors (16-byte aligned bases; the
    launcher decides), GROUPS_PER_STEP 1."""
    wait_for_prior_kernels(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    # ---- per-expert row ranges, clamped and monotone, and the m-tile list (device side) ----
    eidx = tl.arange(0, BLOCK_E)
    emask = eidx < E
    lo_off = tl.load(off_ptr + eidx, mask=emask, other=0).to(tl.int64)
    hi_off = tl.load(off_ptr + eidx + 1, mask=emask, other=0).to(tl.int64)
    lo_off = tl.minimum(tl.maximum(lo_off, 0), R)
    hi_off = tl.minimum(tl.maximum(hi_off, 0), R)
    start = tl.associative_scan(lo_off, 0, _max_combine)
    end = tl.maximum(tl.associative_scan(hi_off, 0, _max_combine), start)
    count = tl.where(emask, end - start, 0)
    m_tiles = (count + BLOCK_M - 1) // BLOCK_M
    cum_tiles = tl.cumsum(m_tiles, 0)
    total_m = tl.sum(m_tiles, 0).to(tl.int32)
    n_tiles = tl.cdiv(N, BLOCK_N)
    total = total_m * n_tiles

    KH = K // 2
    KG = K // GROUP
    if TMA_LOADS:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1],
                                           block_shape=[BLOCK_M, GROUP])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * N, KH], strides=[KH, 1],
                                           block_shape=[BLOCK_N, GROUP // 2])
    rm = tl.arange(0, BLOCK_M)
    kh = tl.arange(0, GROUP // 2)
    kk = tl.arange(0, GROUP)

    for tile in range(pid, total, nprog):
        mt = tile // n_tiles
        nt = tile % n_tiles
        # expert of this m-tile: number of experts whose inclusive tile cumsum is <= mt
        e = tl.sum((cum_tiles <= mt).to(tl.int32), 0)
        sel = eidx == e
        row0 = tl.sum(tl.where(sel, start, 0), 0)
        cnt = tl.sum(tl.where(sel, count, 0), 0)
        first = tl.sum(tl.where(sel, cum_tiles - m_tiles, 0), 0)
        m_in = (mt - first) * BLOCK_M + rm
        rmask = m_in < cnt
        rows = row0 + m_in                                   # int64
        rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rn64 = rn.to(tl.int64)
        e64 = e.to(tl.int64)

        s_rows = s_ptr + e64 * N * KG + rn64 * KG             # [BLOCK_N]
        if TMA_LOADS:
            acc = _k_loop_tma(a_desc, w_desc, (row0 + (mt - first) * BLOCK_M).to(tl.int32),
                              e * N + nt * BLOCK_N, s_rows, KG, rn, nmask, BLOCK_M, BLOCK_N, GROUP,
                              USE_ASM, PREFETCH_SCALES)
        else:
            w_rows = w_ptr + e64 * N * KH + rn64[:, None] * KH    # [BLOCK_N, 1]
            a_rows = a_ptr + rows[:, None] * K                    # [BLOCK_M, 1]
            acc = _k_loop_copies(a_rows, w_rows, s_rows, KG, rm, rn, rmask, nmask, kh, kk, BLOCK_M,
                                 BLOCK_N, GROUP, USE_ASM, GROUPS_PER_STEP, PREFETCH_SCALES)

        if HAS_CHAN:
            chan = tl.load(chan_ptr + e64 * N + rn64, mask=nmask, other=0.0)
            acc = acc * chan[:, None]
        a_sc = tl.load(a_scale_ptr + rows, mask=rmask, other=0.0)
        acc = acc * a_sc[None, :]
        out = tl.trans(acc).to(tl.bfloat16)                   # [BLOCK_M, BLOCK_N]
        tl.store(out_ptr + rows[:, None] * N + rn64[None, :], out,
                 mask=rmask[:, None] & nmask[None, :])
