"""launch/gemm_tiles.py: the tile table's choices and the occupancy its programs_per_sm assumes."""
import glob
import os
import re
import subprocess
import tempfile

import pytest

from inductor_w4a8.launch import gemm_tiles
from inductor_w4a8.launch.gemm_tiles import DECODE_ROWS, DECODE_TILE, GEMM_TILES, choose_tile

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REGISTERS_PER_SM = 65536          # sm_90
REGISTER_ALLOCATION_UNIT = 256    # registers are allocated per warp in units of 256


def test_eager_launches_get_the_gluon_tile_for_many_rows_per_expert():
    """allow_gluon (eager launches): WGMMA_TILE above WGMMA_ROWS expected rows per expert, the
    table below and at the boundary; traced launches (the default) keep the table everywhere."""
    E = 160
    boundary = gemm_tiles.WGMMA_ROWS * E            # exactly WGMMA_ROWS rows per expert
    assert choose_tile(boundary + 1, 3072, 5120, E, 128, allow_gluon=True) == gemm_tiles.WGMMA_TILE
    assert choose_tile(boundary + 1, 3072, 5120, E, 128) == GEMM_TILES[-1][1]
    for R in (1, 17, 512, 8192, 4096 * 8, boundary):
        assert choose_tile(R, 3072, 5120, E, 128, allow_gluon=True) == choose_tile(R, 3072, 5120, E, 128)
    assert gemm_tiles.WGMMA_FALLBACK.kernel == "triton"


def test_traced_regimes_never_get_the_gluon_tile():
    """torch.compile's tile regimes come from choose_tile's default (allow_gluon=False): every
    regime is a Triton (or decode) tile, up to the largest R."""
    torch = pytest.importorskip("torch")
    gemm_lowering = pytest.importorskip("inductor_w4a8.lowerings.grouped_gemm")
    a = torch.empty(0, 5120, device="meta")
    w = torch.empty(160, 3072, 640, dtype=torch.int32, device="meta")
    regimes = gemm_lowering.tile_regimes(gemm_lowering._default_choose(a, w, 128))
    assert regimes and all(tile.kernel == "triton" for _, tile in regimes), regimes


@pytest.mark.parametrize("tile, cap", [
    (gemm_tiles.GemmTile(64, 64, 4, 4, 3, kernel="wgmma"), 168),    # 65536 / (3 * 128) = 170
    (gemm_tiles.GemmTile(64, 64, 4, 4, 2, kernel="wgmma"), 255),    # 256 allowed, 255 the most
    (gemm_tiles.WGMMA_TILE, 255),
    (gemm_tiles.GemmTile(128, 128, 8, 4, 4, kernel="wgmma"), 64)])   # 65536 / (4 * 256)
def test_register_cap_lets_programs_per_sm_programs_fit(tile, cap):
    from inductor_w4a8.launch.grouped_gemm import register_cap
    assert register_cap(tile) == cap


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
@pytest.mark.parametrize("scale_dtype", ["*fp8e4nv", "*bf16"])
def test_gluon_tile_fits_its_programs_per_sm_without_spills(scale_dtype):
    """WGMMA_TILE built for sm_90 as the launcher builds it (maxnreg = register_cap): no local
    loads or stores in the K loop (a spill there would cost more than the overlap gains; the
    3.9 build keeps 32 bytes of stack outside it) and shared memory for
    programs_per_sm programs (228 KB per SM, 1 KB of it reserved per program)."""
    pytest.importorskip("triton.experimental.gluon")
    from inductor_w4a8.testing import gluon_gemm_sm90
    tile = gemm_tiles.WGMMA_TILE
    try:
        compiled = gluon_gemm_sm90(tile, 128, scale_dtype == "*fp8e4nv")
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
        raise
    loop = _k_loop_sass(compiled.asm["cubin"])
    assert sum("GMMA" in op for op in loop) == 8, loop          # a pair of groups, 4 K slices each
    assert not [op for op in loop if op.startswith(("LDL", "STL"))], loop
    assert (compiled.metadata.shared + 1024) * tile.programs_per_sm <= 228 * 1024


def _k_loop_sass(cubin: bytes) -> list[str]:
    """Opcodes of the innermost loop holding wgmmas: the shortest backward branch's body."""
    lines = re.findall(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);",
                       _cuobjdump(cubin, "-sass"))
    addr = {int(a, 16): i for i, (a, _, _) in enumerate(lines)}
    best = None
    for i, (a, op, rest) in enumerate(lines):
        m = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        target = int(m.group(1), 16) if m else None
        if target is not None and target < int(a, 16) and target in addr:
            body = [o for _, o, _ in lines[addr[target]:i + 1]]
            if any("GMMA" in o for o in body) and (best is None or len(body) < len(best)):
                best = body
    assert best, "no loop with wgmmas in the SASS"
    return best


