"""Gluon kernel of `w4a8::grouped_gemm` for many rows per expert (Hopper, sm_90): TMA loads,
the decoded weights fed to async wgmma from registers, the per-group promotion overlapped with
the next group's MMA.

Same contract and numerics as kernels/grouped_gemm.py:

    out[r, n] = a_scale[r] * chan[e, n] * sum_g s[e, n, g] * sum_{k in g} a[r, k] * q[e, n, k]

every group's fp8 wgmma result is multiplied by its fp32 scale and added to an fp32 accumulator
(q * s is never rounded). Why Gluon: stock Triton makes each dot wait for its own result when
that result feeds anything but the next dot's accumulator, so the promotion serializes MMA and
math; here the waits are written by hand.

One program = one out^T tile [BLOCK_N weight rows, BLOCK_M tokens] (num_warps // 4 warpgroups,
each running whole 64-row wgmmas). The activations [BLOCK_M, G] and the int32 weight words [BLOCK_N, G / 8] of each group
(one K step = one quantization group) stream through a STAGES-deep ring filled by the TMA engine
(one mbarrier per slot). A group's weights are read from the ring straight into the wgmma
register-fragment layout of the first operand and decoded there to exact e4m3 q (layout v3's
PRMT lookup, kernels/int4_decode.py): no shared-memory round trip for the decoded weights, and
no CTA barrier between decode and MMA. K steps run in pairs (g, g + 1):

    decode q(g); wgmma(g)                                | tensor cores busy from here on
    decode q(g + 1); wgmma(g + 1)                        |
    wait for wgmma(g); acc += p(g) * s(g); refill g's slot
    wait for wgmma(g + 1); acc += p(g + 1) * s(g + 1); refill its slot

so a pair's first decode and last promotion run with this warpgroup's tensor work idle (another
warpgroup or program on the SM fills it; the two CTA barriers of a pair keep the warpgroups of
a program close in step, docs/perf.md session 9). No wgmma is in flight
across the loop's back edge: carrying an in-flight accumulator through a loop makes the compiler
copy its registers, which serializes every wgmma (ptxas C7514). An odd group count runs one
group past K at the end: the TMA engine fills it with zeros and its scale is zero.

Rows of a tile past its expert's count read the next expert's rows (zeros past R): computed,
never stored. Device-side tile list, clamping of offsets, int64 row addressing and the
persistent grid are the Triton kernel's (any offsets are memory-safe, no host sync). The two
tensor descriptors are built on the device (the launcher provides Triton's scratch memory).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

from .int4_decode import S4X4_TO_FP8_CONSTRAINTS, S4X4_TO_FP8_PTX

# The Gluon API moved between triton 3.6 and 3.9 (the GPU machine / CI): one name each here.
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared


@gluon.jit
def _reinterpret_new(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return smem.reinterpret(dtype, shape, layout)


@gluon.jit
def _reinterpret_old(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return smem._reinterpret(dtype, shape, layout)


_smem_reinterpret = (_reinterpret_new if hasattr(gl.shared_memory_descriptor, "reinterpret")
                     else _reinterpret_old)


@gluon.constexpr_function
def _out_blocked(num_warps):
    """[BLOCK_N, BLOCK_M] out^T with 8 consecutive n per thread: 16-byte bf16 stores along n."""
    return gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])


@gluon.constexpr_function
def _vec_layout(num_warps):
    return gl.BlockedLayout([1], [32], [num_warps], [0])


@gluon.constexpr_function
def _mma_layout(block_m, num_warps):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, block_m, 32])


@gluon.constexpr_function
def _tma_smem_layout(cols):
    """Shared layout of a [rows, cols]-byte TMA tile that wgmma (or the fragment loads) read."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(128, cols) if cols >= 32 else 0,
                                element_bitwidth=8, rank=2)


@gluon.jit
def _max_combine(x, y):
    return gl.maximum(x, y)


@gluon.jit
def _add_combine(x, y):
    return x + y


