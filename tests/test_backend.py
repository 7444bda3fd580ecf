"""The "w4a8" torch.compile backend and the lowerings.

CPU (CI): fullgraph compile of W4A8MoE and of a model of several MoE layers, compiled == eager,
zero graph breaks, at most one recompile for token counts 1..8192; options pass through to
Inductor; the Dynamo graph's op sequence and the generated code's facts pinned with expecttest;
the torch.cond tile dispatch of the traced GEMM checked with a stand-in launcher on CPU.
CUDA (`-m cuda`): compiled vs eager, our Triton kernel in the generated code, no extern call.
"""
from __future__ import annotations

import re

import expecttest
import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import inductor_w4a8 as w4a8
from inductor_w4a8 import backend, formats
from inductor_w4a8.launch import gemm_tiles
from inductor_w4a8.lowerings import Settings
from inductor_w4a8.lowerings.decompositions import DEFAULT_FUSED
from inductor_w4a8.lowerings import grouped_gemm as gemm_lowering
from inductor_w4a8.testing import rel_error

from compile_utils import GLM, SMALL, MoEModel, RecordingBackend, make_inputs, make_moe
from compile_utils import fresh_dynamo  # noqa: F401  (autouse fixture)

TOKEN_COUNTS = (1, 2, 3, 7, 64, 255, 256, 257, 1000, 4096, 8191, 8192)


def mark_tokens(*tensors):
    """What a serving loop does: the token dim is dynamic (T = 1 is left to specialize)."""
    for t in tensors:
        if t.shape[0] >= 2:
            torch._dynamo.mark_dynamic(t, 0)
    return tensors


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def extern_w4a8_calls(code: str) -> list[str]:
    return sorted(set(re.findall(r"torch\.ops\.w4a8\.(\w+)\.default\(", code)))


# ============================================================================================
# registration and options
# ============================================================================================
def test_backend_registered_on_import():
    assert "w4a8" in torch._dynamo.list_backends(exclude_tags=())
    assert torch._dynamo.lookup_backend("w4a8") is backend.w4a8_backend
    backend.register()  # idempotent
    assert w4a8.capture_sizes is w4a8.cudagraph.capture_sizes


def test_split_options():
    settings, inductor = backend.split_options(
        {"w4a8.grouped_gemm": "extern", "w4a8.fuse": "none", "max_autotune": True})
    assert settings.grouped_gemm == "extern" and settings.fuse == ()
    assert inductor == {**backend.DEFAULT_INDUCTOR_OPTIONS, "max_autotune": True}
    settings, _ = backend.split_options({"w4a8.fuse": "combine, quantize_fp8_per_token"})
    assert settings.fuse == ("combine", "quantize_fp8_per_token")
    assert backend.split_options(None)[0] == Settings()
    assert set(backend.split_options({"w4a8.fuse": "all"})[0].fuse) == {
        "quantize_fp8_per_token", "silu_mul_quantize_fp8", "combine", "select_experts", "gather_rows_fp8",
        "quantize_scatter_fp8", "select_and_sort_experts"}


@pytest.mark.parametrize("options, match", [
    ({"w4a8.tile": 3}, "unknown w4a8 backend option"),
    ({"w4a8.grouped_gemm": "cutlass"}, "w4a8.grouped_gemm='cutlass'"),
    ({"w4a8.fuse": ["sort_by_expert"]}, "no decomposition for"),
])
def test_bad_options_refused(options, match):
    with pytest.raises(ValueError, match=match):
        backend.split_options(options)


def test_bad_inductor_option_refused_at_compile():
    moe = make_moe()
    compiled = torch.compile(moe, backend="w4a8", options={"no_such_inductor_option": 1})
    with pytest.raises(Exception, match="no_such_inductor_option"):
        compiled(*make_inputs(4, moe))


@pytest.mark.parametrize("how", ["mode", "options"])
def test_modes_and_inductor_options_pass_through(how):
    moe = make_moe()
    if how == "mode":
        compiled = torch.compile(moe, backend="w4a8", mode="max-autotune-no-cudagraphs", fullgraph=True)
    else:  # torch.compile takes mode= or options=, not both: our options carry the mode
        compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options={
            "w4a8.mode": "max-autotune-no-cudagraphs", "w4a8.fuse": "all", "epilogue_fusion": False})
    x, logits = make_inputs(9, moe)
    assert torch.equal(compiled(x, logits), moe(x, logits))


