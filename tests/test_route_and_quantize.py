"""launch/route_and_quantize.py: one token's routing, sort and fp8 dispatch in one launch.

Its outputs must be bit for bit those of select_and_sort_experts followed by
quantize_scatter_fp8 (the two launchers the block runs otherwise, and the two ops that
torch.compile traces): under TRITON_INTERPRET=1 in CI (re-run in a child process), on the GPU
with `-m cuda`; plus the sm_90 build with programmatic dependent launch (kernels/pdl.py).
"""
import os

import pytest
import torch

from inductor_w4a8.testing import run_interpreted
from test_moe_ops import ROUTING_IDS, ROUTINGS, routing_args

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _hidden(T, K, device, *, nan_at=None, zero=False):
    x = (torch.randn(T, K) * 3).to(torch.bfloat16)
    if zero:
        x.zero_()
    if nan_at is not None:
        x[0, nan_at] = float("nan")
    return x.to(device)


def _check_against_two_launches(args, x):
    from inductor_w4a8.launch.quantize_scatter import quantize_scatter_fp8
    from inductor_w4a8.launch.route_and_quantize import route_and_quantize_scatter
    from inductor_w4a8.launch.routing import select_and_sort_experts
    fused = route_and_quantize_scatter(args[0], args[1], x, *args[2:])
    routed = select_and_sort_experts(*args)
    expected = (*routed, *quantize_scatter_fp8(x, routed[3]))
    assert len(fused) == len(expected) == 7
    for i, (got, want) in enumerate(zip(fused, expected)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        if got.dtype == torch.float8_e4m3fn:
            got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert torch.equal(got, want) or (got.is_floating_point()
                                          and torch.equal(got.isnan(), want.isnan())
                                          and torch.equal(got.nan_to_num(), want.nan_to_num())), i


if not INTERPRETED:
    def test_under_triton_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="interp", timeout=1800)

    def test_one_token_kernel_builds_for_sm90_with_pdl():
        """The fused kernel compiles for sm_90 with PDL, and the grid-dependency wait comes
        before the kernel's first global load (kernels/pdl.py: nothing may be read before it)."""
        triton = pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from inductor_w4a8.kernels.route_and_quantize import route_and_quantize_one_token_kernel
        sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "x_ptr": "*bf16", "weights_ptr": "*fp32",
               "ids_ptr": "*i32", "sorted_rows_ptr": "*i32", "flat_to_sorted_ptr": "*i32",
               "offsets_ptr": "*i64", "a_ptr": "*u8", "a_scale_ptr": "*fp32", "E": "i32",
               "n_group": "i32", "group_len": "i32", "topk_group": "i32", "scaling": "fp32", "K": "i32"}
        const = dict(TOP_K=8, BLOCK_G=8, BLOCK_GL=32, BLOCK_K=8, SOFTMAX=False, HAS_BIAS=True,
                     GROUPED=True, RENORMALIZE=True, BLOCK_E1=256, MIN_SCALE=1.0 / (448 * 512),
                     BLOCK_X=8192, HW=True, PDL=True)
        sig.update({c: "constexpr" for c in const})
        try:
            compiled = triton.compile(
                ASTSource(fn=route_and_quantize_one_token_kernel, signature=sig, constexprs=const),
                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True})
        except RuntimeError as e:
            if "ptxas" in str(e).lower():
                pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
            raise
        ptx = compiled.asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait, release, first_load = (body.find("griddepcontrol.wait"),
                                     body.find("griddepcontrol.launch_dependents"), body.find("ld.global"))
        assert compiled.metadata.launch_pdl
        assert 0 <= wait < release < first_load, (wait, release, first_load)

else:
    @pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
    @pytest.mark.parametrize("T,K", [(1, 200), (1, 64), (3, 200)])   # T = 3: the two launchers
    def test_interp_matches_the_two_launches(routing, T, K, seed):
        _check_against_two_launches(routing_args(T, routing), _hidden(T, K, "cpu"))

    def test_interp_nan_zero_and_nan_logits():
        routing = ROUTINGS[3]
        _check_against_two_launches(routing_args(1, routing), _hidden(1, 96, "cpu", nan_at=5))
        _check_against_two_launches(routing_args(1, routing), _hidden(1, 96, "cpu", zero=True))
        args = routing_args(1, routing)
        args[0].fill_(float("nan"))
        _check_against_two_launches(args, _hidden(1, 96, "cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("K", [5120, 200, 16384])
def test_cuda_matches_the_two_launches(routing, K, seed):
    _check_against_two_launches(routing_args(1, routing, device="cuda"), _hidden(1, K, "cuda"))
    _check_against_two_launches(routing_args(1, routing, device="cuda"), _hidden(1, K, "cuda", nan_at=7))


@pytest.mark.cuda
def test_cuda_block_is_the_same_with_and_without_pdl(seed):
    """The decode block (fused first kernel, PDL between all kernels) against the same block with
    PDL off and against the ops, bit for bit, at 1 token and at a size whose GEMMs run long
    enough for an early-launched kernel to read unfinished data if it did not wait."""
    from inductor_w4a8 import eager
    from inductor_w4a8.launch import _common
    from compile_utils import make_inputs, make_moe
    moe = make_moe(seed=seed % 1000, device="cuda", num_experts=16, top_k=4, hidden_size=1024,
                   intermediate_size=512, scoring="sigmoid", n_group=4, topk_group=2)
    with torch.no_grad():
        for T in (1, 1, 600):
            x, logits = make_inputs(T, moe, seed=seed + T, device="cuda")
            out = moe(x, logits)
            with _common.pdl_launches(False):
                no_pdl = moe(x, logits)
            with eager.direct_calls(False):
                ops = moe(x, logits)
            torch.cuda.synchronize()
            assert torch.equal(out, no_pdl) and torch.equal(out, ops), T
    assert _common._pdl_devices.get(torch.cuda.current_device()) is True
