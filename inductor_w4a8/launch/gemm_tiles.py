"""Tile configurations of the W4A8 grouped GEMM, as data, and the function that picks one.

Kept apart from the kernel code (Inductor's mm_grouped style): the kernel takes the tile as
constexprs, this module decides them from shapes alone (never from tensor values), so the choice
is the same in eager mode, under torch.compile and inside a CUDA-graph capture.

BLOCK_M is the token side of the tile (the wgmma N dimension, 16..256), BLOCK_N the weight-row
side (the wgmma M dimension, a multiple of 64 per warpgroup). One K step is one quantization
group. programs_per_sm sets the persistent grid: NUM_SMS * programs_per_sm programs.
"""
from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    groups_per_step: int = 1   # quantization groups per K step (1 or 2 independent dots)
    # "triton": kernels/grouped_gemm.py. "wgmma": kernels/grouped_gemm_wgmma.py (Gluon, sm_90
    # only; num_stages is its activation ring depth, num_warps 8 = two warpgroups); where it
    # cannot run (no Hopper GPU, the interpreter, a trace through wrap_triton) the launcher
    # runs WGMMA_FALLBACK instead.
    # "gemv": kernels/grouped_gemv.py (CUDA cores, decode): block_m is 1 or 2 rows of one expert,
    # num_stages is unused, groups_per_step 1..4. Not in GEMM_TILES: on the H200 it is slower than
    # the Triton kernel at M = 1 and 2 (docs/perf.md, session 5), so it runs only when asked for.
    kernel: str = "triton"
    # Triton kernel only: load each group's scales one K step ahead. Helps where each program
    # runs one tile (latency bound, decode); slows throughput-bound tiles (docs/perf.md, session 6).
    prefetch_scales: bool = False
    # Triton kernel only: the activation and weight tiles fetched by the TMA engine (tensor
    # descriptors) instead of per-thread cp.async copies. Runs where descriptors can: an sm_90+
    # GPU, eager launches (not a trace through wrap_triton), 16-byte aligned a and w, one group
    # a step (the TMA loop's); the same tile with copies everywhere else.
    tma_loads: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# (upper bound of the expected rows per active expert, tile), first match wins.
# Small row counts are weight-bandwidth bound: narrow token tiles and two groups per K step to
# keep enough weight bytes and wgmma chains in flight. Large row
# counts: 128 tokens x 64 weight rows, 2 programs per SM so one converts while the other's
# wgmma runs. From 33 rows per expert on, the tiles come by TMA (tma_loads: 5-17% faster at
# 1024-8192 tokens; the 16-token tiles of row 0 are faster with copies, and row 1's TMA build
# needs more registers than its 3 programs per SM allow with triton 3.6). Measured on the H200
# (docs/perf.md, sessions 6 and 8). programs_per_sm must not exceed
# the occupancy the kernel's registers allow (tests/test_gemm_tiles.py checks it on the sm_90
# build), or persistent programs queue behind each other.
GEMM_TILES: tuple[tuple[float, GemmTile], ...] = (
    (16, GemmTile(block_m=16, block_n=128, num_warps=4, num_stages=3, programs_per_sm=2, groups_per_step=2)),
    (32, GemmTile(block_m=32, block_n=64, num_warps=4, num_stages=4, programs_per_sm=3)),
    (64, GemmTile(block_m=64, block_n=64, num_warps=4, num_stages=4, programs_per_sm=2,
                  tma_loads=True)),
    (float("inf"), GemmTile(block_m=128, block_n=64, num_warps=4, num_stages=3, programs_per_sm=2,
                            tma_loads=True)),
)

