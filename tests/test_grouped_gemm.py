"""w4a8::grouped_gemm: the Triton and Gluon (wgmma) kernels against the fp64 reference of their
own inputs.

CPU (CI): opcheck of the op; the Triton kernel under TRITON_INTERPRET=1 on small shapes (this
file re-runs itself in a child process with the variable set; the interpreter rounds fp32 -> bf16
by truncation, hence its looser bound). GPU (`-m cuda`): R in {1, 511, 512, 513, 8191, 8192},
E in {1, 7, 60, 160}, N and K not multiples of the tiles, group sizes 32/64/128, empty experts,
both scale modes, every tile of the table, GLM-4.6 shapes, garbage offsets, CUDA-graph capture.
Outputs are poisoned (NaN) before each run, so an unwritten element fails.
The Gluon kernel (kernels/grouped_gemm_wgmma.py) cannot run under the interpreter: CI compiles it
for sm_90 (cubin, and the overlap of wgmma(g) with the promotion of g - 1 present in the IR) and
checks the launcher's fallback; the GPU tests run it on every boundary above.
"""
import dataclasses
import os

import pytest
import torch

from inductor_w4a8 import formats, ops, reference
from inductor_w4a8.checks import value_checks
from inductor_w4a8.testing import GEMM_TOL_GPU, opcheck, random_expert_offsets, rel_error
from inductor_w4a8.testing import run_interpreted

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP8 = formats.FP8_DTYPE
TOL_GPU = GEMM_TOL_GPU
TOL_INTERP = 6e-3   # interpreter: fp32 -> bf16 by truncation (about 2x the RNE error)


def make_case(R, E, N, K, G, *, empty=0, mode="fp8", device="cpu", positive=False, gen=None):
    w = (torch.randn(E, N, K, generator=gen) * 0.05).to(torch.bfloat16)
    packed, scale = formats.quantize_w4(w, G)
    signed = formats.uint4b8_to_signed_int4(packed)
    wg, _ = formats.encode_gemm_layout(signed)
    a = torch.randn(R, K, generator=gen) * 3
    if positive:
        a = a.abs()
    a = a.to(FP8)
    a_scale = torch.rand(R, 1, generator=gen) * 0.01 + 0.001
    off = random_expert_offsets(R, E, empty_experts=empty, generator=gen)
    if mode == "fp8":
        ws, chan = formats.convert_bf16_scales_to_fp8(scale)
    else:
        ws, chan = scale, None
    args = [t.to(device) if t is not None else None for t in (a, a_scale, wg, ws, chan, off)]
    return args + [G]


def ref_of(args):
    a, a_scale, wg, ws, chan, off, G = args
    return reference.grouped_gemm(a, a_scale, formats.decode_gemm_layout(wg), ws, chan, off, G)


def poisoned_out(args):
    a, wg = args[0], args[2]
    return torch.full((a.shape[0], wg.shape[1]), float("nan"), dtype=torch.bfloat16, device=a.device)


# ------------------------------------------------------------------------------------------
# CPU: the op (CPU kernel) through opcheck
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp8", "exact"])
def test_opcheck_cpu(mode, seed):
    args = make_case(37, 5, 24, 64, 32, empty=1, mode=mode)
    opcheck(ops.grouped_gemm, tuple(args))


# ------------------------------------------------------------------------------------------
# CPU: bad inputs are refused with the argument named, before the kernel runs
# ------------------------------------------------------------------------------------------
def _with(args, **changes):
    names = ("a", "a_scale", "w", "w_scale", "w_chan_scale", "expert_offsets", "group_size")
    merged = dict(zip(names, args))
    merged.update(changes)
    return [merged[n] for n in names]


def _bad_cases(args):
    a, a_scale, wg, ws, chan, off, G = args
    R, K = a.shape
    E, N, _ = wg.shape
    return {
        "K mismatch": (_with(args, a=a[:, :K - 32].contiguous()), "share K"),
        "a not fp8": (_with(args, a=a.float()), "a must have dtype"),
        "a_scale fp16": (_with(args, a_scale=a_scale.half()), "a_scale must have dtype"),
        "a_scale shape": (_with(args, a_scale=a_scale[:-1]), "a_scale must have shape"),
        "w not int32": (_with(args, w=wg.view(torch.uint8)), "w must have dtype"),
        "offsets int32": (_with(args, expert_offsets=off.int()), "expert_offsets must have dtype"),
        "offsets length": (_with(args, expert_offsets=off[:-1]), "expert_offsets must have shape"),
        "offsets end != R": (_with(args, expert_offsets=torch.cat([off[:-1], off[-1:] - 1])),
                             "must equal the number of rows"),
        "offsets start != 0": (_with(args, expert_offsets=torch.cat([off[:1] + 1, off[1:]])),
                               r"expert_offsets\[0\] must be 0"),
        "offsets not monotone": (_with(args, expert_offsets=torch.cat(
            [off[:1], off[1:2] + R + 5, off[2:]])), "non-decreasing"),
        "group size unsupported": (_with(args, group_size=48), "not supported"),
        "group size not dividing K": (_with(args, group_size=128), "not a multiple of group_size"),
        "fp8 scales without chan": (_with(args, w_chan_scale=None), "w_scale must have dtype"),
        "chan shape": (_with(args, w_chan_scale=chan[:, :-1]), "w_chan_scale must have shape"),
        "w_scale shape": (_with(args, w_scale=ws[:, :, :1].contiguous()), "w_scale must have shape"),
        "mixed devices": (_with(args, expert_offsets=off.to("meta")), "move all inputs to one device"),
    }


