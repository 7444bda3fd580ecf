"""Gluon kernel of `w4a8::grouped_gemm` for many rows per expert (Hopper, sm_90): async wgmma
with the per-group fp32 promotion overlapped with the next group's MMA.

Same contract and numerics as kernels/grouped_gemm.py:

    out[r, n] = a_scale[r] * chan[e, n] * sum_g s[e, n, g] * sum_{k in g} a[r, k] * q[e, n, k]

every group's fp8 wgmma result is multiplied by its fp32 scale and added to an fp32 accumulator
(q * s is never rounded). Why Gluon: stock Triton makes each dot wait for its own result when
that result feeds anything but the next dot's accumulator, so the promotion serializes MMA and
math; here the wait is written by hand.

One program = one out^T tile [BLOCK_N weight rows, BLOCK_M tokens]; with 8 warps two
warpgroups of 64 weight rows each. Per tile: the group scales go to a shared table, and the
activations and int4 weights of each group (one K step = one quantization group) stream
through a STAGES-deep cp.async ring. K step g:
  1. wgmma(g) is issued asynchronously on (e4m3 weights, activations), both in shared memory;
  2. wait until only wgmma(g) is in flight, then promote wgmma(g - 1): acc += p * s[g - 1];
  3. group g + 1's int4 weights are read back from the ring and decoded to exact e4m3 q by the
     layout-v3 PRMT lookup (kernels/int4_decode.py) into the other weight buffer;
  4. group g + STAGES - 1's copies are issued into the slot wgmma(g - 1) read.
So the tensor cores run wgmma(g) while the warps promote, decode and issue copies. Two groups
per loop iteration (two accumulators, no wgmma in flight across the back edge).

Device-side tile list, clamping of offsets, int64 row addressing and the persistent grid are
the same as the Triton kernel's (any offsets are memory-safe, no host sync).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

from .int4_decode import s4_tile_to_fp8_asm

# The Gluon API moved between triton 3.6 and 3.9 (the GPU machine / CI): one name each here.
if hasattr(async_copy, "async_load"):
    _cp_async = async_copy.async_load                     # triton >= 3.7
else:
    _cp_async = async_copy.async_copy_global_to_shared    # triton 3.6
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _reinterpret_new(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return smem.reinterpret(dtype, shape, layout)


@gluon.jit
def _reinterpret_old(smem, dtype: gl.constexpr, shape: gl.constexpr, layout: gl.constexpr):
    return smem._reinterpret(dtype, shape, layout)


_smem_reinterpret = (_reinterpret_new if hasattr(gl.shared_memory_descriptor, "reinterpret")
                     else _reinterpret_old)


@gluon.constexpr_function
def _rows_blocked(cols, vec, num_warps):
    """A blocked layout of [rows, cols] with `vec` contiguous elements of a row per thread."""
    tpc = max(1, min(32, cols // vec))
    return gl.BlockedLayout([1, vec], [32 // tpc, tpc], [num_warps, 1], [1, 0])


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
def _fp8_smem_layout(cols):
    """Shared layout of [rows, cols] bytes (the wgmma operands, and the int4 ring)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(128, cols) if cols >= 32 else 0,
                                element_bitwidth=8, rank=2)


@gluon.jit
def _max_combine(x, y):
    return gl.maximum(x, y)


@gluon.jit
def _add_combine(x, y):
    return x + y


@gluon.jit
def _decode_group(wb, BLOCK_N: gl.constexpr, GROUP: gl.constexpr):
    """uint8 [BLOCK_N, GROUP // 2] layout-v3 bytes -> e4m3 q [BLOCK_N, GROUP] in natural K order.
    Each thread holds whole 32-K chunks, so the join / reshape / permute only rename registers."""
    return s4_tile_to_fp8_asm(wb, BLOCK_N, GROUP)


