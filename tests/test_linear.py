"""W4A8Linear and w4a8::linear: opcheck, the CPU kernel against an fp64 oracle of the checkpoint's
int4 and the fp8 activations, the module's lifecycle and refusals, torch.compile and meta tracing;
on the GPU the Triton path (the grouped GEMM with one expert) at GLM-4.6 attention shapes and under
CUDA-graph capture."""
import os

import pytest
import torch

import inductor_w4a8 as w4a8
from inductor_w4a8 import formats
from inductor_w4a8.checks import W4A8InputError
from inductor_w4a8.testing import GEMM_TOL_GPU, opcheck, poisoned_empty, rel_error, run_interpreted

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def random_layer(N, K, G, *, seed, bias=False, scale_mode="exact", device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
    lin = w4a8.W4A8Linear.from_float(w.to(device), None if b is None else b.to(device), group_size=G,
                                     scale_mode=scale_mode)
    return lin, w, b


def oracle(x, w, G, bias=None):
    """fp64: fp8-per-token x times the int4 checkpoint weight (q * s), exact accumulation."""
    packed, scale = formats.quantize_w4(w.to(x.device), G)
    wq = formats.dequantize_w4(formats.unpack_int4(packed, biased=True), scale, G, dtype=torch.float64)
    xq, xs = formats.quantize_fp8_per_token(x)
    out = (xq.double() * xs.double()) @ wq.T
    return out if bias is None else out + bias.to(x.device).double()


@pytest.mark.parametrize("scale_mode", ["exact", "fp8"])
@pytest.mark.parametrize("T,N,K,G", [(1, 48, 128, 128), (5, 40, 256, 64), (3, 72, 96, 32)])
def test_opcheck(T, N, K, G, scale_mode, seed):
    lin, _, _ = random_layer(N, K, G, seed=seed, scale_mode=scale_mode)
    x = torch.randn(T, K).to(torch.bfloat16)
    opcheck(torch.ops.w4a8.linear, (x, lin.weight, lin.group_scale, lin.chan_scale, G))


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_matches_the_fp64_oracle(G, bias, seed):
    lin, w, b = random_layer(80, 256, G, seed=seed, bias=bias)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    with poisoned_empty():
        y = lin(x)
    assert y.shape == (2, 3, 80) and y.dtype == torch.bfloat16
    ref = oracle(x.reshape(6, 256), w, G, b).reshape(2, 3, 80)
    err = rel_error(y, ref)
    print(f"G={G} bias={bias}: normwise error vs fp64 {err:.2e}")
    assert 0 < err < 3e-3      # the bf16 output rounding


def test_fp8_scale_mode_is_close_to_exact(seed):
    exact, w, _ = random_layer(64, 256, 128, seed=seed)
    fp8, _, _ = random_layer(64, 256, 128, seed=seed, scale_mode="fp8")
    x = torch.randn(4, 256).to(torch.bfloat16)
    assert fp8.chan_scale is not None and fp8.group_scale.dtype == formats.FP8_DTYPE
    assert rel_error(fp8(x), oracle(x, w, 128)) < 5e-2 and rel_error(exact(x), fp8(x)) > 0


def test_loads_like_a_compressed_tensors_linear(seed):
    """The constructor's parameters take a compressed-tensors Linear's tensors via load_state_dict."""
    _, w, _ = random_layer(32, 128, 64, seed=seed)
    packed, scale = formats.quantize_w4(w, 64)
    lin = w4a8.W4A8Linear(128, 32, group_size=64)
    assert dict((n, (p.dtype, tuple(p.shape))) for n, p in lin.named_parameters()) == {
        "weight_packed": (torch.int32, (32, 16)), "weight_scale": (torch.bfloat16, (32, 2))}
    lin.load_state_dict({"weight_packed": packed, "weight_scale": scale})
    lin.process_weights_after_loading()
    ref = w4a8.W4A8Linear.from_float(w, group_size=64)
    x = torch.randn(3, 128).to(torch.bfloat16)
    assert torch.equal(lin(x), ref(x))
    assert "weight_packed" not in dict(lin.named_parameters())


def test_refusals():
    with pytest.raises(W4A8InputError, match="in_features=100 is not a multiple"):
        w4a8.W4A8Linear(100, 8, group_size=32)
    with pytest.raises(W4A8InputError, match="group_size=16"):
        w4a8.W4A8Linear(128, 8, group_size=16)
    lin = w4a8.W4A8Linear(128, 8, group_size=64)
    with pytest.raises(w4a8.W4A8InputError, match="not processed"):
        lin(torch.zeros(1, 128, dtype=torch.bfloat16))
    lin, _, _ = random_layer(8, 128, 64, seed=0)
    with pytest.raises(RuntimeError, match="already processed"):
        lin.process_weights_after_loading()
    with pytest.raises(W4A8InputError, match=r"w4a8::linear: x must have dtype torch.bfloat16"):
        lin(torch.zeros(2, 128))
    with pytest.raises(W4A8InputError, match=r"\[\.\.\., 128\]"):
        lin(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(W4A8InputError, match="inference only"):
        lin(torch.zeros(2, 128, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(W4A8InputError, match="w holds 2 experts"):
        torch.ops.w4a8.linear(torch.zeros(1, 128, dtype=torch.bfloat16), lin.weight.expand(2, -1, -1).contiguous(),
                              lin.group_scale, None, 64)


def test_compiles_without_graph_break_and_traces_on_meta(seed):
    lin, _, _ = random_layer(48, 256, 128, seed=seed)
    x = torch.randn(5, 256).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lin, backend="w4a8", fullgraph=True)
    assert torch.equal(compiled(x), lin(x))
    meta = w4a8.W4A8Linear(256, 48, group_size=128, device="meta")
    meta.process_weights_after_loading()
    assert meta(torch.empty(7, 256, dtype=torch.bfloat16, device="meta")).shape == (7, 48)


# ------------------------------------------------------------------------------------------------
# CPU: the Triton path (what the CUDA kernel runs) under the interpreter
# ------------------------------------------------------------------------------------------------
if not INTERPRETED:
    def test_triton_path_under_the_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="interp", timeout=1500)
else:
    @pytest.mark.parametrize("T,N,K,G,scale_mode", [(1, 72, 128, 64, "exact"), (37, 64, 256, 128, "fp8"),
                                                    (0, 16, 64, 32, "exact")])
    def test_interp_triton_path_matches_the_oracle(T, N, K, G, scale_mode):
        from inductor_w4a8.ops import linear_triton
        lin, w, _ = random_layer(N, K, G, seed=T + N, scale_mode=scale_mode)
        x = torch.randn(T, K).to(torch.bfloat16)
        with poisoned_empty():
            y = linear_triton(x, lin.weight, lin.group_scale, lin.chan_scale, G)
        assert y.shape == (T, N)
        if T:
            err = rel_error(y, oracle(x, w, G))
            print(f"interpreted T={T} N={N} K={K} G={G} {scale_mode}: {err:.2e}")
            assert err < (6e-3 if scale_mode == "exact" else 5e-2)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
GLM46_ATTENTION = {"q_proj": (12288, 5120), "k_proj": (1024, 5120), "o_proj": (5120, 12288)}


@pytest.mark.cuda
@pytest.mark.parametrize("proj", sorted(GLM46_ATTENTION))
@pytest.mark.parametrize("T", [1, 511, 513, 8192])
@pytest.mark.parametrize("scale_mode", ["exact", "fp8"])
def test_cuda_glm46_attention_shapes_match_the_oracle(proj, T, scale_mode):
    N, K = GLM46_ATTENTION[proj]
    lin, w, _ = random_layer(N, K, 128, seed=T + N, device="cuda", scale_mode=scale_mode)
    x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
    with poisoned_empty():
        y = lin(x)
    err = rel_error(y, oracle(x, w, 128))
    tol = GEMM_TOL_GPU if scale_mode == "exact" else 5e-2
    print(f"{proj} T={T} {scale_mode}: normwise error vs fp64 {err:.2e}")
    assert err < tol


@pytest.mark.cuda
def test_cuda_graph_capture_replays_eager():
    lin, _, _ = random_layer(1024, 5120, 128, seed=3, device="cuda")
    static_x = torch.randn(64, 5120, device="cuda").to(torch.bfloat16)
    lin(static_x)                                   # compile the kernels before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lin(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(64, 5120, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(static_y, lin(static_x))


def test_unloaded_or_corrupt_weights_refused_before_processing():
    """The MoE's post-processing rule: nothing loaded, or NaN / negative scales, is refused
    before anything is written, naming the tensor."""
    lin = w4a8.W4A8Linear(128, 16, group_size=64)
    with pytest.raises(w4a8.W4A8InputError, match="every value of weight_scale is 0"):
        lin.process_weights_after_loading()
    assert not lin.weights_processed and lin.weight_packed.dtype == torch.int32
    for bad, what in ((float("nan"), "NaN or infinite"), (-0.5, "negative")):
        fresh = w4a8.W4A8Linear(128, 16, group_size=64)
        packed, scale = formats.quantize_w4(torch.randn(16, 128), 64)
        scale[2, 1] = bad
        fresh.load_state_dict({"weight_packed": packed, "weight_scale": scale})
        before = fresh.weight_packed.clone()
        with pytest.raises(w4a8.W4A8InputError, match=f"weight_scale holds 1 {what}.*\\[2, 1\\]"):
            fresh.process_weights_after_loading()
        assert torch.equal(fresh.weight_packed, before)   # untouched