BAD_CASE_NAMES = list(_bad_cases(make_case(40, 3, 16, 96, 32)).keys())


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_bad_inputs_refused(case, seed):
    from inductor_w4a8 import W4A8InputError
    args = make_case(40, 3, 16, 96, 32)  # K = 96: group 128 does not divide it
    bad, match = _bad_cases(args)[case]
    with pytest.raises(W4A8InputError, match=match), value_checks(True):  # offsets cases: debug switch
        ops.grouped_gemm(*bad)


def test_shape_checks_run_on_meta_too():
    from inductor_w4a8 import W4A8InputError
    args = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in make_case(8, 2, 16, 64, 32)]
    args[0] = torch.empty(8, 32, dtype=FP8, device="meta")
    with pytest.raises(W4A8InputError, match="share K"):
        ops.grouped_gemm(*args)


# ------------------------------------------------------------------------------------------
# CPU: tile choice (constraints as an argument) and the Gluon kernel's sm_90 build
# ------------------------------------------------------------------------------------------
def test_constraints_fix_fields_and_keep_the_rest(monkeypatch):
    from inductor_w4a8.launch.gemm_tiles import GemmConstraints, choose_tile
    monkeypatch.setenv("W4A8_GEMM_TILE", "16,64,4,2,1")   # the removed override: ignored
    base = choose_tile(8192 * 8, 3072, 5120, 160, 128)
    assert base == choose_tile(8192 * 8, 3072, 5120, 160, 128, constraints=None)
    fixed = choose_tile(8192 * 8, 3072, 5120, 160, 128,
                        constraints=GemmConstraints(num_stages=base.num_stages + 1, kernel="wgmma"))
    assert fixed.num_stages == base.num_stages + 1 and fixed.kernel == "wgmma"
    assert (fixed.block_m, fixed.block_n, fixed.num_warps) == (base.block_m, base.block_n,
                                                               base.num_warps)


@pytest.mark.parametrize("fields,extra,message", [((16, 64, 4, 1, 2, 1), {}, "1 or 2 rows"),
                                                  ((1, 48, 4, 1, 2, 1), {}, "block_n=48"),
                                                  ((1, 64, 4, 1, 2, 5), {}, "groups_per_step=5"),
                                                  ((1, 64, 4, 1, 2, 1), {"prefetch_scales": True},
                                                   "prefetch_scales=True")])
def test_bad_gemv_tile_refused_before_launch(fields, extra, message, seed):
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    args = make_case(4, 2, 64, 128, 128, mode="exact")
    out = poisoned_out(args)
    with pytest.raises(ValueError, match=message):
        launch(*args, tile=GemmTile(*fields, kernel="gemv", **extra), out=out)
    assert torch.isnan(out.float()).all()    # nothing written


@pytest.mark.parametrize("fields,extra,message", [((128, 96, 8, 4, 1), {}, "block_n=96"),
                                                  ((128, 64, 8, 4, 1), {}, "multiple of 128"),
                                                  ((128, 128, 8, 2, 1), {}, "num_stages=2"),
                                                  ((128, 128, 8, 4, 1, 2), {}, "groups_per_step=2"),
                                                  ((128, 128, 8, 4, 1), {"tma_loads": True},
                                                   "tma_loads=True")])
def test_bad_gluon_tile_refused_before_launch(fields, extra, message, seed):
    """A Gluon tile that cannot build is refused on every device, not silently replaced by the
    Triton fallback (which is for a valid tile where Gluon cannot run)."""
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    args = make_case(40, 2, 128, 256, 128, mode="exact")
    out = poisoned_out(args)
    with pytest.raises(ValueError, match=message):
        launch(*args, tile=GemmTile(*fields, kernel="wgmma", **extra), out=out)
    assert torch.isnan(out.float()).all()    # nothing written


