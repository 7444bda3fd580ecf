"""Launcher of `w4a8::sort_by_expert` (CUDA, or CPU under TRITON_INTERPRET=1).

Capturable: no host sync; every buffer and grid is sized from T, top_k and E. Tile choice lives
here, the kernels in `kernels/moe_sort.py`.
"""
from __future__ import annotations

import torch

from ..kernels.moe_sort import count_kernel, place_kernel, scan_kernel
from ._common import cdiv, device_guard, fast_launch, next_pow2

# A chunk's one-hot tile [CHUNK, BLOCK_E] holds at most this many elements.
ONEHOT_ELEMS = 16384
MIN_CHUNK, MAX_CHUNK = 16, 256
# scan: tiles of [SCAN_CHUNKS, SCAN_EXPERTS] counts
SCAN_CHUNKS, SCAN_EXPERTS = 256, 16


def _chunk_size(E: int) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, ONEHOT_ELEMS // next_pow2(E)))


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, *, chunk: int | None = None):
    """int32 [T, k] expert ids -> (sorted_rows int32 [T*k], flat_to_sorted int32 [T, k],
    expert_offsets int64 [E + 1]), the same as `reference.sort_by_expert`, bit for bit.

    `chunk` (a power of 2) overrides the tile choice, for tests of the multi-chunk path.
    Inputs are checked by the op (ops.py) before this is called.
    """
    E = int(num_experts)
    N = topk_ids.numel()
    dev = topk_ids.device
    sorted_rows = torch.empty((N,), dtype=torch.int32, device=dev)
    flat_to_sorted = torch.empty(topk_ids.shape, dtype=torch.int32, device=dev)
    offsets = torch.empty((E + 1,), dtype=torch.int64, device=dev)
    block_e = next_pow2(E)
    chunk = chunk or _chunk_size(E)
    if chunk != next_pow2(chunk):
        raise ValueError(f"sort_by_expert: chunk={chunk} must be a power of 2")
    num_chunks = max(cdiv(N, chunk), 1)
    ids = topk_ids.reshape(-1)
    with device_guard(topk_ids):
        if num_chunks == 1:
            # one program does everything (N = 0 included: it still writes the zero offsets)
            block_chunk = max(next_pow2(N), MIN_CHUNK)
            fast_launch(place_kernel, (1,), ids, ids, ids, sorted_rows, flat_to_sorted, offsets, N, E, N,
                               BLOCK_CHUNK=block_chunk, BLOCK_E=block_e, FUSED=True,
                               num_warps=_warps(block_chunk * block_e))
            return sorted_rows, flat_to_sorted, offsets
        counts = torch.empty((num_chunks, E), dtype=torch.int32, device=dev)
        prefix = torch.empty((num_chunks, E), dtype=torch.int32, device=dev)
        totals = torch.empty((E,), dtype=torch.int32, device=dev)
        warps = _warps(chunk * block_e)
        fast_launch(count_kernel, (num_chunks,), ids, counts, N, E, chunk, BLOCK_CHUNK=chunk, BLOCK_E=block_e,
                                    num_warps=warps)
        scan_experts = min(SCAN_EXPERTS, block_e)
        fast_launch(scan_kernel, (cdiv(E, scan_experts),), counts, prefix, totals, num_chunks, E,
                                              BLOCK_NC=min(SCAN_CHUNKS, next_pow2(num_chunks)),
                                              BLOCK_EE=scan_experts, num_warps=4)
        fast_launch(place_kernel, (num_chunks,), ids, prefix, totals, sorted_rows, flat_to_sorted, offsets,
                                    N, E, chunk, BLOCK_CHUNK=chunk, BLOCK_E=block_e, FUSED=False,
                                    num_warps=warps)
    return sorted_rows, flat_to_sorted, offsets


def _warps(tile_elems: int) -> int:
    return 4 if tile_elems <= 4096 else 8
