"""Stable counting sort of the (token, slot) pairs by expert id: count, scan, place.

The flat pairs i = t * top_k + j (N = T * top_k of them) are cut into chunks of CHUNK pairs.
Inside a chunk, a pair's rank among the earlier pairs of its expert is a column cumsum of the
one-hot [CHUNK, BLOCK_E] matrix, so placement is stable (ascending i within an expert) and
deterministic, with no atomics:

    pos(i) = expert_start[e] + (pairs of e in earlier chunks) + (pairs of e earlier in this chunk)

- `count_kernel` (one program per chunk): counts[c, e], int32 [num_chunks, E].
- `scan_kernel` (one program per BLOCK_EE experts): prefix[c, e] = sum of counts[c' < c, e],
  and totals[e].
- `place_kernel` (one program per chunk): expert_start = exclusive cumsum of totals, then the
  positions above; writes sorted_rows and flat_to_sorted, and program 0 writes expert_offsets.
  With FUSED (a single chunk: small N, decoding) it counts by itself and the sort is one launch.
- `sort_one_token` (called by the routing kernel when T = 1): the same result from the token's
  ids in registers, so that routing + sort are one launch in decode.

Every program is one shot (no loop over the data except the scan's loop over chunk tiles), grids
depend on N and E only, and ids are clamped into [0, E) before use, so no id value can address
memory out of bounds.
"""
import triton
import triton.language as tl

from .pdl import wait_for_prior_kernels


@triton.jit
def _chunk_onehot(ids_ptr, c, CHUNK, N, E, BLOCK_CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    """(flat indices [BLOCK_CHUNK], validity, one-hot int32 [BLOCK_CHUNK, BLOCK_E]) of chunk c."""
    idx = c * CHUNK + tl.arange(0, BLOCK_CHUNK)
    valid = (tl.arange(0, BLOCK_CHUNK) < CHUNK) & (idx < N)
    e = tl.load(ids_ptr + idx, mask=valid, other=0)
    e = tl.where(valid, tl.minimum(tl.maximum(e, 0), E - 1), -1)
    onehot = (e[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)
    return idx, valid, onehot


@triton.jit
def count_kernel(ids_ptr, counts_ptr, N, E, CHUNK, BLOCK_CHUNK: tl.constexpr,
                 BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    """counts[c, e] = pairs of expert e in chunk c."""
    wait_for_prior_kernels(PDL)
    c = tl.program_id(0)
    _, _, onehot = _chunk_onehot(ids_ptr, c, CHUNK, N, E, BLOCK_CHUNK, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + c * E + experts, tl.sum(onehot, axis=0), mask=experts < E)


@triton.jit
def scan_kernel(counts_ptr, prefix_ptr, totals_ptr, num_chunks, E, BLOCK_NC: tl.constexpr,
                BLOCK_EE: tl.constexpr, PDL: tl.constexpr = False):
    """prefix[c, e] = sum_{c' < c} counts[c', e]; totals[e] = sum_c counts[c, e]."""
    wait_for_prior_kernels(PDL)
    experts = tl.program_id(0) * BLOCK_EE + tl.arange(0, BLOCK_EE)
    e_ok = experts < E
    carry = tl.zeros([BLOCK_EE], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_NC):
        chunks = c0 + tl.arange(0, BLOCK_NC)
        mask = (chunks[:, None] < num_chunks) & e_ok[None, :]
        at = chunks[:, None] * E + experts[None, :]
        tile = tl.load(counts_ptr + at, mask=mask, other=0)
        inclusive = tl.cumsum(tile, axis=0)
        tl.store(prefix_ptr + at, carry[None, :] + inclusive - tile, mask=mask)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + experts, carry, mask=e_ok)


@triton.jit
def place_kernel(ids_ptr, prefix_ptr, totals_ptr, sorted_rows_ptr, flat_to_sorted_ptr,
                 offsets_ptr, N, E, CHUNK, BLOCK_CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
                 FUSED: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_prior_kernels(PDL)
    c = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    idx, valid, onehot = _chunk_onehot(ids_ptr, c, CHUNK, N, E, BLOCK_CHUNK, BLOCK_E)
    if FUSED:
        totals = tl.sum(onehot, axis=0)
        before = tl.zeros([BLOCK_E], dtype=tl.int32)
    else:
        totals = tl.load(totals_ptr + experts, mask=e_ok, other=0)
        before = tl.load(prefix_ptr + c * E + experts, mask=e_ok, other=0)
    ends = tl.cumsum(totals, axis=0)
    starts = ends - totals
    if c == 0:
        tl.store(offsets_ptr + 1 + experts, ends.to(tl.int64), mask=e_ok)
        tl.store(offsets_ptr + experts, starts.to(tl.int64), mask=experts == 0)
    slot = (starts + before)[None, :] + tl.cumsum(onehot, axis=0) - 1
    pos = tl.sum(onehot * slot, axis=1)
    tl.store(sorted_rows_ptr + pos, idx, mask=valid)
    tl.store(flat_to_sorted_ptr + idx, pos, mask=valid)


@triton.jit
def sort_one_token(ids, sorted_rows_ptr, flat_to_sorted_ptr, offsets_ptr, E, TOP_K: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_E1: tl.constexpr):
    """The sort of a single token's pairs, from its expert ids in registers (int32 [BLOCK_K], the
    first TOP_K valid, each in [0, E)): what place_kernel writes for T = 1, with no memory
    round trip, so that routing and sorting one token are one launch.

    Pair j's sorted row is the number of pairs before it in (expert, j) order (stable);
    expert_offsets[e] counts the pairs of experts below e, for e in [0, E].
    """
    j = tl.arange(0, BLOCK_K)
    valid = j < TOP_K
    before = (ids[:, None] < ids[None, :]) | ((ids[:, None] == ids[None, :]) & (j[:, None] < j[None, :]))
    pos = tl.sum((before & valid[:, None]).to(tl.int32), axis=0)              # [BLOCK_K], by j
    tl.store(flat_to_sorted_ptr + j, pos, mask=valid)
    tl.store(sorted_rows_ptr + pos, j, mask=valid)
    e = tl.arange(0, BLOCK_E1)
    below = (ids[:, None] < e[None, :]) & valid[:, None]
    tl.store(offsets_ptr + e, tl.sum(below.to(tl.int32), axis=0).to(tl.int64), mask=e <= E)