def test_only_unconstrained_eager_launches_may_get_the_gluon_tile(monkeypatch):
    """The launcher asks choose_tile for the Gluon tile only for an eager launch that fixes no
    tile fields: `constraints=` name fields of the table's tiles, and traced launches
    (wrap_triton) take @triton.jit kernels only."""
    from inductor_w4a8.launch import grouped_gemm as gg
    from inductor_w4a8.launch.gemm_tiles import GemmConstraints
    asked = []

    class Stop(Exception):
        pass

    def recording_choose(*args, allow_gluon=False, **kwargs):
        asked.append(allow_gluon)
        raise Stop
    monkeypatch.setattr(gg, "choose_tile", recording_choose)
    args = make_case(40, 2, 64, 128, 128, mode="exact")
    for kwargs in ({}, {"constraints": GemmConstraints(num_stages=3)}, {"wrap": lambda k: k}):
        with pytest.raises(Stop):
            gg.grouped_gemm(*args, **kwargs)
    assert asked == [True, False, False]


def test_table_keeps_the_triton_kernel():
    """No row of the table picks the Gluon kernel: the table is what traced launches (and the
    fallback) run; eager launches get WGMMA_TILE from choose_tile(allow_gluon=True) instead."""
    from inductor_w4a8.launch.gemm_tiles import GEMM_TILES, WGMMA_FALLBACK
    assert all(t.kernel == "triton" for _, t in GEMM_TILES) and WGMMA_FALLBACK.kernel == "triton"


WGMMA_BUILDS = [  # (BLOCK_M, BLOCK_N, num_warps, STAGES, programs/SM), GROUP, HAS_CHAN
    ((64, 64, 4, 6, 2), 128, True), ((128, 64, 4, 4, 2), 128, False),
    ((64, 128, 8, 6, 1), 64, False), ((64, 64, 4, 3, 3), 32, True)]


@pytest.mark.parametrize("build", WGMMA_BUILDS, ids=lambda b: "x".join(map(str, (*b[0], *b[1:]))))
def test_wgmma_kernel_compiles_for_sm90(build):
    """The Gluon kernel builds for sm_90 with this triton (3.9 in CI; 3.6 on the GPU machine,
    checked by the cuda tests), down to a cubin, and the IR keeps one wgmma in flight while the
    previous group is promoted (a wait with pendings = 1), not a wait after every dot."""
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("the interpreter does not compile")
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    from inductor_w4a8.testing import gluon_gemm_sm90
    fields, group, chan = build
    try:
        compiled = gluon_gemm_sm90(GemmTile(*fields, kernel="wgmma"), group, chan)
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
        raise
    assert compiled.asm.get("cubin")
    ttgir = compiled.asm["ttgir"]
    assert "warp_group_dot_wait" in ttgir and "pendings = 1" in ttgir


# ------------------------------------------------------------------------------------------
# CPU: the Triton kernel under the interpreter
# ------------------------------------------------------------------------------------------
if not INTERPRETED:
    def test_under_triton_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="interp", timeout=3000)
