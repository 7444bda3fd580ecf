"""Launcher of `w4a8::grouped_gemm` (CUDA, or CPU under TRITON_INTERPRET=1).

No host synchronization and no value-dependent shapes or grids: the output is [R, N], the grid
comes from shapes (launch/gemm_tiles.py), the per-expert tile list is built on the device.
"""
from __future__ import annotations

import functools

import torch
import triton

from ..kernels.grouped_gemm import w4a8_grouped_gemm_kernel
from ..kernels.grouped_gemv import w4a8_grouped_gemv_kernel
from ._common import (device_scratch, device_scratch_supported, fast_launch, interpreting,
                      traced_launch_defaults)
from .gemm_tiles import (GEMV_KERNEL, WGMMA_FALLBACK, WGMMA_KERNEL, GemmConstraints, GemmTile,
                         choose_tile, gemv_tile_problems, grid_size, wgmma_tile_problems)


LAST_COMPILED = None  # the last compiled kernel (for SASS / register inspection in tuning)
LAST_LOADS = None     # how the last Triton-kernel launch fetched its tiles: "tma" or "copies"
LAST_KERNEL = None    # which kernel the last launch ran: "triton", "wgmma" (Gluon) or "gemv"


def grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 w_chan_scale: torch.Tensor | None, expert_offsets: torch.Tensor, group_size: int,
                 *, tile: GemmTile | None = None, constraints: GemmConstraints | None = None,
                 use_asm: bool | None = None, wrap=None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """a fp8 [R, K], a_scale fp32 [R, 1], w int32 [E, N, K // 8] (formats layout v3), w_scale
    fp8 (+ w_chan_scale fp32 [E, N, 1]) or bf16 [E, N, K // G], expert_offsets int64 [E + 1]
    -> bf16 [R, N]. Inputs are checked by the op (ops.py) before this is called. `out` (tests:
    a poisoned bf16 [R, N] buffer) is written instead of a fresh one when given.

    wrap: torch.library.wrap_triton when torch.compile traces this launcher into Inductor's
    generated code (inductor_w4a8.lowerings); then R is symbolic, so `tile` is given.
    `tile` (a whole tile) or `constraints` (some fields, the rest from the table) override the
    table's choice. A tile of the Gluon kernel (kernel="wgmma") runs it where it can run (an
    sm_90 GPU, compiled, not traced through wrap_triton: Inductor's user-kernel path takes
    @triton.jit source only) and today's large-M Triton tile everywhere else."""
    R, K = a.shape
    E, N, _ = w.shape
    if out is None:
        out = torch.empty((R, N), dtype=torch.bfloat16, device=a.device)
    if R == 0 or N == 0:
        return out
    if tile is None:
        # the Gluon tile only where nothing is fixed: constraints name fields of the table's tiles
        tile = choose_tile(R, N, K, E, group_size, constraints=constraints,
                           allow_gluon=wrap is None and constraints is None)
    global LAST_KERNEL
    if tile.kernel == WGMMA_KERNEL:
        problems = wgmma_tile_problems(tile)
        if problems:
            raise ValueError(f"grouped_gemm: tile {tile} cannot run the Gluon kernel: "
                             f"{'; '.join(problems)}")
        if (wrap is None and wgmma_supported(a.device) and tma_loads_supported(a, w)
                and _scale_table_fits(tile, K, group_size, w_scale)):
            LAST_KERNEL = WGMMA_KERNEL
            return _launch_wgmma(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size,
                                 tile, out)
        tile = WGMMA_FALLBACK
    LAST_KERNEL = tile.kernel
    if use_asm is None:
        use_asm = a.device.type == "cuda" and not interpreting()
    if tile.kernel == GEMV_KERNEL:
        return _launch_gemv(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, tile,
                            out, use_asm, wrap)
    tma = tile.tma_loads and tile.groups_per_step == 1 and wrap is None and tma_loads_supported(a, w)
    grid = (grid_size(tile, R, N, E, a.device),)
    has_chan = w_chan_scale is not None
    chan = w_chan_scale if has_chan else w_scale  # placeholder pointer when unused
    global LAST_COMPILED, LAST_LOADS
    LAST_LOADS = "tma" if tma else "copies"
    args = (a, a_scale, w.view(torch.uint8), w_scale, chan, expert_offsets, out, R, N, K, E)
    kwargs = dict(GROUP=group_size, HAS_CHAN=has_chan,
                  BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                  BLOCK_E=max(16, triton.next_power_of_2(E)),
                  USE_ASM=use_asm, GROUPS_PER_STEP=tile.groups_per_step,
                  PREFETCH_SCALES=tile.prefetch_scales,
                  num_warps=tile.num_warps, num_stages=tile.num_stages)
    if tma:   # the descriptors are built on the device, in Triton's scratch memory
        with device_scratch(a.device):
            LAST_COMPILED = fast_launch(w4a8_grouped_gemm_kernel, grid, *args, **kwargs,
                                        TMA_LOADS=True)
    elif wrap is None:   # eager: the compiled kernel launched directly after its first launch
        LAST_COMPILED = fast_launch(w4a8_grouped_gemm_kernel, grid, *args, **kwargs)
    else:   # traced: PDL, TMA_LOADS, ... passed at their defaults (traced_launch_defaults)
        kwargs = {**traced_launch_defaults(w4a8_grouped_gemm_kernel), **kwargs}
        LAST_COMPILED = wrap(w4a8_grouped_gemm_kernel)[grid](*args, **kwargs)
    return out