@gluon.constexpr_function
def _words_layout(block_n, group, num_warps):
    """Layout of the int32 layout-v3 words [block_n, group // 8] of a group: each thread holds
    the words whose 8 weights its wgmma first-operand fragment holds (thread t = lane % 4 of a
    row quad: word w = t of every 32-K chunk, rows r and r + 8), so the decode's rearrangement
    into the fragment stays inside each thread."""
    regs = [[8, 0]] + [[0, 4 << i] for i in range((group // 32).bit_length() - 1)]
    rows = 16 * num_warps
    regs += [[rows << i, 0] for i in range((block_n // rows).bit_length() - 1)]
    warps = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=warps, block_bases=[], shape=[block_n, group // 8])


@gluon.jit
def _decode_fragment(words, BLOCK_N: gl.constexpr, GROUP: gl.constexpr, dot_l: gl.constexpr):
    """int32 layout-v3 words [BLOCK_N, GROUP // 8] -> e4m3 q [BLOCK_N, GROUP] in the wgmma
    first-operand layout. Word w of chunk j holds K = 32 j + 4 w + i (nibbles 0..3) and
    32 j + 16 + 4 w + i (nibbles 4..7): the word, and the word shifted right by 16, each repeated
    for the 4 bytes i it becomes, are put at those K (int32 values: register renames only), then
    one 4-byte lookup per copy set (int4_decode.S4X4_TO_FP8_PTX)."""
    x = gl.join(words, words >> 16)                              # [n, 4 j + w, h]
    x = gl.join(x, x)
    x = gl.join(x, x).reshape(BLOCK_N, GROUP // 32, 4, 2, 4)     # [n, j, w, h, i]
    x = gl.permute(x, (0, 1, 3, 2, 4)).reshape(BLOCK_N, GROUP)   # k = 32 j + 16 h + 4 w + i
    x = gl.convert_layout(x, dot_l)
    return gl.inline_asm_elementwise(asm=S4X4_TO_FP8_PTX, constraints=S4X4_TO_FP8_CONSTRAINTS,
                                     args=[x], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _load_scale_table(s_smem, s_ptr, e64, n0, N, KG, BLOCK_N: gl.constexpr,
                      KG_PAD: gl.constexpr, num_warps: gl.constexpr):
    """All group scales of the tile, [KG_PAD, BLOCK_N] in shared memory (zero for n >= N and
    for groups >= KG): one load latency per tile instead of a global load in the K loop."""
    s_l: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, num_warps], [0, 1])
    sn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_l))
    sg = gl.arange(0, KG_PAD, layout=gl.SliceLayout(0, s_l))
    ptrs = s_ptr + e64 * N * KG + (n0 + sn).to(gl.int64)[:, None] * KG + sg[None, :]
    tab = gl.load(ptrs, mask=((n0 + sn) < N)[:, None] & (sg < KG)[None, :], other=0.0)
    s_smem.store(gl.permute(tab, (1, 0)))


@gluon.jit
def _issue_loads(grp, base, a_desc, w_desc, a_ring, w_ring, ready, a_row, w_row,
                 GROUP: gl.constexpr, STAGES: gl.constexpr, pred):
    """TMA of group grp's activation and weight tiles into ring slot (base + grp) % STAGES,
    completing on that slot's mbarrier (skipped where pred is false)."""
    slot = (base + grp) % STAGES
    bar = ready.index(slot)
    mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
    _tma_load(a_desc, [a_row, grp * GROUP], bar, a_ring.index(slot), pred=pred)
    _tma_load(w_desc, [w_row, grp * (GROUP // 8)], bar, w_ring.index(slot), pred=pred)


@gluon.jit
def _fragment(grp, base, w_ring, ready, BLOCK_N: gl.constexpr, GROUP: gl.constexpr,
              STAGES: gl.constexpr, dot_l: gl.constexpr, num_warps: gl.constexpr):
    """Wait for group grp's tiles; its weights decoded to e4m3 in the first-operand layout."""
    slot = (base + grp) % STAGES
    mbarrier.wait(ready.index(slot), ((base + grp) // STAGES) & 1)
    words = w_ring.index(slot).load(_words_layout(BLOCK_N, GROUP, num_warps))
    return _decode_fragment(words, BLOCK_N, GROUP, dot_l)


@gluon.jit
def _mma(grp, base, wq, a_ring, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
         BLOCK_M: gl.constexpr, mma_l: gl.constexpr):
    return warpgroup_mma(wq, a_ring.index((base + grp) % STAGES).permute((1, 0)),
                         gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma_l),
                         use_acc=False, is_async=True)


@gluon.jit
def _scales(s_smem, grp, mma_l: gl.constexpr):
    """fp32 scales [BLOCK_N] of group grp (zero past the last group) from the tile's table."""
    return s_smem.index(grp).load(gl.SliceLayout(1, mma_l)).to(gl.float32)


@gluon.jit
def _tile_k_loop(base, KG2, a_desc, w_desc, a_ring, w_ring, ready, s_smem, a_row, w_row,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP: gl.constexpr,
                 STAGES: gl.constexpr, mma_l: gl.constexpr, dot_l: gl.constexpr,
                 num_warps: gl.constexpr):
    """acc [BLOCK_N, BLOCK_M] of one tile over KG2 (KG rounded up to even) groups; ring
    slots base .. base + KG2 - 1 (mod STAGES). Pairs of groups as the module docstring says;
    group j's tiles are requested once wgmma(j - STAGES) has finished in every warp, so
    STAGES - 2 groups load while a pair computes."""
    for st in gl.static_range(STAGES):
        _issue_loads(st, base, a_desc, w_desc, a_ring, w_ring, ready, a_row, w_row, GROUP,
                     STAGES, st < KG2)
    acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma_l)
    for g in range(0, KG2, 2):
        # the decoded weights are not carried across the back edge: a loop-carried fp8 tensor
        # is unpacked into bytes and packed again at the edge (~64 PRMT per group)
        wq0 = _fragment(g, base, w_ring, ready, BLOCK_N, GROUP, STAGES, dot_l, num_warps)
        p0 = _mma(g, base, wq0, a_ring, STAGES, BLOCK_N, BLOCK_M, mma_l)
        wq1 = _fragment(g + 1, base, w_ring, ready, BLOCK_N, GROUP, STAGES, dot_l, num_warps)
        p1 = _mma(g + 1, base, wq1, a_ring, STAGES, BLOCK_N, BLOCK_M, mma_l)
        d0 = warpgroup_mma_wait(1, deps=(p0,))
        acc += d0 * _scales(s_smem, g, mma_l)[:, None]
        _cta_barrier()   # every warp is past wgmma(g): its slot may be refilled
        _issue_loads(g + STAGES, base, a_desc, w_desc, a_ring, w_ring, ready, a_row, w_row,
                     GROUP, STAGES, g + STAGES < KG2)
        d1 = warpgroup_mma_wait(0, deps=(p1,))
        acc += d1 * _scales(s_smem, g + 1, mma_l)[:, None]
        _cta_barrier()
        _issue_loads(g + 1 + STAGES, base, a_desc, w_desc, a_ring, w_ring, ready, a_row, w_row,
                     GROUP, STAGES, g + 1 + STAGES < KG2)
    return acc


@gluon.jit
def _store_tile(acc, out_ptr, a_scale_ptr, chan_ptr, e64, n0, row0, m0, cnt, N,
                HAS_CHAN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                mma_l: gl.constexpr, num_warps: gl.constexpr):
    """out[rows, n] = bf16(acc^T * chan * a_scale) for the tile's rows of its expert."""
    out_l: gl.constexpr = _out_blocked(num_warps)
    if HAS_CHAN:
        sn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_l))
        chan = gl.load(chan_ptr + e64 * N + (n0 + sn), mask=(n0 + sn) < N, other=0.0)
        acc = acc * chan[:, None]
    out = gl.convert_layout(acc, out_l)
    on = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
    om = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))
    o_rmask = (m0 + om) < cnt
    o_rows = row0 + m0 + om                                               # int64
    a_sc = gl.load(a_scale_ptr + o_rows, mask=o_rmask, other=0.0)
    out = (out * a_sc[None, :]).to(gl.bfloat16)
    gl.store(out_ptr + o_rows[None, :] * N + (n0 + on).to(gl.int64)[:, None], out,
             mask=((n0 + on) < N)[:, None] & o_rmask[None, :])


@gluon.jit
def w4a8_grouped_gemm_wgmma_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, chan_ptr, off_ptr, out_ptr,
    R, N, K, E,
    GROUP: gl.constexpr, HAS_CHAN: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr,
    KG_PAD: gl.constexpr, num_warps: gl.constexpr,
):
    """Arguments as w4a8_grouped_gemm_kernel's, but w: the int32 layout-v3 words; a and w 16-byte
    aligned). STAGES >= 3; KG_PAD: a power of two > K // GROUP (the scale table's rows, one
    spare for the odd count's zero group). BLOCK_N: a multiple of 16 * num_warps."""
    gl.static_assert(STAGES >= 3, "a pair of groups and the next pair's first in the ring")
    gl.static_assert(BLOCK_N % (16 * num_warps) == 0, "whole 64-row wgmmas per warpgroup")
    vec_l: gl.constexpr = _vec_layout(num_warps)
    mma_l: gl.constexpr = _mma_layout(BLOCK_M, num_warps)
    dot_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_l, k_width=4)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    # ---- per-expert row ranges, clamped and monotone, and the m-tile list (device side) ----
    eidx = gl.arange(0, BLOCK_E, layout=vec_l)
    emask = eidx < E
    lo_off = gl.load(off_ptr + eidx, mask=emask, other=0).to(gl.int64)
    hi_off = gl.load(off_ptr + eidx + 1, mask=emask, other=0).to(gl.int64)
    # clamped into [0, R], the row ranges fit int32 (fewer registers held through the tiles)
    lo_off = gl.minimum(gl.maximum(lo_off, 0), R).to(gl.int32)
    hi_off = gl.minimum(gl.maximum(hi_off, 0), R).to(gl.int32)
    start = gl.associative_scan(lo_off, 0, _max_combine)
    end = gl.maximum(gl.associative_scan(hi_off, 0, _max_combine), start)
    count = gl.where(emask, end - start, 0)
    m_tiles = (count + BLOCK_M - 1) // BLOCK_M
    cum_tiles = gl.associative_scan(m_tiles, 0, _add_combine)
    total_m = gl.sum(m_tiles, 0).to(gl.int32)
    n_tiles = gl.cdiv(N, BLOCK_N)
    total = total_m * n_tiles

    KG = K // GROUP
    KG2 = KG + KG % 2
    a_sl: gl.constexpr = _tma_smem_layout(GROUP)
    w_sl: gl.constexpr = gl.NVMMASharedLayout(
        swizzle_byte_width=min(128, GROUP // 2) if GROUP >= 64 else 0, element_bitwidth=32, rank=2)
    a_desc = tma.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[K, 1],
                                        block_shape=[BLOCK_M, GROUP], layout=a_sl)
    w_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * N, K // 8], strides=[K // 8, 1],
                                        block_shape=[BLOCK_N, GROUP // 8], layout=w_sl)
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, GROUP], a_sl)
    w_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GROUP // 8], w_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
    fence_async_shared()
    # the scale table: stored as one [KG_PAD, BLOCK_N] tile, read as KG_PAD rows of [BLOCK_N]
    s_tab = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [KG_PAD, BLOCK_N],
                                      gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    s_smem = _smem_reinterpret(s_tab, s_ptr.dtype.element_ty, [KG_PAD, BLOCK_N],
                               gl.SwizzledSharedLayout(1, 1, 1, [0]))

    base = 0   # ring slots used by this program's earlier tiles
    for tile in range(pid, total, nprog):
        mt = tile // n_tiles
        nt = tile % n_tiles
        # expert of this m-tile: number of experts whose inclusive tile cumsum is <= mt
        e = gl.sum((cum_tiles <= mt).to(gl.int32), 0)
        sel = eidx == e
        row0 = gl.sum(gl.where(sel, start, 0), 0)
        cnt = gl.sum(gl.where(sel, count, 0), 0)
        first = gl.sum(gl.where(sel, cum_tiles - m_tiles, 0), 0)
        m0 = (mt - first) * BLOCK_M
        n0 = nt * BLOCK_N
        e64 = e.to(gl.int64)
        row0 = row0.to(gl.int64)

        _load_scale_table(s_tab, s_ptr, e64, n0, N, KG, BLOCK_N, KG_PAD, num_warps)
        _cta_barrier()   # the table is written before any warp reads it
        acc = _tile_k_loop(base, KG2, a_desc, w_desc, a_ring, w_ring, ready, s_smem,
                           (row0 + m0).to(gl.int32), e * N + n0, BLOCK_M, BLOCK_N, GROUP,
                           STAGES, mma_l, dot_l, num_warps)
        base += KG2
        _cta_barrier()   # every warp has read the table before the next tile rewrites it
        _store_tile(acc, out_ptr, a_scale_ptr, chan_ptr, e64, n0, row0, m0, cnt, N, HAS_CHAN,
                    BLOCK_M, BLOCK_N, mma_l, num_warps)