else:
    from inductor_w4a8.launch import grouped_gemm as gg
    from inductor_w4a8.launch.gemm_tiles import GEMM_TILES, GemmConstraints, GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch

    INTERP_CASES = [  # R, E, N, K, G, empty, tile
        (70, 7, 200, 96, 32, 2, GemmTile(16, 64, 4, 2, 1, 2)),       # odd K // G with 2 groups a step
        (150, 3, 64, 256, 128, 0, GemmTile(128, 128, 8, 2, 1)),
        (33, 1, 72, 128, 64, 0, GemmTile(32, 64, 4, 2, 1)),          # E = 1, N % 64 != 0
        (5, 9, 130, 192, 64, 4, GemmTile(64, 64, 4, 2, 1, 2)),        # more experts than rows
        (0, 4, 64, 128, 128, 0, None),                                # R = 0
        (40, 6, 64, 128, 128, 6, None),                               # all experts empty but...
        (70, 7, 200, 96, 32, 2, GemmTile(16, 64, 4, 2, 1, 2, prefetch_scales=True)),  # odd K // G
        (37, 5, 136, 192, 64, 1, GemmTile(32, 64, 4, 2, 1, 1, prefetch_scales=True)),
        (6, 160, 128, 256, 128, 0, None),                             # R <= DECODE_ROWS: DECODE_TILE
        (9, 3, 72, 64, 64, 0, None),                                  # DECODE_TILE with one group
        # TMA loads: tiles reaching into the next expert's rows and past R, N % BLOCK_N != 0
        (70, 7, 200, 96, 32, 2, GemmTile(16, 64, 4, 2, 1, tma_loads=True)),
        (150, 3, 72, 256, 128, 0, GemmTile(128, 64, 4, 3, 2, tma_loads=True)),
        (37, 5, 136, 192, 64, 1, GemmTile(32, 64, 4, 2, 1, prefetch_scales=True, tma_loads=True)),
    ]

    @pytest.mark.parametrize("case", range(len(INTERP_CASES)))
    @pytest.mark.parametrize("mode", ["fp8", "exact"])
    def test_interp_kernel(case, mode, seed):
        R, E, N, K, G, empty, tile = INTERP_CASES[case]
        if empty >= E:   # random_expert_offsets keeps one expert; make all rows one expert's
            empty = E - 1
        args = make_case(R, E, N, K, G, empty=empty, mode=mode)
        out = launch(*args, tile=tile, out=poisoned_out(args))
        if R and tile is not None and tile.tma_loads:   # the interpreter runs the TMA loop too
            assert gg.LAST_LOADS == "tma"
        assert out.shape == (R, N) and out.dtype == torch.bfloat16
        if R:
            assert rel_error(out, ref_of(args)) <= TOL_INTERP

    def test_interp_every_table_tile(seed):
        args = make_case(45, 3, 64, 128, 64, mode="exact")
        ref = ref_of(args)
        from inductor_w4a8.launch.gemm_tiles import DECODE_TILE
        for tile in [DECODE_TILE] + [t for _, t in GEMM_TILES]:
            out = launch(*args, tile=tile, out=poisoned_out(args))
            assert rel_error(out, ref) <= TOL_INTERP, tile

    def test_interp_wgmma_tile_runs_the_fallback(seed):
        """A Gluon tile where the Gluon kernel cannot run (here: the interpreter) runs the Triton
        kernel's large-M tile, with the same result contract."""
        from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE
        for mode in ("fp8", "exact"):
            args = make_case(90, 5, 72, 256, 128, empty=1, mode=mode)
            out = launch(*args, tile=WGMMA_TILE, out=poisoned_out(args))
            assert gg.LAST_KERNEL == "triton"
            assert rel_error(out, ref_of(args)) <= TOL_INTERP

    def test_interp_garbage_offsets_memory_safe(seed):
        """Offsets outside [0, R] and non-monotone: clamped and made monotone in the kernel."""
        a, a_scale, wg, ws, chan, _, G = make_case(20, 4, 64, 128, 128, mode="exact")
        off = torch.tensor([5, 100, -3, 12, 7])
        # monotone clamped offsets [5, 20, 20, 20, 20]: rows 5..19 are expert 0's
        ref = reference.grouped_gemm(a, a_scale, formats.decode_gemm_layout(wg), ws, chan,
                                     torch.tensor([0, 20, 20, 20, 20]), G)
        for tile in (None, GemmTile(16, 64, 4, 2, 1, tma_loads=True)):
            out = launch(a, a_scale, wg, ws, chan, off, G, tile=tile, out=poisoned_out([a, a_scale, wg]))
            assert rel_error(out[5:], ref[5:]) <= TOL_INTERP, tile

    def test_interp_tma_tile_with_two_groups_a_step_runs_copies(seed):
        """The TMA loop takes one group a step: a TMA tile with two groups a step, given whole or
        made by GemmConstraints on a TMA row of the table, runs with copies, not an error."""
        args = make_case(200, 3, 64, 256, 64, mode="exact")     # ~67 rows an expert: a TMA row
        tile = GemmTile(64, 64, 4, 2, 2, 2, tma_loads=True)
        out = launch(*args, tile=tile, out=poisoned_out(args))
        assert gg.LAST_LOADS == "copies"
        assert torch.equal(out, launch(*args, tile=dataclasses.replace(tile, tma_loads=False)))
        assert gg.choose_tile(200, 64, 256, 3, 64).tma_loads
        out = launch(*args, constraints=GemmConstraints(groups_per_step=2), out=poisoned_out(args))
        assert gg.LAST_LOADS == "copies"
        assert rel_error(out, ref_of(args)) <= TOL_INTERP


    import triton
    import triton.language as tl
    from inductor_w4a8.kernels.int4_decode import layout_v3_k

    @triton.jit
    def k_of(out_ptr, WORDS: tl.constexpr):
        words = tl.arange(0, WORDS)
        for p in tl.static_range(8):
            tl.store(out_ptr + words * 8 + p, layout_v3_k(words, p))

    def test_interp_layout_v3_k_is_the_formats_layout():
        """The device-side nibble -> K map (int4_decode.layout_v3_k) against formats' own
        definition: encode_gemm_layout of a one-hot row, per natural K position."""
        words = 2 * formats.GEMM_CHUNK // 8        # two chunks: the chunk index matters too
        k = torch.empty(words * 8, dtype=torch.int32)
        k_of[(1,)](k, WORDS=words)
        K = words * 8
        natural = torch.arange(K)
        for pos in range(K):
            q = torch.zeros(1, 1, K, dtype=torch.int64)
            q[0, 0, pos] = 1
            enc, _ = formats.encode_gemm_layout(formats.pack_int4(q, biased=False))
            stream = formats.unpack_int4(enc, biased=False)[0, 0]   # nibble-stream order
            assert int(k[stream.nonzero().item()]) == int(natural[pos]), pos


    GEMV_TILES = [GemmTile(1, 64, 4, 1, 2, 1, kernel="gemv"), GemmTile(2, 32, 2, 1, 3, 2, kernel="gemv"),
                  GemmTile(1, 16, 1, 1, 2, 4, kernel="gemv")]

    @pytest.mark.parametrize("tile", GEMV_TILES)
    @pytest.mark.parametrize("mode", ["fp8", "exact"])
    def test_interp_gemv_kernel(tile, mode, seed):
        """The CUDA-core decode kernel: one or two rows per expert-tile, 1..4 groups a step
        (odd group counts: past the last group nothing is added), rows spread over experts,
        N not a multiple of the tile; plain-ops decode (no inline PTX under the interpreter)."""
        for R, E, N, K, G, empty in ((5, 9, 72, 192, 64, 4), (13, 3, 40, 96, 32, 0), (1, 160, 64, 256, 128, 0)):
            args = make_case(R, E, N, K, G, empty=min(empty, E - 1), mode=mode)
            out = launch(*args, tile=tile, out=poisoned_out(args))
            assert rel_error(out, ref_of(args)) <= TOL_INTERP, (R, E, N, K, G)

    def test_interp_gemv_garbage_offsets_memory_safe(seed):
        a, a_scale, wg, ws, chan, _, G = make_case(20, 4, 64, 128, 128, mode="exact")
        off = torch.tensor([5, 100, -3, 12, 7])
        out = launch(a, a_scale, wg, ws, chan, off, G, tile=GEMV_TILES[1],
                     out=poisoned_out([a, a_scale, wg]))
        ref = reference.grouped_gemm(a, a_scale, formats.decode_gemm_layout(wg), ws, chan,
                                     torch.tensor([0, 20, 20, 20, 20]), G)
        assert rel_error(out[5:], ref[5:]) <= TOL_INTERP


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
GPU_R = [1, 511, 512, 513, 8191, 8192]
GPU_E = [1, 7, 60, 160]
GPU_NKG = [(200, 384, 128), (72, 352, 32), (136, 192, 64)]   # N, K not multiples of the tiles