def test_mode_conflict_refused():
    with pytest.raises(ValueError, match="disagree"):
        backend.w4a8_backend(None, [], mode="default", options={"w4a8.mode": "max-autotune"})


# ============================================================================================
# fullgraph compile on CPU: compiled == eager, no graph break, <= 1 recompile
# ============================================================================================
@pytest.mark.parametrize("fuse", ["default", "combine", "all"])
@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_block_compiles_once_for_all_token_counts(fuse, order):
    moe = make_moe()
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options={"w4a8.fuse": fuse})
    sizes = sorted(TOKEN_COUNTS, reverse=(order == "descending"))
    for T in sizes:
        x, logits = mark_tokens(*make_inputs(T, moe))
        out = compiled(x, logits)
        assert out.shape == (T, SMALL["hidden_size"]) and out.dtype == torch.bfloat16
        ref = moe(x, logits)
        if fuse == "all":  # Inductor's softmax rounds differently from aten's in the last ulp
            assert rel_error(out, ref) < 1e-2, f"T={T}"
        else:  # CPU: the decompositions are the CPU kernels' own math, so this is bitwise
            assert torch.equal(out, ref), f"T={T}"
    assert graph_breaks() == 0
    assert unique_graphs() <= 2, f"{unique_graphs()} graphs for token counts {sizes}"


def test_compiled_code_runs_without_value_checks(monkeypatch):
    """Value checks synchronize the device, so they are an eager-only debug switch: the compiled
    block calls the same ops with them off even when the switch is on (eager honours it)."""
    from inductor_w4a8 import ops
    decisions = []
    original = ops.value_checks_enabled
    monkeypatch.setattr(ops, "value_checks_enabled", lambda t: decisions.append(original(t)) or decisions[-1])
    moe = make_moe()
    x, logits = make_inputs(6, moe)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True)
    with w4a8.value_checks(True):
        compiled(x, logits)  # first call traces (checks see fake tensors) and runs
        decisions.clear()
        compiled(x, logits)
        assert decisions and not any(decisions), decisions
        moe(x, logits)
        assert any(decisions)


def test_dynamic_true_compiles_once():
    moe = make_moe(scoring="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, dynamic=True)
    for T in (5, 1, 8192, 300):
        x, logits = make_inputs(T, moe)
        torch.testing.assert_close(compiled(x, logits), moe(x, logits), rtol=0, atol=0)
    assert graph_breaks() == 0
    assert unique_graphs() <= 2


def test_model_of_several_layers_compiles_once():
    model = MoEModel(num_layers=3)
    compiled = torch.compile(model, backend="w4a8", fullgraph=True)
    for T in (8192, 1, 17, 4096, 2, 513):
        x = mark_tokens(make_inputs(T, model.layers[0])[0])[0]
        out = compiled(x)
        ref = model(x)
        assert torch.equal(out, ref), f"T={T}: {rel_error(out, ref)}"
    assert graph_breaks() == 0
    assert unique_graphs() <= 2


def test_large_token_counts_index_in_int64():
    """R = T * top_k rows past 2^16 and offsets near int32 products stay exact on the CPU path."""
    moe = make_moe(num_experts=4, top_k=4)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True)
    x, logits = mark_tokens(*make_inputs(8192, moe))
    assert torch.equal(compiled(x, logits), moe(x, logits))