# Up to two tokens' routed rows at top-8 (decode of one or two sequences): every tile has its
# own program, so the time is one tile's serial K loop, and a step's latency, not bandwidth,
# sets it. Narrower weight tiles give more programs, and loading the group scales a step ahead
# takes one global-memory latency off every step. On the H200 (docs/perf.md, session 6) this
# tile beat the wider GEMM_TILES[0] at 1 and 2 tokens and lost to it at 16.
DECODE_ROWS = 16
DECODE_TILE = GemmTile(block_m=16, block_n=64, num_warps=4, num_stages=3, programs_per_sm=3,
                       groups_per_step=2, prefetch_scales=True)

WGMMA_KERNEL = "wgmma"
GEMV_KERNEL = "gemv"
WGMMA_FALLBACK = GEMM_TILES[-1][1]
# The Gluon kernel's tile (v10: TMA ring, register-operand async wgmma): 128 tokens x 128 weight
# rows, two warpgroups, a 4-deep ring, one program per SM. Eager launches take it above
# WGMMA_ROWS rows per expert (choose_tile(allow_gluon=True)): on the H200 it measured 7% faster
# than the table's last row at 8192 tokens and level at 4096 (docs/perf.md, session 9). Traced
# launches (torch.compile) cannot run Gluon and keep GEMM_TILES.
WGMMA_TILE = GemmTile(block_m=128, block_n=128, num_warps=8, num_stages=4, programs_per_sm=1,
                      kernel=WGMMA_KERNEL)
WGMMA_ROWS = 256


def expected_rows_per_expert(R: int, E: int) -> float:
    """Rows an active expert gets on average when R routed rows spread over E experts.

    With fewer rows than experts almost every row lands on its own expert (1 row each).
    """
    if R <= 0 or E <= 0:
        return 0.0
    return R / min(E, R)


@dataclasses.dataclass(frozen=True)
class GemmConstraints:
    """Fields of the tile a caller fixes (tuning scripts, benchmarks, tests); None = the table's.

    Passed as an argument (`choose_tile(..., constraints=)`, the launcher's `constraints=`),
    never read from the environment, so every choice is visible at the call and identical in
    eager mode, under torch.compile and in a CUDA-graph capture."""
    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    programs_per_sm: int | None = None
    groups_per_step: int | None = None
    kernel: str | None = None
    prefetch_scales: bool | None = None
    tma_loads: bool | None = None

    def apply(self, tile: GemmTile) -> GemmTile:
        fixed = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(tile, **fixed)