@pytest.mark.cuda
@pytest.mark.parametrize("R", GPU_R)
@pytest.mark.parametrize("E", GPU_E)
def test_cuda_vs_reference(R, E, seed):
    N, K, G = GPU_NKG[(GPU_R.index(R) + GPU_E.index(E)) % len(GPU_NKG)]
    gen = torch.Generator().manual_seed(seed)
    for mode in ("fp8", "exact"):
        args = make_case(R, E, N, K, G, empty=E // 3, mode=mode, device="cuda", gen=gen)
        from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
        out = launch(*args, out=poisoned_out(args))
        err = rel_error(out, ref_of(args))
        assert err <= TOL_GPU, (mode, err)
        with value_checks(True):
            out2 = ops.grouped_gemm(*args)
        assert torch.equal(out2, out)


@pytest.mark.cuda
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("groups", [5, 4, 1])       # odd, even, a single group along K
def test_cuda_every_tile_and_group_size(G, groups, seed):
    from inductor_w4a8.launch.gemm_tiles import DECODE_TILE, GEMM_TILES, GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    args = make_case(777, 7, 264, groups * G, G, empty=2, mode="fp8", device="cuda")
    ref = ref_of(args)
    tiles = [DECODE_TILE] + [t for _, t in GEMM_TILES] + [
        GemmTile(16, 64, 4, 4, 3, 2), GemmTile(128, 64, 4, 3, 2, 2), GemmTile(128, 128, 8, 3, 1),
        GemmTile(64, 128, 8, 3, 1, 2), GemmTile(64, 64, 4, 4, 2, 1, prefetch_scales=True),
        GemmTile(128, 64, 4, 4, 2, tma_loads=True), GemmTile(64, 64, 4, 4, 2, tma_loads=True),
        GemmTile(128, 64, 4, 4, 2, prefetch_scales=True, tma_loads=True),
        GemmTile(128, 128, 8, 3, 1, tma_loads=True)]
    for tile in tiles:   # two groups a step with one group along K: the table picks that too
        out = launch(*args, tile=tile, out=poisoned_out(args))
        assert rel_error(out, ref) <= TOL_GPU, tile


CUDA_GEMV_TILES = [(1, 64, 4, 1, 6, 1), (1, 64, 2, 1, 6, 4), (2, 64, 2, 1, 6, 2), (1, 128, 4, 1, 3, 2)]


@pytest.mark.cuda
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("mode", ["fp8", "exact"])
def test_cuda_gemv_tiles(G, mode, seed):
    """The CUDA-core decode kernel (inline-PTX decode) against the fp64 reference: decode-like
    row counts (1..3 rows per expert), odd group counts, poisoned outputs; and bitwise
    deterministic."""
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    for R, E in ((1, 1), (8, 160), (64, 160), (300, 100)):
        args = make_case(R, E, 264, 5 * G, G, mode=mode, device="cuda")
        ref = ref_of(args)
        for fields in CUDA_GEMV_TILES:
            tile = GemmTile(*fields, kernel="gemv")
            out = launch(*args, tile=tile, out=poisoned_out(args))
            assert rel_error(out, ref) <= TOL_GPU, (R, E, tile)
            assert torch.equal(out, launch(*args, tile=tile)), tile


@pytest.mark.cuda
def test_cuda_gemv_garbage_offsets_and_positive_activations(seed):
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    tile = GemmTile(2, 64, 2, 1, 6, 2, kernel="gemv")
    args = make_case(64, 16, 512, 1024, 128, mode="fp8", device="cuda", positive=True)
    assert rel_error(launch(*args, tile=tile, out=poisoned_out(args)), ref_of(args)) <= TOL_GPU
    a, a_scale, wg, ws, chan, _, G = args
    for off in ([5, 100, -3, 12] + [7] * 13, [-(2**40)] + [2**40] * 16):
        out = launch(a, a_scale, wg, ws, chan, torch.tensor(off, device="cuda"), G, tile=tile)
        torch.cuda.synchronize()
        assert out.shape == (64, 512)


@pytest.mark.cuda
def test_cuda_positive_activations(seed):
    """All-positive activations (no cancellation help): the fp8 MMA accumulation stays in bound."""
    args = make_case(4096, 16, 512, 1024, 128, mode="fp8", device="cuda", positive=True)
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    assert rel_error(launch(*args, out=poisoned_out(args)), ref_of(args)) <= TOL_GPU


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["fp8", "exact"])
def test_cuda_opcheck(mode, seed):
    args = make_case(129, 7, 64, 128, 64, empty=2, mode=mode, device="cuda")
    opcheck(ops.grouped_gemm, tuple(args))


