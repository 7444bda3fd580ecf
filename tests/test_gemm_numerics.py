"""Numerics of w4a8::grouped_gemm in both scale modes against the exact product of its own inputs.

Each mode's normwise error against the fp64 product of exactly what it was given (exact mode: q x
bf16 s; fp8 mode: q x fp8 s x fp32 chan) must sit on the bf16 output floor, the error of rounding
that exact product to bf16 once: within 1.2x of it. And with a power-of-two channel scale the two
modes mean the same product (s8 * chan is exact in bf16), so the kernel must give the same bits in
both: any difference would be the kernel treating the fp8 scales differently from bf16 ones.

CPU (CI): the Triton kernel under TRITON_INTERPRET=1 (this file re-runs itself in a child process
with the variable set). The interpreter rounds fp32 -> bf16 by truncation, so there the floor is
truncation's. GPU (`-m cuda`): GLM-4.6 w2 and w13 shapes at M = 1, 64, 513 tokens, on checkpoint
data (int4 RTN of random weights) and on the benchmark's data (random words and scales).
"""
import os

import pytest
import torch

from inductor_w4a8 import bench, bench_numerics, formats, reference
from inductor_w4a8.testing import rel_error, run_interpreted

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOOR_FACTOR = 1.2


def truncated_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (the interpreter's rounding), back as fp32."""
    bits = x.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32)


def floor_of(exact: torch.Tensor) -> float:
    """The error of rounding `exact` to bf16 once, the way this platform's kernel rounds."""
    if INTERPRETED:
        return rel_error(truncated_bf16(exact), exact)
    return bench_numerics.bf16_floor(exact)


def gemm_case(data: str, E: int, N: int, K: int, T: int, device, gen):
    """(a, a_scale, w, s_bf16, s_fp8, chan, q, offsets) for T tokens routed top-8 (top-2 when E
    is small) over E experts, checkpoint-like or benchmark-like data."""
    G = 128
    top_k = min(8, E)
    if data == "checkpoint":
        ck = bench_numerics.checkpoint_gemm(E, N, K, G, device, gen)
        w, s_bf16, s_fp8, chan, q = ck.w, ck.s_bf16, ck.s_fp8, ck.chan, ck.q
        a, a_scale = bench_numerics.fp8_activations(T * top_k, K, device, gen)
    else:
        wt = bench.random_weights(E, N, K, G, device)
        w, s_bf16, s_fp8, chan = wt.w, wt.s_bf16, wt.s_fp8, wt.chan
        q = formats.decode_gemm_layout(w)
        a, a_scale = bench.random_activations(T * top_k, K, device)
    offsets = bench.route(T, E, top_k, device, gen)
    return a, a_scale, w, s_bf16, s_fp8, chan, q, offsets


def mode_errors(launch, case):
    """{mode: (error vs its own exact product, that product's bf16 floor)}."""
    a, a_scale, w, s_bf16, s_fp8, chan, q, offsets = case
    out = {}
    for mode, (s, c) in {"exact": (s_bf16, None), "fp8": (s_fp8, chan)}.items():
        poisoned = torch.full((a.shape[0], w.shape[1]), float("nan"), dtype=torch.bfloat16, device=a.device)
        got = launch(a, a_scale, w, s, c, offsets, 128, out=poisoned)
        exact = reference.grouped_gemm(a, a_scale, q, s, c, offsets, 128)
        out[mode] = (rel_error(got, exact), floor_of(exact))
    return out


def power_of_two_case(case, gen):
    """The case's fp8 group scales with a power-of-two chan, and the same product in exact mode."""
    a, a_scale, w, _, s_fp8, chan, _, offsets = case
    chan2 = 2.0 ** torch.randint(-14, -6, chan.shape, generator=gen, device="cpu").float().to(chan.device)
    s_bf16 = (s_fp8.float() * chan2).to(torch.bfloat16)
    assert torch.equal(s_bf16.float(), s_fp8.float() * chan2)      # exact in bf16: same product
    return a, a_scale, w, s_fp8, chan2, s_bf16, offsets


def assert_modes_agree_bitwise(launch, case, gen):
    a, a_scale, w, s_fp8, chan2, s_bf16, offsets = power_of_two_case(case, gen)
    fp8 = launch(a, a_scale, w, s_fp8, chan2, offsets, 128)
    exact = launch(a, a_scale, w, s_bf16, None, offsets, 128)
    assert torch.isfinite(fp8.float()).all()
    assert torch.equal(fp8.view(torch.int16), exact.view(torch.int16)), \
        f"{int((fp8 != exact).sum())} of {fp8.numel()} outputs differ between the modes"


# ------------------------------------------------------------------------------------------
# CPU: the Triton kernel under the interpreter
# ------------------------------------------------------------------------------------------
if not INTERPRETED:
    def test_under_triton_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="interp", timeout=1800)
else:
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm as interp_launch

    @pytest.mark.parametrize("data", ["checkpoint", "bench"])
    @pytest.mark.parametrize("N,K", [(96, 1536), (64, 640)])   # GLM w2's K; a w13-like 5-group K
    def test_interp_both_modes_on_the_floor(data, N, K, seed):
        gen = torch.Generator().manual_seed(seed)
        errors = mode_errors(interp_launch, gemm_case(data, 3, N, K, 6, "cpu", gen))
        for mode, (err, floor) in errors.items():
            assert err <= FLOOR_FACTOR * floor, (mode, err, floor)

    def test_interp_power_of_two_chan_modes_bitwise_equal(seed):
        gen = torch.Generator().manual_seed(seed)
        assert_modes_agree_bitwise(interp_launch, gemm_case("checkpoint", 3, 64, 1536, 6, "cpu", gen), gen)


