"""max-autotune of the traced grouped GEMM (lowerings/grouped_gemm.py, launch/gemm_tiles.py).

Under `mode="max-autotune"` each tile regime's kernel is one triton.autotune over candidate tiles
(gemm_tiles.candidate_tiles: block sizes, groups per K step, warps, stages), invalid ones pruned
early at the kernel's own N / K / group size, the persistent grid a function of each config's
block sizes. Outside max-autotune the traced launch is exactly today's (one tile, one grid).

CPU: the candidate lists, the prune, and the traced launch (make_fx over the real launcher with
fake CPU tensors: the kernel is recorded, not run); a max-autotune compile of the block on CPU
equals eager. GPU (`-m cuda`): max-autotune compiles the GEMM, tunes several tiles, equals eager.
"""
import dataclasses
import re

import pytest
import torch

import inductor_w4a8  # noqa: F401  (registers the ops and the backend)
from inductor_w4a8 import formats, reference
from inductor_w4a8.launch import gemm_tiles
from inductor_w4a8.launch.gemm_tiles import GEMM_TILES, GemmTile, candidate_tiles, tile_problems
from inductor_w4a8.lowerings import grouped_gemm as gemm_lowering
from inductor_w4a8.testing import random_expert_offsets, rel_error

GLM_SHAPES = [(3072, 5120), (5120, 1536)]      # (N, K) of w13 and w2
triton = pytest.importorskip("triton")


# ------------------------------------------------------------------------------------------
# the candidates, as data
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K", GLM_SHAPES)
@pytest.mark.parametrize("tile", [gemm_tiles.DECODE_TILE] + [t for _, t in GEMM_TILES])
def test_candidates_valid_unique_default_first(tile, N, K):
    cands = candidate_tiles(tile, N, K, 128)
    assert cands[0] == tile
    assert 4 <= len(cands) <= gemm_tiles.MAX_CANDIDATES
    assert len(set(cands)) == len(cands)
    for c in cands:
        assert tile_problems(c, N, K, 128) == [], c
        assert c.programs_per_sm == tile.programs_per_sm       # the grid follows from block sizes
    # more than launch knobs: block sizes and groups per step vary too
    assert len({(c.block_m, c.block_n) for c in cands}) >= 3
    assert {c.groups_per_step for c in cands} == {1, 2}


def test_candidates_pruned_for_the_problem():
    tile = GemmTile(block_m=16, block_n=64, num_warps=4, num_stages=2, programs_per_sm=4, groups_per_step=2)
    anywhere = candidate_tiles(tile, None, None, 128)
    small = candidate_tiles(tile, 48, 128, 128)             # N = 48, a single group along K
    assert GemmTile(16, 128, 4, 2, 4, 2) in anywhere and GemmTile(16, 128, 4, 2, 4, 2) not in small
    assert GemmTile(16, 64, 4, 2, 4, 1) in small
    assert all(c.groups_per_step == 1 for c in small[1:])   # the default stays, even if it is odd here
    assert GemmTile(16, 64, 4, 1, 4, 2) not in anywhere     # one stage: below STAGES_RANGE
    assert all(gemm_tiles.STAGES_RANGE[0] <= c.num_stages for c in anywhere)


@pytest.mark.parametrize("tile,fragment", [
    (GemmTile(8, 64, 4, 3, 1), "block_m=8"),
    (GemmTile(16, 96, 4, 3, 1), "block_n=96"),
    (GemmTile(16, 64, 2, 3, 1), "num_warps=2"),
    (GemmTile(16, 64, 4, 1, 1), "num_stages=1"),
    (GemmTile(16, 64, 4, 7, 1), "num_stages=7"),
    (GemmTile(16, 64, 4, 3, 1, 3), "groups_per_step=3"),
    (GemmTile(16, 64, 4, 3, 0), "programs_per_sm=0"),
    (GemmTile(256, 256, 8, 5, 1, 2), "shared memory"),
    (GemmTile(256, 128, 4, 2, 1), "accumulator registers"),
    (GemmTile(128, 128, 8, 4, 1, kernel="wgmma", tma_loads=True), "tma_loads=True with kernel='wgmma'"),
    (GemmTile(128, 64, 8, 4, 1, kernel="wgmma"), "whole 64-row wgmmas"),
    (GemmTile(128, 128, 8, 2, 1, kernel="wgmma"), "num_stages >= 3"),
    (GemmTile(1, 64, 4, 1, 6, 1, kernel="gemv", tma_loads=True), "set tma_loads=False"),
])
def test_tile_problems_names_each_defect(tile, fragment):
    problems = tile_problems(tile, 4096, 4096, 128)
    assert any(fragment in p for p in problems), problems