@pytest.mark.cuda
def test_cuda_tma_tiles_match_copies_and_fall_back_when_misaligned(seed):
    """A TMA tile gives the same bits as the same tile with copies (same products, same order),
    at GLM-like and ragged shapes; an `a` whose base is not 16-byte aligned runs the copies."""
    from inductor_w4a8.launch import grouped_gemm as gg
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    for R, E, N, K, G in ((8192, 160, 256, 1024, 128), (777, 7, 264, 5 * 64, 64), (5, 3, 72, 96, 32)):
        args = make_case(R, E, N, K, G, empty=1, mode="exact", device="cuda")
        for tile in (GemmTile(128, 64, 4, 4, 2, tma_loads=True), GemmTile(32, 64, 4, 3, 2, tma_loads=True)):
            copies = gg.grouped_gemm(*args, tile=dataclasses.replace(tile, tma_loads=False))
            out = gg.grouped_gemm(*args, tile=tile, out=poisoned_out(args))
            assert gg.LAST_LOADS == "tma"
            assert torch.equal(out, copies), (R, tile)
    a, *rest = make_case(100, 4, 64, 256, 128, mode="fp8", device="cuda")
    shifted = torch.empty(a.numel() + 8, dtype=torch.uint8, device="cuda")[8:].view(a.dtype).view(a.shape)
    shifted.copy_(a)
    assert not gg.tma_loads_supported(shifted, rest[1])
    tile = GemmTile(128, 64, 4, 4, 2, tma_loads=True)
    copies = gg.grouped_gemm(shifted, *rest, tile=tile)
    assert gg.LAST_LOADS == "copies"
    assert torch.equal(copies, gg.grouped_gemm(a, *rest, tile=tile)) and gg.LAST_LOADS == "tma"