# ============================================================================================
# expecttest: the graph's op sequence and the generated code's facts
# ============================================================================================
class TestPinnedGraphs(expecttest.TestCase):
    def setUp(self):
        torch._dynamo.reset()

    def _compile(self, options=None, T=6):
        moe = make_moe()
        recorder = RecordingBackend(options=options)
        compiled = torch.compile(moe, backend=recorder, fullgraph=True)
        x, logits = mark_tokens(*make_inputs(T, moe))
        out, codes = run_and_get_code(compiled, x, logits)
        self.assertTrue(torch.equal(out, moe(x, logits)))
        return recorder, "\n".join(codes)

    def test_dynamo_graph_op_sequence(self):
        recorder, _ = self._compile()
        self.assertExpectedInline("\n".join(recorder.w4a8_ops()), """\
w4a8.select_and_sort_experts
w4a8.quantize_scatter_fp8
w4a8.grouped_gemm
w4a8.silu_mul_quantize_fp8
w4a8.grouped_gemm
w4a8.combine""")

    def test_generated_code_default(self):
        """Default: every op stays our kernel (nothing fused, by measurement: see DEFAULT_FUSED);
        on CPU the GEMM is an extern call too (the traced kernel is for CUDA)."""
        _, code = self._compile()
        self.assertExpectedInline(" ".join(extern_w4a8_calls(code)), """\
combine grouped_gemm quantize_scatter_fp8 select_and_sort_experts silu_mul_quantize_fp8""")
        self.assertEqual(code.count("torch.ops.w4a8.grouped_gemm.default("), 2)

    def test_generated_code_fuse_none(self):
        _, code = self._compile({"w4a8.fuse": "none"})
        self.assertExpectedInline(" ".join(extern_w4a8_calls(code)), """\
combine grouped_gemm quantize_scatter_fp8 select_and_sort_experts silu_mul_quantize_fp8""")

    def test_generated_code_fuse_all(self):
        _, code = self._compile({"w4a8.fuse": "all"})
        self.assertExpectedInline(" ".join(extern_w4a8_calls(code)), """grouped_gemm sort_by_expert""")

    def test_other_backends_keep_the_ops(self):
        """The rules are scoped to the "w4a8" backend: plain Inductor calls every op, even after
        a "w4a8" compile of the same module (no cache crosstalk either way)."""
        moe = make_moe()
        x, logits = mark_tokens(*make_inputs(6, moe))
        fuse = {"w4a8.fuse": "combine"}
        _, ours = run_and_get_code(torch.compile(moe, backend="w4a8", fullgraph=True, options=fuse),
                                   x, logits)
        torch._dynamo.reset()
        _, plain = run_and_get_code(torch.compile(moe, backend="inductor", fullgraph=True), x, logits)
        torch._dynamo.reset()
        _, ours2 = run_and_get_code(torch.compile(moe, backend="w4a8", fullgraph=True, options=fuse),
                                    x, logits)
        self.assertIn("combine", extern_w4a8_calls("\n".join(plain)))
        self.assertNotIn("combine", extern_w4a8_calls("\n".join(ours)))
        self.assertNotIn("combine", extern_w4a8_calls("\n".join(ours2)))


# ============================================================================================
# the traced GEMM's tile dispatch (torch.cond over tile regimes), on CPU with stand-ins
# ============================================================================================
@pytest.mark.parametrize("shape", [(3072, 5120, 160, 128), (64, 64, 8, 32), (5120, 1536, 160, 128),
                                   (256, 512, 1, 64)])