def test_tile_problems_shape_dependent():
    assert any("over twice N" in p for p in tile_problems(GemmTile(16, 256, 8, 2, 1), 100, 4096, 128))
    assert tile_problems(GemmTile(16, 256, 8, 2, 1), None, 4096, 128) == []
    assert any("two groups" in p for p in tile_problems(GemmTile(16, 64, 4, 2, 1, 2), 64, 128, 128))
    assert tile_problems(GemmTile(16, 64, 4, 2, 1, 2), 64, 256, 128) == []
    # every problem is reported, not the first of a chain; a TMA tile with two groups a step is
    # valid (it runs with copies)
    both = tile_problems(GemmTile(16, 64, 4, 2, 1, 2, kernel="wgmma", tma_loads=True), 64, 128, 128)
    assert any("two groups" in p for p in both) and any("tma_loads" in p for p in both), both
    assert tile_problems(GemmTile(64, 64, 4, 2, 2, 2, tma_loads=True), 64, 256, 128) == []


def test_every_table_tile_is_valid_on_glm():
    for N, K in GLM_SHAPES:
        for tile in [gemm_tiles.DECODE_TILE] + [t for _, t in GEMM_TILES]:
            assert tile_problems(tile, N, K, 128) == [], tile


# ------------------------------------------------------------------------------------------
# the autotuner's early prune
# ------------------------------------------------------------------------------------------
def _configs_of(tiles):
    return [triton.Config(gemm_lowering.tile_config_kwargs(t), num_warps=t.num_warps, num_stages=t.num_stages)
            for t in tiles]


def _tile_of(config, like):
    return dataclasses.replace(like, block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"],
                               groups_per_step=config.kwargs["GROUPS_PER_STEP"],
                               num_warps=config.num_warps, num_stages=config.num_stages)


def test_early_prune_uses_the_kernel_arguments():
    tile = GEMM_TILES[0][1]                         # 16 tokens, two groups per step
    tiles = gemm_lowering.autotune_tiles(tile, 128)
    prune = gemm_lowering.prune_invalid_configs(tile)
    configs = _configs_of(tiles)
    # N = 48 (no 128-row tile), K = 128 = one group (no two-group steps but the regime's own)
    kept = [_tile_of(c, tile) for c in prune(configs, {"N": 48, "K": 128, "R": 7}, GROUP=128)]
    assert kept[0] == tile
    assert kept == [t for t in tiles if t == tile or not tile_problems(t, 48, 128, 128)]
    assert len(kept) < len(tiles)
    # a GLM-sized problem keeps them all
    assert len(prune(configs, {"N": 5120, "K": 1536, "R": 7}, GROUP=128)) == len(tiles)
    # symbolic sizes: nothing to decide on
    assert prune(configs, {"N": None, "K": 128}, GROUP=128) == configs


# ------------------------------------------------------------------------------------------
# the traced launch: default vs max-autotune (make_fx of the real launcher, fake CPU tensors)
# ------------------------------------------------------------------------------------------
def _case(R=40, E=4, N=128, K=256, G=128):
    w = (torch.randn(E, N, K) * 0.05).to(torch.bfloat16)
    packed, scale = formats.quantize_w4(w, G)
    wg, _ = formats.encode_gemm_layout(formats.uint4b8_to_signed_int4(packed))
    s8, chan = formats.convert_bf16_scales_to_fp8(scale)
    a = (torch.randn(R, K) * 3).to(formats.FP8_DTYPE)
    a_scale = torch.rand(R, 1) * 0.01 + 0.001
    return a, a_scale, wg, s8, chan, random_expert_offsets(R, E)


def _trace(tile, max_autotune: bool, case):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import config
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, a_scale, w, s, chan, off):
        return gemm_lowering._default_launch(a, a_scale, w, s, chan, off, 128, tile)
    with config.patch(max_autotune=max_autotune):
        gm = make_fx(f, tracing_mode="fake")(*case)
    nodes = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(nodes) == 1                                       # one launch
    node = nodes[0]
    return kernel_side_table.get_kernel(node.kwargs["kernel_idx"]), node.kwargs["grid"], node.kwargs["kwargs"]