# ------------------------------------------------------------------------------------------
# CPU: the sm_90 code of both modes does the same arithmetic (compiled, not run)
# ------------------------------------------------------------------------------------------
def _sm90_ttgir(mode: str, tile) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inductor_w4a8.kernels.grouped_gemm import w4a8_grouped_gemm_kernel
    scale = "*fp8e4nv" if mode == "fp8" else "*bf16"
    signature = {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": scale,
                 "chan_ptr": "*fp32" if mode == "fp8" else scale, "off_ptr": "*i64", "out_ptr": "*bf16",
                 "R": "i32", "N": "i32", "K": "i32", "E": "i32"}
    constexprs = {"GROUP": 128, "HAS_CHAN": mode == "fp8", "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                  "BLOCK_E": 256, "USE_ASM": True, "GROUPS_PER_STEP": tile.groups_per_step,
                  "PREFETCH_SCALES": tile.prefetch_scales, "PDL": False,
                  "TMA_LOADS": tile.tma_loads}
    signature.update({name: "constexpr" for name in constexprs})
    try:
        compiled = triton.compile(ASTSource(fn=w4a8_grouped_gemm_kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": tile.num_warps, "num_stages": tile.num_stages})
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
        raise
    return compiled.asm["ttgir"]


def _ops(ttgir: str):
    import collections
    import re
    lines = [re.sub(r"loc\(.*", "", line) for line in ttgir.splitlines() if not line.startswith("#loc")]
    ops = collections.Counter(m.group(1) for line in lines for m in [re.search(r"= ([a-z_]+\.[a-z_]+)", line)] if m)
    dots = [re.sub(r"%[\w#]+", "%", line.strip()) for line in lines if "_dot " in line or "tt.dot " in line]
    mul_types = [line.rsplit(":", 1)[-1].strip() for line in lines if "arith.mulf" in line]
    return ops, dots, mul_types


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does not compile")
@pytest.mark.parametrize("regime", ["decode", 0, -1])
def test_sm90_code_of_both_modes_does_the_same_arithmetic(regime):
    """fp8 mode may differ from exact mode only in how the group scale becomes fp32 (fp8 -> fp32
    instead of bf16 -> fp32, both exact) and in one more fp32 multiply (by chan) in the epilogue:
    the same MMAs, the same promotion, the same sums, one rounding to bf16."""
    pytest.importorskip("triton")
    from inductor_w4a8.launch.gemm_tiles import DECODE_TILE, GEMM_TILES
    tile = DECODE_TILE if regime == "decode" else GEMM_TILES[regime][1]
    fp8_ops, fp8_dots, fp8_muls = _ops(_sm90_ttgir("fp8", tile))
    ex_ops, ex_dots, ex_muls = _ops(_sm90_ttgir("exact", tile))
    assert fp8_dots and fp8_dots == ex_dots
    assert fp8_ops["arith.addf"] == ex_ops["arith.addf"]
    assert fp8_ops["arith.mulf"] == ex_ops["arith.mulf"] + 1
    assert all("f32" in t and "bf16" not in t and "f16" not in t.replace("f32", "") for t in fp8_muls + ex_muls), \
        (fp8_muls, ex_muls)
    assert fp8_ops["arith.truncf"] == ex_ops["arith.truncf"] == 1        # the output, once
    # the scales become fp32 once per group, where they are used: fp8 by a convert, bf16 by a
    # widening (loaded a step ahead and carried as int32 bits: a 16-bit shift under fp32's bits)
    widen = "arith.shli" if tile.prefetch_scales else "arith.extf"
    assert fp8_ops["tt.fp_to_fp"] == ex_ops[widen] == tile.groups_per_step
    assert fp8_ops["arith.extf"] == 0 and ex_ops["tt.fp_to_fp"] == 0


# ------------------------------------------------------------------------------------------
# GPU: GLM-4.6 shapes
# ------------------------------------------------------------------------------------------
GLM_W2, GLM_W13 = (5120, 1536), (3072, 5120)


def _cuda_launch(*args, out=None):
    from inductor_w4a8.launch.grouped_gemm import grouped_gemm
    return grouped_gemm(*args, out=out)


@pytest.mark.cuda
@pytest.mark.parametrize("data", ["checkpoint", "bench"])
@pytest.mark.parametrize("T", [1, 64, 513])
@pytest.mark.parametrize("shape", [GLM_W2, GLM_W13], ids=["w2", "w13"])
def test_cuda_both_modes_on_the_floor_glm(shape, T, data, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N, K = shape
    errors = mode_errors(_cuda_launch, gemm_case(data, 16, N, K, T, "cuda", gen))
    print({mode: (f"{err:.3e}", f"floor {floor:.3e}", f"{err / floor:.2f}x") for mode, (err, floor) in errors.items()})
    for mode, (err, floor) in errors.items():
        assert err <= FLOOR_FACTOR * floor, (mode, err, floor)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 513])
def test_cuda_power_of_two_chan_modes_bitwise_equal_glm_w2(T, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    assert_modes_agree_bitwise(_cuda_launch, gemm_case("checkpoint", 16, *GLM_W2, T, "cuda", gen),
                               torch.Generator().manual_seed(seed))