def _resource_usage(cubin: bytes) -> str:
    return _cuobjdump(cubin, "-res-usage")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton
    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))
    if not tools:
        pytest.skip("this triton ships no cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tools[0], flag, f.name], capture_output=True, text=True).stdout


def test_decode_rows_get_the_decode_tile_and_more_rows_the_table():
    for R in range(0, DECODE_ROWS + 1):     # R = 0 as the traced conds choose (R <= 16 first)
        assert choose_tile(R, 3072, 5120, 160, 128) == DECODE_TILE
    assert choose_tile(DECODE_ROWS + 1, 3072, 5120, 160, 128) == GEMM_TILES[0][1]
    assert choose_tile(8192 * 8, 3072, 5120, 160, 128) == GEMM_TILES[-1][1]
    assert DECODE_TILE.prefetch_scales and not any(t.prefetch_scales for _, t in GEMM_TILES)
    # a constraint still fixes a field of the decode tile
    fixed = choose_tile(8, 3072, 5120, 160, 128,
                        constraints=gemm_tiles.GemmConstraints(prefetch_scales=False))
    assert fixed == gemm_tiles.dataclasses.replace(DECODE_TILE, prefetch_scales=False)


def _sm90_build(tile, scale_dtype="*fp8e4nv", tma_loads=None):
    """The Triton kernel compiled for sm_90 with this tile; tma_loads None: as the tile says."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inductor_w4a8.kernels.grouped_gemm import w4a8_grouped_gemm_kernel
    sig = {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": scale_dtype,
           "chan_ptr": "*fp32", "off_ptr": "*i64", "out_ptr": "*bf16", "R": "i32", "N": "i32",
           "K": "i32", "E": "i32"}
    const = {"GROUP": 128, "HAS_CHAN": scale_dtype == "*fp8e4nv", "BLOCK_M": tile.block_m,
             "BLOCK_N": tile.block_n, "BLOCK_E": 256, "USE_ASM": True,
             "GROUPS_PER_STEP": tile.groups_per_step, "PREFETCH_SCALES": tile.prefetch_scales,
             "PDL": True, "TMA_LOADS": tile.tma_loads if tma_loads is None else tma_loads}
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 9)}
    try:
        compiled = triton.compile(ASTSource(fn=w4a8_grouped_gemm_kernel, signature=sig, constexprs=const,
                                            attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
        raise
    return compiled


def _sm90_registers(tile, scale_dtype="*fp8e4nv", tma_loads=None) -> int:
    """Registers per thread of `_sm90_build` (cuobjdump)."""
    import triton
    compiled = _sm90_build(tile, scale_dtype, tma_loads)
    return int(re.search(r"REG:(\d+)", _resource_usage(compiled.asm["cubin"])).group(1))


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
@pytest.mark.parametrize("tile", [DECODE_TILE] + [t for _, t in GEMM_TILES], ids=str)
@pytest.mark.parametrize("scale_dtype", ["*fp8e4nv", "*bf16"])
def test_programs_per_sm_fit_in_the_register_file(tile, scale_dtype):
    """The persistent grid launches programs_per_sm programs per SM; if the registers hold fewer,
    the rest wait for a whole program to finish (the table once asked for 4 where 3 fit). A TMA
    tile is checked as built both ways: with descriptors, and with copies (where TMA cannot run)."""
    for tma_loads in sorted({tile.tma_loads, False}):
        regs = _sm90_registers(tile, scale_dtype, tma_loads)
        per_warp = -(-regs * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        resident = REGISTERS_PER_SM // (per_warp * tile.num_warps)
        assert tile.programs_per_sm <= resident, (tma_loads, regs, resident)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
@pytest.mark.parametrize("tile", [t for _, t in GEMM_TILES if t.tma_loads], ids=str)
def test_tma_tiles_fetch_by_tensor_copies(tile):
    """A table tile with tma_loads builds (sm_90) to TMA tensor copies for a and w and no
    per-thread cp.async; the same tile without it keeps the per-thread copies."""
    tma_ptx = _sm90_build(tile).asm["ptx"]
    assert "cp.async.bulk.tensor.2d" in tma_ptx and "cp.async.cg" not in tma_ptx
    copies_ptx = _sm90_build(tile, tma_loads=False).asm["ptx"]
    assert "cp.async.bulk.tensor" not in copies_ptx and "cp.async.c" in copies_ptx