def test_tile_regimes_match_choose_tile(shape):
    N, K, E, G = shape
    choose = lambda R: gemm_tiles.choose_tile(R, N, K, E, G)  # noqa: E731
    regimes = gemm_lowering.tile_regimes(choose)
    assert regimes[-1][0] == gemm_lowering.R_LIMIT
    assert len(regimes) <= gemm_lowering.MAX_REGIMES
    start = 1
    for last, tile in regimes:
        for R in {start, (start + last) // 2, last, min(last, start + 1)}:
            assert choose(R) == tile, (R, tile)
        start = last + 1


def _marker_launch(a, a_scale, w, w_scale, w_chan_scale, offsets, group_size, tile):
    """Stand-in for the Triton launch: the reference GEMM of each row, with column 0 replaced by
    the tile's block_m (so the test sees which regime ran); pure torch, traceable on CPU."""
    q = formats.decode_gemm_layout(w).float()
    s = formats.expand_group_scales(formats.effective_group_scales(w_scale, w_chan_scale), group_size)
    rows = torch.arange(a.shape[0], device=a.device)
    e = (torch.searchsorted(offsets, rows, right=True) - 1).clamp(0, w.shape[0] - 1)
    out = torch.einsum("rk,rnk->rn", a.float() * a_scale, (q * s)[e])
    out[:, 0] = float(tile.block_m)
    return out.to(torch.bfloat16)


def test_traced_gemm_dispatches_tile_regimes_without_recompiles():
    E, k = 8, 2
    moe = make_moe(num_experts=E, top_k=k)
    seen = {}
    options = {"w4a8.inline_devices": ("cpu",), "w4a8.gemm_launch": _marker_launch}
    recorder = RecordingBackend(options=options)
    captured = {}

    def gemm_only(a, a_scale, offsets):
        # R = 2 * T rows: a size expression, as in the block (T * top_k), not a bare symbol
        a = a.view(torch.uint8).repeat(2, 1).view(a.dtype)
        a_scale = a_scale.repeat(2, 1)
        return torch.ops.w4a8.grouped_gemm(a, a_scale, moe.w13_weight, moe.w13_group_scale, None, offsets, 32)

    compiled = torch.compile(gemm_only, backend=recorder, fullgraph=True)
    K = SMALL["hidden_size"]
    for T in (2, 8, 63, 64, 65, 128, 129, 256, 257, 500, 1):
        R = 2 * T
        x = (torch.randn(T, K) * 2).to(torch.bfloat16)
        a, a_scale = formats.quantize_fp8_per_token(x)
        offsets = torch.linspace(0, R, E + 1).round().long()
        mark_tokens(a, a_scale)
        if T == 2:
            out, codes = run_and_get_code(compiled, a, a_scale, offsets)
            captured["code"] = "\n".join(codes)
        else:
            out = compiled(a, a_scale, offsets)
        tile = gemm_tiles.choose_tile(R, moe.w13_weight.shape[1], K, E, 32)
        seen[R] = tile.block_m
        a2, s2 = a.view(torch.uint8).repeat(2, 1).view(a.dtype), a_scale.repeat(2, 1)
        ref = _marker_launch(a2, s2, moe.w13_weight, moe.w13_group_scale, None, offsets, 32, tile)
        assert torch.all(out[:, 0] == tile.block_m), f"R={R}: ran {out[:, 0].unique()}, eager picks {tile}"
        assert rel_error(out[:, 1:], ref[:, 1:]) < 1e-2, f"R={R}: wrong rows"
    assert len(set(seen.values())) >= 3, seen  # several regimes were exercised
    assert unique_graphs() <= 2
    assert graph_breaks() == 0
    # one compiled graph holds the regimes as host-side branches on the row count
    assert re.search(r"if 2\*s\d+ <= \d+", captured["code"]), captured["code"][:3000]
    assert "torch.ops.w4a8.grouped_gemm.default(" not in captured["code"]


def _reference_launch(a, a_scale, w, w_scale, w_chan_scale, offsets, group_size, tile):
    q = formats.decode_gemm_layout(w).float()
    s = formats.expand_group_scales(formats.effective_group_scales(w_scale, w_chan_scale), group_size)
    rows = torch.arange(a.shape[0], device=a.device)
    e = (torch.searchsorted(offsets, rows, right=True) - 1).clamp(0, w.shape[0] - 1)
    return torch.einsum("rk,rnk->rn", a.float() * a_scale, (q * s)[e]).to(torch.bfloat16)


@pytest.mark.parametrize("scale_mode", ["exact", "fp8"])
def test_traced_gemm_in_the_block(scale_mode):
    """The whole block with the GEMM traced (stand-in launch on CPU): R = T * top_k is a size
    expression inside the conds, the channel scales ride along in fp8 mode; one graph (T = 1
    aside), and the result matches eager."""
    moe = make_moe(scale_mode=scale_mode)
    options = {"w4a8.inline_devices": ("cpu",), "w4a8.gemm_launch": _reference_launch}
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options=options)
    for T in (6, 1, 100, 700):
        x, logits = mark_tokens(*make_inputs(T, moe))
        out = compiled(x, logits)
        assert rel_error(out, moe(x, logits)) < 1e-2, T
    assert unique_graphs() <= 2 and graph_breaks() == 0


# ============================================================================================
# CUDA
# ============================================================================================
cuda = pytest.mark.cuda


def assert_compiled_matches_eager(compiled, moe, token_counts):
    """Every token count through one compile (<= 2 graphs: T = 1 specializes), no graph break,
    each output within 2e-2 of eager."""
    for T in token_counts:
        x, logits = mark_tokens(*make_inputs(T, moe))
        out, ref = compiled(x, logits), moe(x, logits)
        assert rel_error(out, ref) < 2e-2, f"T={T}: {rel_error(out, ref)}"
    assert graph_breaks() == 0
    assert unique_graphs() <= 2


@cuda
@pytest.mark.parametrize("gemm", ["triton", "extern"])
@pytest.mark.parametrize("fuse", ["default", "combine"])
def test_cuda_compiled_matches_eager(gemm, fuse):
    moe = make_moe(device="cuda")
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True,
                             options={"w4a8.grouped_gemm": gemm, "w4a8.fuse": fuse})
    assert_compiled_matches_eager(compiled, moe, TOKEN_COUNTS)


