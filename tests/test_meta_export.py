"""Shape tracing without data: W4A8MoE at GLM-4.6 size on `meta` (built, post-processed, run at
8192 tokens) and torch.export.export of the block with a dynamic token Dim (max 8192)."""
from __future__ import annotations

import expecttest
import pytest
import torch
from torch.export import Dim, export

import inductor_w4a8 as w4a8
from inductor_w4a8 import formats

from compile_utils import GLM, SMALL, make_inputs, make_moe

MAX_TOKENS = 8192


def glm_on_meta(**overrides) -> w4a8.W4A8MoE:
    moe = w4a8.W4A8MoE(**{**GLM, **overrides}, device="meta")
    moe.process_weights_after_loading()
    return moe


def meta_inputs(T: int, moe: w4a8.W4A8MoE):
    return (torch.empty(T, moe.hidden_size, dtype=torch.bfloat16, device="meta"),
            torch.empty(T, moe.num_experts, dtype=torch.float32, device="meta"))


def describe_parameters(moe) -> str:
    return "\n".join(f"{n}: {str(p.dtype).replace('torch.', '')} {list(p.shape)} {p.device.type}"
                     for n, p in moe.named_parameters())


def w4a8_calls(graph_module) -> list[str]:
    return [str(n.target).replace("torch.ops.", "") for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("w4a8.")]


class TestMeta(expecttest.TestCase):
    def test_glm46_built_processed_and_run_on_meta(self):
        moe = glm_on_meta()
        self.assertExpectedInline(describe_parameters(moe), """\
e_score_correction_bias: float32 [160] meta
w13_weight: int32 [160, 3072, 640] meta
w13_weight_strides: int64 [160, 3] meta
w13_group_scale: bfloat16 [160, 3072, 40] meta
w2_weight: int32 [160, 5120, 192] meta
w2_weight_strides: int64 [160, 3] meta
w2_group_scale: bfloat16 [160, 5120, 12] meta""")
        for T in (1, 513, MAX_TOKENS - 1, MAX_TOKENS):
            out = moe(*meta_inputs(T, moe))
            self.assertEqual((tuple(out.shape), out.dtype, out.device.type),
                             ((T, 5120), torch.bfloat16, "meta"))

    def test_glm46_fp8_scale_mode_on_meta(self):
        moe = glm_on_meta(scale_mode="fp8")
        shapes = {n: (p.dtype, tuple(p.shape)) for n, p in moe.named_parameters()}
        self.assertEqual(shapes["w13_group_scale"], (formats.FP8_DTYPE, (160, 3072, 40)))
        self.assertEqual(shapes["w13_chan_scale"], (torch.float32, (160, 3072, 1)))
        self.assertEqual(shapes["w2_chan_scale"], (torch.float32, (160, 5120, 1)))
        out = moe(*meta_inputs(MAX_TOKENS, moe))
        self.assertEqual(tuple(out.shape), (MAX_TOKENS, 5120))

    def test_meta_refuses_bad_shapes_before_running(self):
        moe = glm_on_meta()
        x, logits = meta_inputs(16, moe)
        with self.assertRaises(w4a8.W4A8InputError):
            moe(x[:, :5000], logits)
        with self.assertRaises(w4a8.W4A8InputError):
            moe(x, logits[:8])

    def test_export_with_an_unbounded_token_dim(self):
        """No op check constrains T: the int32 limit on T * top_k pairs is checked on real sizes
        only (a guard on a symbolic T would cap the exported range)."""
        moe = glm_on_meta()
        T = Dim("T")
        ep = export(moe, meta_inputs(64, moe),
                    dynamic_shapes={"hidden_states": {0: T}, "router_logits": {0: T}})
        (r,) = ep.range_constraints.values()
        self.assertGreater(r.upper, 2**31)

    def test_export_glm46_with_dynamic_token_dim(self):
        moe = glm_on_meta()
        T = Dim("T", min=1, max=MAX_TOKENS)
        ep = export(moe, meta_inputs(64, moe),
                    dynamic_shapes={"hidden_states": {0: T}, "router_logits": {0: T}})
        self.assertExpectedInline("\n".join(w4a8_calls(ep.graph_module)), """\
w4a8.select_and_sort_experts.default
w4a8.quantize_scatter_fp8.default
w4a8.grouped_gemm.default
w4a8.silu_mul_quantize_fp8.default
w4a8.grouped_gemm.default
w4a8.combine.default""")
        ranges = [(int(r.lower), int(r.upper)) for r in ep.range_constraints.values()]
        self.assertEqual(ranges, [(1, MAX_TOKENS)])
        out = ep.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"]
        self.assertEqual(str(out.shape[0]), str(next(iter(ep.range_constraints))))


@pytest.mark.parametrize("T", [1, 7, 300])
def test_exported_small_block_runs_and_matches_eager(T):
    moe = make_moe(SMALL)
    Tdim = Dim("T", min=1, max=MAX_TOKENS)
    ep = export(moe, make_inputs(64, moe), dynamic_shapes={"hidden_states": {0: Tdim}, "router_logits": {0: Tdim}})
    x, logits = make_inputs(T, moe)
    assert torch.equal(ep.module()(x, logits), moe(x, logits))


def test_exported_program_compiles_with_the_backend():
    moe = make_moe(SMALL)
    Tdim = Dim("T", min=1, max=MAX_TOKENS)
    ep = export(moe, make_inputs(64, moe), dynamic_shapes={"hidden_states": {0: Tdim}, "router_logits": {0: Tdim}})
    torch._dynamo.reset()
    compiled = torch.compile(ep.module(), backend="w4a8", fullgraph=True)
    for T in (3, 200):
        x, logits = make_inputs(T, moe)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(logits, 0)
        assert torch.equal(compiled(x, logits), moe(x, logits))
    torch._dynamo.reset()