@pytest.mark.parametrize("tile", [gemm_tiles.DECODE_TILE, GEMM_TILES[0][1]], ids=["decode", "row0"])
def test_default_mode_traces_the_regime_tile_unchanged(tile):
    case = _case()
    kernel, grids, kwargs = _trace(tile, False, case)
    # torch records launch knobs (num_warps / num_stages) as a one-config autotuner: nothing to tune
    configs = getattr(kernel, "configs", None)
    if configs is not None:
        assert [(c.kwargs, c.num_warps, c.num_stages) for c in configs] == [({}, tile.num_warps, tile.num_stages)]
    assert len(grids) == 1
    R, N, E = case[0].shape[0], case[2].shape[1], case[2].shape[0]
    assert grids[0][0] == gemm_tiles.grid_size(tile, R, N, E, torch.device("cpu"))
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["GROUPS_PER_STEP"], kwargs["PREFETCH_SCALES"]) == \
        (tile.block_m, tile.block_n, tile.groups_per_step, tile.prefetch_scales)


@pytest.mark.parametrize("regime", ["decode", 0, len(GEMM_TILES) - 1])
def test_max_autotune_traces_one_autotuner_over_the_pruned_candidates(regime):
    case = _case(R=600, E=3, N=96, K=128)            # one group along K: the prune has work to do
    tile = gemm_tiles.DECODE_TILE if regime == "decode" else GEMM_TILES[regime][1]
    kernel, grids, kwargs = _trace(tile, True, case)
    assert isinstance(kernel, triton.runtime.Autotuner)
    tiles = [_tile_of(c, tile) for c in kernel.configs]
    assert tiles[0] == tile
    assert tiles == [t for t in gemm_lowering.autotune_tiles(tile, 128)
                     if t == tile or not tile_problems(t, 96, 128, 128)]
    assert 1 < len(tiles) < len(gemm_lowering.autotune_tiles(tile, 128))
    # the configs carry the tile; the launch carries the rest; one grid per config, from its blocks
    assert not set(gemm_lowering.TUNED_KERNEL_ARGS) & set(kwargs)
    assert kwargs["GROUP"] == 128 and kwargs["HAS_CHAN"] is True
    assert len(grids) == len(tiles)
    for t, grid in zip(tiles, grids):
        assert grid[0] == gemm_tiles.grid_size(t, 600, 96, 3, torch.device("cpu"))


def test_max_autotune_compile_on_cpu_matches_eager():
    """CPU has no Triton GPU kernel: the op stays a call, and max-autotune changes nothing else."""
    from torch._inductor.utils import run_and_get_code

    from compile_utils import make_inputs, make_moe
    moe = make_moe()
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="w4a8", mode="max-autotune-no-cudagraphs", fullgraph=True)
    x, logits = make_inputs(11, moe)
    out, codes = run_and_get_code(compiled, x, logits)
    assert "torch.ops.w4a8.grouped_gemm.default(" in "\n".join(codes)
    assert torch.equal(out, moe(x, logits))


# ------------------------------------------------------------------------------------------
# GPU: max-autotune compiles, tunes tiles, equals eager
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["fp8", "exact"])
def test_cuda_max_autotune_gemm_matches_eager(mode):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    E, N, K, G = 16, 512, 1024, 128
    w = (torch.randn(E, N, K) * 0.05).to(torch.bfloat16)
    packed, scale = formats.quantize_w4(w, G)
    wg, _ = formats.encode_gemm_layout(formats.uint4b8_to_signed_int4(packed))
    s, chan = formats.convert_bf16_scales_to_fp8(scale) if mode == "fp8" else (scale, None)
    wg, s = wg.cuda(), s.cuda()
    chan = chan.cuda() if chan is not None else None

    def gemm(a, a_scale, off):
        return torch.ops.w4a8.grouped_gemm(a, a_scale, wg, s, chan, off, G)

    compiled = torch.compile(gemm, backend="w4a8", mode="max-autotune-no-cudagraphs", fullgraph=True,
                             dynamic=True)
    codes_all = []
    for R in (37, 700, 5000, 1):        # several tile regimes (R = 1 last: it would specialize)
        a = (torch.randn(R, K) * 3).to(formats.FP8_DTYPE).cuda()
        a_scale = (torch.rand(R, 1) * 0.01 + 0.001).cuda()
        off = random_expert_offsets(R, E).cuda()
        out, codes = run_and_get_code(compiled, a, a_scale, off)
        codes_all += codes
        eager = gemm(a, a_scale, off)
        exact = reference.grouped_gemm(a, a_scale, formats.decode_gemm_layout(wg), s, chan, off, G)
        assert torch.isfinite(out.float()).all()
        # another tile may sum the two groups of a step in another order: both on the bf16 floor
        assert rel_error(out, exact) <= 3e-3, R
        assert rel_error(out, eager) <= 4e-3, R
    code = "\n".join(codes_all)
    assert "w4a8_grouped_gemm_kernel" in code and "torch.ops.w4a8.grouped_gemm.default(" not in code
    assert len(set(re.findall(r"['\"]BLOCK_M['\"]: (\d+)", code))) >= 2, "no block-size candidates in the code"