@cuda
def test_cuda_generated_code_holds_our_kernel():
    moe = make_moe(device="cuda")
    x, logits = mark_tokens(*make_inputs(300, moe))
    _, codes = run_and_get_code(torch.compile(moe, backend="w4a8", fullgraph=True), x, logits)
    code = "\n".join(codes)
    assert "w4a8_grouped_gemm_kernel" in code          # the Triton kernel, traced into the code
    assert "def w4a8_grouped_gemm_kernel" in code       # ... with its source
    assert "torch.ops.w4a8.grouped_gemm.default(" not in code  # no extern fallback for it
    assert re.search(r"if (\d+\*)?s\d+ <= \d+", code)  # tile regimes as host-side branches
    # the block's other ops stay our kernels, called from the generated code (none is fused by
    # default), and the ops the block no longer calls (the two-op forms of the fusions) are absent
    block_ops = {"select_and_sort_experts", "quantize_scatter_fp8", "silu_mul_quantize_fp8", "combine"}
    assert extern_w4a8_calls(code) == sorted(block_ops - set(DEFAULT_FUSED))
    _, codes = run_and_get_code(torch.compile(moe, backend="w4a8", fullgraph=True,
                                              options={"w4a8.grouped_gemm": "extern"}), x, logits)
    assert "torch.ops.w4a8.grouped_gemm.default(" in "\n".join(codes)


@cuda
def test_cuda_max_autotune_tunes_the_traced_kernel():
    moe = make_moe(device="cuda")
    compiled = torch.compile(moe, backend="w4a8", mode="max-autotune-no-cudagraphs", fullgraph=True)
    x, logits = mark_tokens(*make_inputs(300, moe))
    out, codes = run_and_get_code(compiled, x, logits)
    code = "\n".join(codes)
    assert "w4a8_grouped_gemm_kernel" in code and "torch.ops.w4a8.grouped_gemm.default(" not in code
    # the regime kernels are user kernels with several configs for Inductor to benchmark
    config_lists = re.findall(r"configs=(\[.*?\]),\n", code)
    assert any(c.count("num_warps") >= 2 for c in config_lists), config_lists
    assert rel_error(out, moe(x, logits)) < 2e-2
    for T in (1, 7, 2000):
        x, logits = mark_tokens(*make_inputs(T, moe))
        assert rel_error(compiled(x, logits), moe(x, logits)) < 2e-2


@cuda
@pytest.mark.slow
def test_cuda_glm46_layer_compiled_matches_eager():
    moe = make_moe(GLM, device="cuda")
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True)
    assert_compiled_matches_eager(compiled, moe, (1, 512, 513, 4096, 8191, 8192))


def test_dynamo_restart_passes_through_the_backend(monkeypatch):
    """Dynamo restarts its analysis by raising through the backend (e.g. when it tensorifies a
    float scalar); the backend must not take that for a failed GEMM trace and fall back to the
    opaque op (seen on the H200: the block's compiled code lost its traced GEMM that way)."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    import inductor_w4a8.backend as backend
    calls = []

    def compile_fx():
        def compile(gm, example_inputs, config_patches=None):
            calls.append(config_patches)
            raise TensorifyScalarRestartAnalysis()
        return compile
    monkeypatch.setattr(backend._compat, "compile_fx", compile_fx)
    graph = torch.fx.Graph()      # a graph that calls the GEMM, on a device it is traced for
    a = graph.placeholder("a")
    graph.output(graph.call_function(torch.ops.w4a8.grouped_gemm.default, (a,)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    example = [torch.ones(2, device="meta")]
    options = {"w4a8.inline_devices": ("meta",)}
    assert backend._calls_gemm(gm) and backend._on_devices(example, ("meta",))
    with pytest.raises(TensorifyScalarRestartAnalysis):
        backend.w4a8_backend(gm, example, options=options)
    assert len(calls) == 1      # raised at once: no second, extern compile
    calls.clear()

    def failing_fx():            # the same graph, a real failure: the extern retry does run
        def compile(gm, example_inputs, config_patches=None):
            calls.append(config_patches)
            raise RuntimeError("stand-in for an Inductor failure on the traced GEMM")
        return compile
    monkeypatch.setattr(backend._compat, "compile_fx", failing_fx)
    with pytest.raises(RuntimeError, match="stand-in"):
        backend.w4a8_backend(gm, example, options=options)
    assert len(calls) == 2