@pytest.mark.cuda
def test_cuda_garbage_offsets_memory_safe(seed):
    a, a_scale, wg, ws, chan, _, G = make_case(300, 6, 64, 128, 128, mode="fp8", device="cuda")
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    # What is checked: an out-of-bounds access would surface as an illegal-address error at the
    # synchronize (examples/memcheck_grouped_gemm.py runs the same offsets under memcheck), and
    # the output keeps its shape; garbage offsets give no defined values to compare against.
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    for off in ([0, 10**12, -5, 300, 7, 2, 300], [-(10**12), 3, 3, 3, 3, 3, 10**12], [300] * 7):
        for tile in (None, GemmTile(128, 64, 4, 4, 2, tma_loads=True)):
            out = launch(a, a_scale, wg, ws, chan, torch.tensor(off, device="cuda"), G, tile=tile)
            assert out.shape == (300, 64) and out.dtype == torch.bfloat16
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_capture(seed):
    """No host sync in the launcher: capture once, replay with new offsets / activations."""
    args = make_case(1000, 60, 200, 384, 128, empty=10, mode="fp8", device="cuda")
    a, a_scale, wg, ws, chan, off, G = args
    static = [a.clone(), a_scale.clone(), off.clone()]
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), value_checks(False):
        ops.grouped_gemm(static[0], static[1], wg, ws, chan, static[2], G)   # warm / compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), value_checks(False):
        out = ops.grouped_gemm(static[0], static[1], wg, ws, chan, static[2], G)
    new = make_case(1000, 60, 200, 384, 128, empty=3, mode="fp8", device="cuda")
    static[0].copy_(new[0])
    static[1].copy_(new[1])
    static[2].copy_(new[5])
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.grouped_gemm(static[0], static[1], formats.decode_gemm_layout(wg), ws, chan,
                                 static[2], G)
    assert rel_error(out, ref) <= TOL_GPU


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["triton", "wgmma"])
@pytest.mark.parametrize("N,K", [(3072, 5120), (5120, 1536)])
def test_cuda_glm46_8192_tokens(N, K, kernel, seed):
    """GLM-4.6 GEMMs at 8192 tokens x top-8 (int64 addressing: R * N > 2^31 / 8): reference on a
    subset of experts in fp32 (exact products, fp32 sums), every output element written."""
    from inductor_w4a8 import bench
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    if kernel == "wgmma":
        _need_wgmma()
    tile = WGMMA_TILE if kernel == "wgmma" else None
    E, T = 160, 8192
    wt = bench.random_weights(E, N, K, 128, "cuda")
    off = bench.route(T, E, 8, "cuda")
    a, a_scale = bench.random_activations(T * 8, K, "cuda")
    out = launch(a, a_scale, wt.w, wt.s_fp8, wt.chan, off, 128, tile=tile,
                 out=torch.full((T * 8, N), float("nan"), dtype=torch.bfloat16, device="cuda"))
    assert bool(torch.isfinite(out).all())
    seff = formats.effective_group_scales(wt.s_fp8, wt.chan)
    offl = off.tolist()
    for e in (0, 1, 80, 158, 159):
        lo, hi = offl[e], offl[e + 1]
        q = formats.decode_gemm_layout(wt.w[e:e + 1])[0]
        wd = formats.dequantize_w4(q, seff[e], 128, dtype=torch.float64)
        ref = (a[lo:hi].double() @ wd.T) * a_scale[lo:hi].double()
        assert rel_error(out[lo:hi], ref) <= TOL_GPU, e


# ------------------------------------------------------------------------------------------
# GPU: the Gluon wgmma kernel (sm_90), same boundaries
# ------------------------------------------------------------------------------------------
def _wgmma_tiles():
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE, GemmTile
    return [WGMMA_TILE, GemmTile(64, 64, 4, 6, 2, kernel="wgmma"),
            GemmTile(128, 64, 4, 4, 2, kernel="wgmma"), GemmTile(64, 64, 4, 3, 3, kernel="wgmma")]


def _ran_gluon() -> bool:
    """The last launch ran the Gluon kernel (not the launcher's silent Triton fallback)."""
    from inductor_w4a8.launch import grouped_gemm as gg
    return gg.LAST_KERNEL == "wgmma"


