"""The device-side work list of the CUDA-core grouped GEMM (grouped_gemv.py): (expert, m-tile) pairs.

kernels/grouped_gemm.py computes the same list inline: with these helpers called from it, Inductor's
max-autotune failed to compile the traced kernel on the H200 (an AssertionError inside Inductor,
session 5; the default compile path was fine), so the tensor-core kernel keeps its own copy.

Each expert's rows [start, start + count) of the expert-sorted activations are cut into m-tiles
of BLOCK_M rows; m-tile mt (0 <= mt < total_m) belongs to the expert whose inclusive tile cumsum
first exceeds mt. The offsets are clamped into [0, R] and made monotone by a running max, so any
offset values give in-bounds rows and no host sync is needed. Row arithmetic is int64.
"""
import triton
import triton.language as tl


@triton.jit
def _max_combine(x, y):
    return tl.maximum(x, y)


@triton.jit
def expert_m_tiles(off_ptr, R, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per expert (a [BLOCK_E] vector each): first row, row count, m-tiles and their inclusive
    cumsum; and the total number of m-tiles."""
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
    return start, count, m_tiles, cum_tiles, total_m


@triton.jit
def locate_m_tile(mt, start, count, m_tiles, cum_tiles, BLOCK_E: tl.constexpr):
    """m-tile mt -> (expert e, the expert's first row, its row count, mt's index within it)."""
    e = tl.sum((cum_tiles <= mt).to(tl.int32), 0)
    sel = tl.arange(0, BLOCK_E) == e
    row0 = tl.sum(tl.where(sel, start, 0), 0)
    cnt = tl.sum(tl.where(sel, count, 0), 0)
    first = tl.sum(tl.where(sel, cum_tiles - m_tiles, 0), 0)
    return e, row0, cnt, mt - first