def tma_loads_supported(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton kernel can fetch a and w by tensor descriptors here: an sm_90+ GPU
    (or the interpreter, which emulates them), a triton that builds descriptors on the device
    and takes our scratch memory, and 16-byte aligned bases (TMA's rule; the row strides K and
    K // 2 bytes are multiples of 16 since the group size is)."""
    if not hasattr(triton.language, "make_tensor_descriptor"):
        return False
    if not interpreting() and (a.device.type != "cuda" or _capability(a.device)[0] < 9
                               or not device_scratch_supported()):
        return False
    return a.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def wgmma_supported(device: torch.device) -> bool:
    """The Gluon wgmma kernel runs on sm_90 GPUs only, compiled (never under the interpreter)."""
    if device.type != "cuda" or interpreting():
        return False
    return _gluon_kernel() is not None and _capability(device)[0] == 9


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@functools.lru_cache(maxsize=None)
def _gluon_kernel():
    try:
        from ..kernels.grouped_gemm_wgmma import w4a8_grouped_gemm_wgmma_kernel
    except ImportError:   # a triton without Gluon: the Triton kernel serves every shape
        return None
    return w4a8_grouped_gemm_wgmma_kernel


# The Gluon kernel keeps a tile's group scales in shared memory (kernels/grouped_gemm_wgmma.py);
# beyond this (e.g. K = 16384 in groups of 32) the Triton kernel runs instead.
WGMMA_MAX_SCALE_TABLE_BYTES = 32 * 1024


def _scale_table_rows(K: int, group_size: int) -> int:
    return triton.next_power_of_2(K // group_size + 1)


def _scale_table_fits(tile: GemmTile, K: int, group_size: int, w_scale: torch.Tensor) -> bool:
    """Whether the Gluon tile's scale table for this problem fits WGMMA_MAX_SCALE_TABLE_BYTES."""
    table = _scale_table_rows(K, group_size) * tile.block_n * w_scale.element_size()
    return table <= WGMMA_MAX_SCALE_TABLE_BYTES


def _launch_wgmma(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, tile, out):
    R, K = a.shape
    E, N, _ = w.shape
    has_chan = w_chan_scale is not None
    global LAST_COMPILED
    with device_scratch(a.device):   # its two tensor descriptors are built on the device
        LAST_COMPILED = _gluon_kernel()[(grid_size(tile, R, N, E, a.device),)](
            a, a_scale, w, w_scale, w_chan_scale if has_chan else w_scale,
            expert_offsets, out, R, N, K, E,
            GROUP=group_size, HAS_CHAN=has_chan, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            BLOCK_E=max(16, triton.next_power_of_2(E)), STAGES=tile.num_stages,
            KG_PAD=_scale_table_rows(K, group_size), num_warps=tile.num_warps,
            maxnreg=register_cap(tile),
        )
    return out


def register_cap(tile: GemmTile) -> int:
    """Registers per thread that let tile.programs_per_sm programs share an SM's 64K (ptxas
    allocates in steps of 8, at most 255): the Gluon kernel's ptxas build otherwise takes all
    255 whatever the occupancy the grid assumes."""
    per_thread = 65536 // (tile.programs_per_sm * tile.num_warps * 32)
    return min(255, per_thread // 8 * 8)


def _launch_gemv(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, tile, out,
                 use_asm, wrap):
    """The CUDA-core decode kernel (kernels/grouped_gemv.py): m-tiles of tile.block_m (1 or 2)
    rows of one expert, tile.block_n weight rows, tile.groups_per_step groups per K step."""
    problems = gemv_tile_problems(tile)
    if problems:
        raise ValueError(f"grouped_gemm: tile {tile} cannot run the gemv kernel: {'; '.join(problems)}")
    R, K = a.shape
    E, N, _ = w.shape
    has_chan = w_chan_scale is not None
    grid = (grid_size(tile, R, N, E, a.device),)
    args = (a.view(torch.uint8), a_scale, w, w_scale, w_chan_scale if has_chan else w_scale,
            expert_offsets, out, R, N, K, E)
    kwargs = dict(GROUP=group_size, HAS_CHAN=has_chan, TWO_ROWS=tile.block_m == 2, BLOCK_N=tile.block_n,
                  BLOCK_E=max(16, triton.next_power_of_2(E)), GROUPS_PER_STEP=tile.groups_per_step,
                  HW=a.device.type == "cuda" and not interpreting(), USE_ASM=use_asm,
                  num_warps=tile.num_warps, num_stages=1)
    global LAST_COMPILED
    if wrap is None:
        LAST_COMPILED = fast_launch(w4a8_grouped_gemv_kernel, grid, *args, **kwargs)
    else:
        kwargs = {**traced_launch_defaults(w4a8_grouped_gemv_kernel), **kwargs}   # as above
        LAST_COMPILED = wrap(w4a8_grouped_gemv_kernel)[grid](*args, **kwargs)
    return out