def _need_wgmma():
    from inductor_w4a8.launch.grouped_gemm import wgmma_supported
    if not wgmma_supported(torch.device("cuda")):
        pytest.skip("the Gluon wgmma kernel needs an sm_90 GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("R", GPU_R)
@pytest.mark.parametrize("E", GPU_E)
def test_cuda_wgmma_vs_reference(R, E, seed):
    _need_wgmma()
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    N, K, G = GPU_NKG[(GPU_R.index(R) + GPU_E.index(E)) % len(GPU_NKG)]
    gen = torch.Generator().manual_seed(seed)
    for mode in ("fp8", "exact"):
        args = make_case(R, E, N, K, G, empty=E // 3, mode=mode, device="cuda", gen=gen)
        out = launch(*args, tile=WGMMA_TILE, out=poisoned_out(args))
        assert _ran_gluon()
        err = rel_error(out, ref_of(args))
        assert err <= TOL_GPU, (mode, err)


@pytest.mark.cuda
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("groups", [1, 2, 5, 12])   # odd counts run a zero-scale group at the end
def test_cuda_wgmma_tiles_and_group_counts(G, groups, seed):
    _need_wgmma()
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    args = make_case(777, 7, 264, groups * G, G, empty=2, mode="fp8", device="cuda")
    ref = ref_of(args)
    for tile in _wgmma_tiles():
        out = launch(*args, tile=tile, out=poisoned_out(args))
        assert _ran_gluon(), tile
        assert rel_error(out, ref) <= TOL_GPU, tile


@pytest.mark.cuda
def test_cuda_wgmma_equals_the_triton_kernel_bitwise(seed):
    """Eager launches take the Gluon tile at many rows per expert, torch.compile the Triton
    kernel: both do the same wgmma chain per group and the same fp32 promotion in the same
    order, so their outputs are the same bits (compiled == eager)."""
    _need_wgmma()
    from inductor_w4a8.launch.gemm_tiles import WGMMA_FALLBACK, WGMMA_TILE
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    gen = torch.Generator().manual_seed(seed)
    for mode in ("fp8", "exact"):
        args = make_case(6000, 12, 640, 1280, 128, empty=2, mode=mode, device="cuda", gen=gen)
        gluon = launch(*args, tile=WGMMA_TILE, out=poisoned_out(args))
        assert _ran_gluon()
        triton_out = launch(*args, tile=WGMMA_FALLBACK, out=poisoned_out(args))
        assert torch.equal(gluon.view(torch.int16), triton_out.view(torch.int16)), mode


@pytest.mark.cuda
def test_cuda_wgmma_positive_activations(seed):
    _need_wgmma()
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    args = make_case(4096, 16, 512, 1024, 128, mode="exact", device="cuda", positive=True)
    assert rel_error(launch(*args, tile=WGMMA_TILE, out=poisoned_out(args)), ref_of(args)) <= TOL_GPU


@pytest.mark.cuda
def test_cuda_wgmma_garbage_offsets_memory_safe(seed):
    """As test_cuda_garbage_offsets_memory_safe, for every Gluon tile: no fault, shape kept."""
    _need_wgmma()
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    a, a_scale, wg, ws, chan, _, G = make_case(300, 6, 64, 384, 128, mode="fp8", device="cuda")
    for tile in _wgmma_tiles():
        for off in ([0, 10**12, -5, 300, 7, 2, 300], [-(10**12), 3, 3, 3, 3, 3, 10**12], [300] * 7):
            out = launch(a, a_scale, wg, ws, chan, torch.tensor(off, device="cuda"), G, tile=tile)
            assert out.shape == (300, 64) and out.dtype == torch.bfloat16
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_wgmma_graph_capture(seed):
    """No host sync in the Gluon launch: capture once, replay with new offsets / activations."""
    _need_wgmma()
    from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as launch
    a, a_scale, wg, ws, chan, off, G = make_case(1000, 60, 200, 384, 128, empty=10, mode="exact",
                                                 device="cuda")
    static = [a.clone(), a_scale.clone(), off.clone()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch(static[0], static[1], wg, ws, chan, static[2], G, tile=WGMMA_TILE)   # compile
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(static[0], static[1], wg, ws, chan, static[2], G, tile=WGMMA_TILE)
    new = make_case(1000, 60, 200, 384, 128, empty=3, mode="exact", device="cuda")
    static[0].copy_(new[0])
    static[1].copy_(new[1])
    static[2].copy_(new[5])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.grouped_gemm(static[0], static[1], formats.decode_gemm_layout(wg), ws, chan,
                                 static[2], G)
    assert rel_error(out, ref) <= TOL_GPU


# ------------------------------------------------------------------------------------------
# CPU: what a launch traced through wrap_triton passes
# ------------------------------------------------------------------------------------------
class _RecordingWrap:
    """Stands in for torch.library.wrap_triton: records the kernel and the launch's keywords."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel, kwargs))
                return launch
        return _Grid()


@pytest.mark.parametrize("tile", [None, "tma", "gemv"])
def test_traced_launch_passes_every_defaulted_constexpr(tile):
    """Inductor's launcher of a user kernel drops constexprs left at their defaults (torch 2.11:
    `launcher() missing ... '_grid_2'`), so a traced launch passes all of them; a TMA tile traced
    runs with copies (descriptors need Triton's scratch, which the traced launch has not)."""
    pytest.importorskip("triton")
    import inspect

    from inductor_w4a8.launch import grouped_gemm as gg
    from inductor_w4a8.launch.gemm_tiles import GemmTile
    tile = {None: None, "tma": GemmTile(128, 64, 4, 3, 2, tma_loads=True),
            "gemv": GemmTile(1, 64, 4, 1, 6, 1, kernel="gemv")}[tile]
    args = make_case(40, 3, 64, 128, 128, mode="fp8")
    wrap = _RecordingWrap()
    gg.grouped_gemm(*args, tile=tile, wrap=wrap)
    ((kernel, kwargs),) = wrap.launches
    defaults = {n for n, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults and defaults <= set(kwargs), defaults - set(kwargs)
    assert kwargs["PDL"] is False and kwargs.get("TMA_LOADS", False) is False