def choose_tile(R: int, N: int, K: int, E: int, group_size: int, *,
                constraints: GemmConstraints | None = None, allow_gluon: bool = False) -> GemmTile:
    """The tile for a problem, from shapes only: DECODE_TILE for at most DECODE_ROWS rows, else
    the table's row for the expected rows per expert (WGMMA_TILE above WGMMA_ROWS rows when
    allow_gluon: eager launches); then the fields `constraints` fixes."""
    if R <= DECODE_ROWS:   # R = 0 too, as the traced conds (R <= 16 first) choose
        tile = DECODE_TILE
    else:
        rows = expected_rows_per_expert(R, E)
        if allow_gluon and rows > WGMMA_ROWS:
            tile = WGMMA_TILE
        else:
            tile = next((t for bound, t in GEMM_TILES if rows <= bound), GEMM_TILES[-1][1])
    return constraints.apply(tile) if constraints is not None else tile


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_size(tile: GemmTile, R: int, N: int, E: int, device: torch.device) -> int:
    """Persistent grid: at most one program per possible tile (cdiv(R, BM) + E m-tiles upper bound)."""
    n_tiles = -(-N // tile.block_n)
    upper = (-(-R // tile.block_m) + E) * n_tiles
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        programs = num_sms(idx) * tile.programs_per_sm
    else:  # TRITON_INTERPRET=1 on CPU: a few programs exercise the persistent loop
        programs = 3
    # sym_min / sym_max: R may be symbolic under torch.compile (no guard on it); plain ints here.
    return torch.sym_max(1, torch.sym_min(upper, programs))


# --------------------------------------------------------------------------------------------
# max-autotune candidates: the regime's tile and its neighbours, as data, invalid ones pruned
# --------------------------------------------------------------------------------------------
BLOCK_M_CHOICES = (16, 32, 64, 128, 256)   # the wgmma N side: 8..256, powers of two for tl.arange
BLOCK_N_CHOICES = (64, 128, 256)           # the wgmma M side: whole 64-row instructions
WARPS_CHOICES = (4, 8)                     # one or two warpgroups
STAGES_RANGE = (2, 6)
SMEM_LIMIT_BYTES = 227 * 1024              # Hopper's shared memory per block
ACC_REGS_LIMIT = 128                       # fp32 accumulator registers per thread before ptxas spills
MAX_CANDIDATES = 8                         # each one is compiled and timed on the regime's first run


def tile_problems(tile: GemmTile, N: int | None, K: int | None, group_size: int) -> list[str]:
    """Why `tile` cannot run (or cannot run well) on an [N, K] GEMM with this group size; empty
    when it can. N / K None: only the checks that do not depend on them."""
    if tile.kernel == GEMV_KERNEL:
        return gemv_tile_problems(tile)
    problems = wgmma_tile_problems(tile) if tile.kernel == WGMMA_KERNEL else []
    if tile.block_m not in BLOCK_M_CHOICES:
        problems.append(f"block_m={tile.block_m} not in {BLOCK_M_CHOICES}")
    if tile.block_n not in BLOCK_N_CHOICES:
        problems.append(f"block_n={tile.block_n} not in {BLOCK_N_CHOICES}")
    elif N is not None and tile.block_n > 64 and tile.block_n >= 2 * N:
        problems.append(f"block_n={tile.block_n} is over twice N={N}: half the tile would be padding")
    if tile.num_warps not in WARPS_CHOICES:
        problems.append(f"num_warps={tile.num_warps} not in {WARPS_CHOICES}")
    if not STAGES_RANGE[0] <= tile.num_stages <= STAGES_RANGE[1]:
        problems.append(f"num_stages={tile.num_stages} outside {STAGES_RANGE}")
    if tile.groups_per_step not in (1, 2):
        problems.append(f"groups_per_step={tile.groups_per_step} not 1 or 2")
    elif K is not None and tile.groups_per_step == 2 and K // group_size < 2:
        problems.append(f"groups_per_step=2 needs two groups along K={K}")
    if tile.programs_per_sm < 1:
        problems.append(f"programs_per_sm={tile.programs_per_sm} < 1")
    # per stage: an fp8 activation tile [block_m, G] and an int4 weight tile [block_n, G / 2]
    smem = tile.num_stages * tile.groups_per_step * (tile.block_m * group_size + tile.block_n * group_size // 2)
    if smem > SMEM_LIMIT_BYTES:
        problems.append(f"{smem} bytes of pipelined shared memory > {SMEM_LIMIT_BYTES}")
    acc_regs = tile.block_m * tile.block_n // (32 * max(tile.num_warps, 1))
    if acc_regs > ACC_REGS_LIMIT:
        problems.append(f"{acc_regs} accumulator registers per thread > {ACC_REGS_LIMIT}")
    return problems


def wgmma_tile_problems(tile: GemmTile) -> list[str]:
    """Why a Gluon tile (kernel="wgmma") cannot build, whatever the problem; empty when it can.
    (Where it cannot run, on a problem it can build for, the launcher runs WGMMA_FALLBACK.)"""
    problems = []
    if tile.block_m not in BLOCK_M_CHOICES:
        problems.append(f"block_m={tile.block_m} not in {BLOCK_M_CHOICES}")
    if tile.num_warps not in WARPS_CHOICES:
        problems.append(f"num_warps={tile.num_warps} not in {WARPS_CHOICES}")
    elif tile.block_n < 16 * tile.num_warps or tile.block_n % (16 * tile.num_warps):
        problems.append(f"block_n={tile.block_n}: the Gluon kernel runs whole 64-row wgmmas per "
                        f"warpgroup; use a multiple of {16 * tile.num_warps} with "
                        f"num_warps={tile.num_warps}")
    if tile.num_stages < 3:
        problems.append(f"num_stages={tile.num_stages}: the Gluon kernel's ring holds a pair of "
                        f"groups and the next one; use num_stages >= 3")
    if tile.groups_per_step != 1:
        problems.append(f"groups_per_step={tile.groups_per_step}: the Gluon kernel runs its groups "
                        f"in pairs of single steps; set groups_per_step=1")
    if tile.tma_loads:
        problems.append(f"tma_loads=True with kernel={tile.kernel!r}: only the Triton kernel has the "
                        f"option (the Gluon kernel always loads by TMA); set tma_loads=False")
    if tile.prefetch_scales:
        problems.append("prefetch_scales=True: only the Triton kernel loads scales a step ahead (the "
                        "Gluon kernel keeps a tile's scales in shared memory); set prefetch_scales=False")
    if tile.programs_per_sm < 1:
        problems.append(f"programs_per_sm={tile.programs_per_sm} < 1")
    return problems


def gemv_tile_problems(tile: GemmTile) -> list[str]:
    """Why a CUDA-core decode tile (kernel="gemv") cannot run; empty when it can."""
    problems = []
    if tile.block_m not in (1, 2):
        problems.append(f"block_m={tile.block_m}: the gemv kernel takes 1 or 2 rows of an expert per tile")
    if tile.block_n not in (16, 32, 64, 128, 256):
        problems.append(f"block_n={tile.block_n} not a power of two in 16..256")
    if tile.num_warps not in (1, 2, 4, 8):
        problems.append(f"num_warps={tile.num_warps} not 1, 2, 4 or 8")
    if not 1 <= tile.groups_per_step <= 4:
        problems.append(f"groups_per_step={tile.groups_per_step} outside 1..4")
    if tile.programs_per_sm < 1:
        problems.append(f"programs_per_sm={tile.programs_per_sm} < 1")
    if tile.prefetch_scales:
        problems.append("prefetch_scales=True: only the Triton kernel loads scales a step ahead "
                        "(the gemv kernel has no such option); set prefetch_scales=False")
    if tile.tma_loads:
        problems.append("tma_loads=True: only the Triton kernel has a TMA loop (the gemv kernel "
                        "reads with plain loads); set tma_loads=False")
    return problems


def candidate_tiles(tile: GemmTile, N: int | None, K: int | None, group_size: int) -> list[GemmTile]:
    """Tiles for max-autotune to time around a regime's `tile` (first: the default): the token
    side halved and doubled, the weight side 64 / 128, the other warp count, one stage fewer and
    more, the other groups-per-step. Invalid ones are pruned (`tile_problems`; with N / K None,
    what depends on them is left to the autotuner's early prune), duplicates dropped, at most
    MAX_CANDIDATES. programs_per_sm stays the regime's, so the persistent grid
    of a candidate follows from its block sizes alone."""
    replace = dataclasses.replace
    variants = [tile,
                replace(tile, block_m=tile.block_m // 2), replace(tile, block_m=tile.block_m * 2),
                replace(tile, block_n=128 if tile.block_n == 64 else 64),
                replace(tile, num_warps=8 if tile.num_warps == 4 else 4),
                replace(tile, num_stages=tile.num_stages - 1), replace(tile, num_stages=tile.num_stages + 1),
                # two groups a step only with copies (the TMA loop takes one)
                replace(tile, groups_per_step=3 - tile.groups_per_step, tma_loads=False)]
    out: list[GemmTile] = []
    for t in variants:
        if t not in out and (t == tile or not tile_problems(t, N, K, group_size)):
            out.append(t)
    return out[:MAX_CANDIDATES]