@gluon.jit
def _issue_copy(grp, a_ring, w_ring, a_rows, w_rows, a_rmask, w_nmask, KG,
                GROUP: gl.constexpr, STAGES: gl.constexpr):
    """cp.async of group grp's activations and int4 weights into ring slot grp % STAGES (one
    commit group). Past the last group the last one is copied again: its MMA then meets zero
    scales, and the masks stay loop-invariant (rows of the expert, n < N)."""
    src = gl.minimum(grp, KG - 1)
    _cp_async(a_ring.index(grp % STAGES), a_rows + src * GROUP, mask=a_rmask)
    _cp_async(w_ring.index(grp % STAGES), w_rows + src * (GROUP // 2), mask=w_nmask)
    async_copy.commit_group()


@gluon.jit
def _stage_weights(grp, w_ring, w_buf, GROUP: gl.constexpr, STAGES: gl.constexpr,
                   BLOCK_N: gl.constexpr, w_l: gl.constexpr):
    """Wait for group grp's copies, decode its int4 weights to e4m3 into w_buf. Each thread
    reads back exactly the bytes its own cp.async wrote (same layout), so only its own
    wait is needed; the caller's barrier publishes w_buf and the activations to the wgmma.
    Called before the step's own copy is issued: STAGES - 3 copy groups may stay in flight.
    The proxy fence compiles to MEMBAR.ALL.CTA, which waits for this thread's outstanding
    memory operations: so no global load may be in flight here that is not needed yet (the
    scales come from shared memory, the next copy is issued after the fence)."""
    async_copy.wait_group(STAGES - 3)
    wb = w_ring.index(grp % STAGES).load(w_l)
    w_buf.store(_decode_group(wb, BLOCK_N, GROUP))
    fence_async_shared()


@gluon.jit
def _scales(s_smem, grp, mma_l: gl.constexpr):
    """fp32 scales [BLOCK_N] of group grp (zero past the last group) from the tile's table."""
    return s_smem.index(grp).load(gl.SliceLayout(1, mma_l)).to(gl.float32)


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
def _mma(g, w_buf, a_ring, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
         mma_l: gl.constexpr):
    return warpgroup_mma(w_buf, a_ring.index(g % STAGES).permute((1, 0)),
                         gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma_l),
                         use_acc=False, is_async=True)


@gluon.jit
def _overlap_step(g, acc, p_prev, s_prev, w_buf, w_next, a_ring, w_ring, a_rows, w_rows,
                  a_rmask, w_nmask, KG, GROUP: gl.constexpr, STAGES: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, mma_l: gl.constexpr,
                  w_l: gl.constexpr):
    """Issue wgmma(g) on w_buf; promote wgmma(g - 1) while it runs; refill the ring slot and
    the weight buffer wgmma(g - 1) read; decode group g + 1 into w_next (= that buffer).
    Returns (acc, token of wgmma(g))."""
    p = _mma(g, w_buf, a_ring, STAGES, BLOCK_N, BLOCK_M, mma_l)
    done = warpgroup_mma_wait(1, deps=(p_prev,))
    acc += done * s_prev[:, None]
    _cta_barrier()   # every warpgroup's wgmma(g - 1) finished: its buffers are free
    _stage_weights(g + 1, w_ring, w_next, GROUP, STAGES, BLOCK_N, w_l)
    _issue_copy(g + STAGES - 1, a_ring, w_ring, a_rows, w_rows, a_rmask, w_nmask, KG,
                GROUP, STAGES)
    _cta_barrier()
    return acc, p


@gluon.jit
def w4a8_grouped_gemm_wgmma_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, chan_ptr, off_ptr, out_ptr,
    R, N, K, E,
    GROUP: gl.constexpr, HAS_CHAN: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_E: gl.constexpr, STAGES: gl.constexpr,
    KG_PAD: gl.constexpr, num_warps: gl.constexpr,
):
    """Arguments as w4a8_grouped_gemm_kernel's (w: uint8 view of layout v3). STAGES >= 3;
    KG_PAD: a power of two > K // GROUP (the scale table's rows, one spare for the odd
    count's zero group)."""
    gl.static_assert(STAGES >= 3, "the ring keeps STAGES - 3 copy groups in flight at each wait")
    vec_l: gl.constexpr = _vec_layout(num_warps)
    w_l: gl.constexpr = _rows_blocked(GROUP // 2, 16, num_warps)
    a_l: gl.constexpr = _rows_blocked(GROUP, 16, num_warps)
    mma_l: gl.constexpr = _mma_layout(BLOCK_M, num_warps)
    out_l: gl.constexpr = _out_blocked(num_warps)
    w_sl: gl.constexpr = _fp8_smem_layout(GROUP)
    a_sl: gl.constexpr = _fp8_smem_layout(GROUP)
    wr_sl: gl.constexpr = _fp8_smem_layout(GROUP // 2)

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    # ---- per-expert row ranges, clamped and monotone, and the m-tile list (device side) ----
    eidx = gl.arange(0, BLOCK_E, layout=vec_l)
    emask = eidx < E
    lo_off = gl.load(off_ptr + eidx, mask=emask, other=0).to(gl.int64)
    hi_off = gl.load(off_ptr + eidx + 1, mask=emask, other=0).to(gl.int64)
    lo_off = gl.minimum(gl.maximum(lo_off, 0), R)
    hi_off = gl.minimum(gl.maximum(hi_off, 0), R)
    start = gl.associative_scan(lo_off, 0, _max_combine)
    end = gl.maximum(gl.associative_scan(hi_off, 0, _max_combine), start)
    count = gl.where(emask, end - start, 0)
    m_tiles = (count + BLOCK_M - 1) // BLOCK_M
    cum_tiles = gl.associative_scan(m_tiles, 0, _add_combine)
    total_m = gl.sum(m_tiles, 0).to(gl.int32)
    n_tiles = gl.cdiv(N, BLOCK_N)
    total = total_m * n_tiles

    KH = K // 2
    KG = K // GROUP
    w_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_N, GROUP], w_sl)
    a_ring = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, GROUP], a_sl)
    w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, GROUP // 2], wr_sl)
    # the scale table: stored as one [KG_PAD, BLOCK_N] tile, read as KG_PAD rows of [BLOCK_N]
    s_tab = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [KG_PAD, BLOCK_N],
                                      gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    s_smem = _smem_reinterpret(s_tab, s_ptr.dtype.element_ty, [KG_PAD, BLOCK_N],
                               gl.SwizzledSharedLayout(1, 1, 1, [0]))

    wn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_l))
    wk = gl.arange(0, GROUP // 2, layout=gl.SliceLayout(0, w_l))
    am = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_l))
    ak = gl.arange(0, GROUP, layout=gl.SliceLayout(0, a_l))
    sn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma_l))
    on = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
    om = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_l))

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

        w_nmask = ((n0 + wn) < N)[:, None]
        w_rows = w_ptr + e64 * N * KH + (n0 + wn).to(gl.int64)[:, None] * KH + wk[None, :]
        a_rmask = ((m0 + am) < cnt)[:, None]
        a_rows = a_ptr + (row0 + m0 + am)[:, None] * K + ak[None, :]          # int64 rows
        s_nmask = (n0 + sn) < N

        # prologue: the tile's scale table, groups 0 .. STAGES - 2 in flight, group 0 decoded
        _load_scale_table(s_tab, s_ptr, e64, n0, N, KG, BLOCK_N, KG_PAD, num_warps)
        for st in gl.static_range(STAGES - 1):
            _issue_copy(st, a_ring, w_ring, a_rows, w_rows, a_rmask, w_nmask, KG, GROUP, STAGES)
        _stage_weights(0, w_ring, w_smem.index(0), GROUP, STAGES, BLOCK_N, w_l)
        _cta_barrier()

        acc = gl.zeros((BLOCK_N, BLOCK_M), gl.float32, layout=mma_l)
        # Two groups per iteration, two accumulators: wgmma(g + 1) runs while wgmma(g) is
        # promoted and group g + 2's weights are decoded. No wgmma is in flight across the
        # loop's back edge: carrying an in-flight accumulator through the loop makes the
        # compiler copy its registers, which serializes every wgmma (ptxas C7514). An odd group
        # count runs one group of zero scales at the end.
        for g in range(0, KG, 2):
            pa = _mma(g, w_smem.index(0), a_ring, STAGES, BLOCK_N, BLOCK_M, mma_l)
            # wgmma(g - 1) finished in the previous iteration: its ring slot and buffer are free
            _stage_weights(g + 1, w_ring, w_smem.index(1), GROUP, STAGES, BLOCK_N, w_l)
            _issue_copy(g + STAGES - 1, a_ring, w_ring, a_rows, w_rows, a_rmask, w_nmask, KG,
                        GROUP, STAGES)
            _cta_barrier()
            acc, pb = _overlap_step(g + 1, acc, pa, _scales(s_smem, g, mma_l), w_smem.index(1),
                                    w_smem.index(0),
                                    a_ring, w_ring, a_rows, w_rows, a_rmask, w_nmask, KG,
                                    GROUP, STAGES, BLOCK_N, BLOCK_M, mma_l, w_l)
            done = warpgroup_mma_wait(0, deps=(pb,))
            acc += done * _scales(s_smem, g + 1, mma_l)[:, None]
            _cta_barrier()   # wgmma(g + 1) finished in every warpgroup: its buffers are free
        async_copy.wait_group(0)
        _cta_barrier()   # the next tile's prologue overwrites the ring

        if HAS_CHAN:
            chan = gl.load(chan_ptr + e64 * N + (n0 + sn), mask=s_nmask, other=0.0)
            acc = acc * chan[:, None]
        out = gl.convert_layout(acc, out_l)
        o_rmask = (m0 + om) < cnt
        o_rows = row0 + m0 + om                                               # int64
        a_sc = gl.load(a_scale_ptr + o_rows, mask=o_rmask, other=0.0)
        out = (out * a_sc[None, :]).to(gl.bfloat16)
        o_nmask = (n0 + on) < N
        gl.store(out_ptr + o_rows[None, :] * N + (n0 + on).to(gl.int64)[:, None], out,
                 mask=o_nmask[:, None] & o_rmask[None, :])
