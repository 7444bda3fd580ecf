"""The MoE path ops: select_experts, sort_by_expert, select_and_sort_experts, quantize_scatter_fp8,
gather_rows_fp8, silu_mul_quantize_fp8, combine.

- CPU: opcheck of every op, the CPU kernels vs reference / a direct computation, bad inputs
  refused before anything runs, T = 0, E = 7 and E = 60, empty experts.
- Triton launchers on CPU tensors under TRITON_INTERPRET=1 (tests named `test_interp_*`): Triton
  decides interpreted vs compiled when a kernel is decorated, so when the suite runs without the
  variable, `test_triton_launchers_under_interpreter` re-runs them in a child process that has it.
- CUDA (`-m cuda`): the ops vs the CPU kernels at T in {1, 511, 512, 513, 8191, 8192}, bit exact
  for sort / gather / combine, outputs poisoned before every run.
"""
import os

import pytest
import torch

from inductor_w4a8 import W4A8InputError, formats, reference, value_checks
from inductor_w4a8.testing import assert_valid_routing, opcheck, poisoned_empty
from inductor_w4a8.testing import run_interpreted

ops = torch.ops.w4a8
FP8 = formats.FP8_DTYPE
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BOUNDARY_T = (1, 511, 512, 513, 8191, 8192)

# (E, top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor, with_bias)
ROUTINGS = [
    (7, 2, "softmax", True, 0, 0, 1.0, False),
    (60, 4, "softmax", False, 0, 0, 1.0, False),
    (60, 6, "sigmoid", True, 4, 2, 2.5, True),      # DeepSeek-V3 / GLM style, E not a power of 2
    (160, 8, "sigmoid", True, 8, 4, 2.5, True),     # GLM-4.6 shape (one group of 20 per node)
    (12, 3, "sigmoid", False, 6, 3, 1.0, False),    # grouped without a bias: group max
    (12, 3, "softmax", True, 4, 4, 1.0, False),     # topk_group == n_group: no grouping
    (1, 1, "softmax", True, 0, 0, 1.0, False),
]
ROUTING_IDS = [f"E{r[0]}-k{r[1]}-{r[2]}{'-g' if r[4] else ''}{'-bias' if r[7] else ''}" for r in ROUTINGS]


def u8(t):
    return t.view(torch.uint8)


def routing_args(T, routing, device="cpu", dtype=torch.float32):
    E, k, scoring, renorm, ng, tg, rsf, with_bias = routing
    logits = torch.randn(T, E, dtype=torch.float32).to(dtype).to(device)
    bias = (torch.randn(E) * 0.1).to(device) if with_bias else None
    return (logits, bias, k, scoring, renorm, ng, tg, rsf)


def random_ids(T, k, E, *, empty=(), device="cpu"):
    """[T, k] int32 expert ids, never using experts in `empty`; distinct within a row when there
    are k experts to choose from (as routing gives), repeated otherwise (the sort allows it)."""
    allowed = torch.tensor([e for e in range(E) if e not in set(empty)])
    if k > len(allowed):
        ids = allowed[torch.randint(0, len(allowed), (T, k))]
    else:
        ids = torch.rand(T, len(allowed)).argsort(dim=1)[:, :k]
        ids = allowed[ids]
    return ids.to(torch.int32).to(device)


def quantized_tokens(T, K, device="cpu"):
    return formats.quantize_fp8_per_token((torch.randn(T, K) * 2).to(torch.bfloat16).to(device))


def tokens_and_f2s(T, K, k, device="cpu"):
    """bf16 tokens [T, K] (row 0 all zero when T) and a random permutation as flat_to_sorted [T, k]."""
    x = (torch.randn(T, K) * 2).to(torch.bfloat16)
    if T:
        x[0] = 0  # an all-zero token takes the minimum scale
    f2s = torch.randperm(T * k).to(torch.int32).view(T, k)
    return x.to(device), f2s.to(device)


def gathered_quantized(x, f2s):
    """The two-op form of quantize_scatter_fp8: quantize, then gather by the inverse permutation."""
    T, k = f2s.shape
    sorted_rows = torch.empty(T * k, dtype=torch.int32)
    sorted_rows[f2s.reshape(-1).long()] = torch.arange(T * k, dtype=torch.int32)
    xq, xs = formats.quantize_fp8_per_token(x)
    return reference.gather_rows_fp8(xq, xs, sorted_rows, k)


def assert_routed_and_sorted(outs, args):
    """outs of select_and_sort_experts: a valid routing of args, and its ids sorted exactly as
    sort_by_expert sorts them."""
    weights, ids, *sort = outs
    assert_valid_routing(weights, ids, *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    for got, want in zip(sort, reference.sort_by_expert(ids.cpu(), args[0].shape[1])):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want)


def sort_inputs(T, k, E):
    ids = random_ids(T, k, E, empty=(1, E - 2) if E > 4 else ())
    return ids


# ==========================================================================================
# opcheck
# ==========================================================================================
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("T", [0, 5])
def test_opcheck_select_experts(routing, T, seed):
    opcheck(ops.select_experts, routing_args(T, routing))


@pytest.mark.parametrize("routing", ROUTINGS[:4], ids=ROUTING_IDS[:4])
@pytest.mark.parametrize("T", [0, 1, 5])
def test_opcheck_select_and_sort_experts(routing, T, seed):
    opcheck(ops.select_and_sort_experts, routing_args(T, routing))


@pytest.mark.parametrize("T,k,E", [(0, 2, 7), (1, 8, 60), (9, 3, 7), (33, 2, 60)])
def test_opcheck_sort_by_expert(T, k, E, seed):
    opcheck(ops.sort_by_expert, (random_ids(T, k, E), E))


@pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (7, 96, 3)])
def test_opcheck_gather_rows_fp8(T, K, k, seed):
    xq, xs = quantized_tokens(T, K)
    opcheck(ops.gather_rows_fp8, (xq, xs, torch.randperm(T * k).to(torch.int32), k))


@pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (7, 96, 3)])
def test_opcheck_quantize_scatter_fp8(T, K, k, seed):
    opcheck(ops.quantize_scatter_fp8, tokens_and_f2s(T, K, k))


@pytest.mark.parametrize("R,I", [(0, 64), (1, 64), (9, 96)])
def test_opcheck_silu_mul_quantize_fp8(R, I, seed):
    opcheck(ops.silu_mul_quantize_fp8, ((torch.randn(R, 2 * I) * 3).to(torch.bfloat16),))


@pytest.mark.parametrize("T,k,H", [(0, 2, 64), (1, 8, 64), (7, 3, 96)])
def test_opcheck_combine(T, k, H, seed):
    y = torch.randn(T * k, H).to(torch.bfloat16)
    opcheck(ops.combine, (y, torch.randperm(T * k).to(torch.int32).view(T, k), torch.rand(T, k)))


# ==========================================================================================
# CPU kernels
# ==========================================================================================
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_select_experts(routing, dtype, seed):
    args = routing_args(64, routing, dtype=dtype)
    w, ids = ops.select_experts(*args)
    assert_valid_routing(w, ids, *args)
    ref_w, ref_ids = reference.select_experts(*args)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)


@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
@pytest.mark.parametrize("T", [0, 1, 64])
def test_cpu_select_and_sort_experts_is_select_then_sort(routing, T, seed):
    args = routing_args(T, routing)
    weights, ids, *sort = ops.select_and_sort_experts(*args)
    ref_w, ref_ids = ops.select_experts(*args)
    assert torch.equal(weights, ref_w) and torch.equal(ids, ref_ids)
    for got, want in zip(sort, ops.sort_by_expert(ref_ids, routing[0])):
        assert torch.equal(got, want)


def test_select_experts_bias_steers_choice_not_weights():
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])
    w, ids = ops.select_experts(logits, bias, 2, "sigmoid", False, 0, 0, 1.0)
    assert sorted(ids[0].tolist()) == [0, 3]
    assert torch.allclose(w[0].sort().values, torch.sigmoid(torch.tensor([0.0, 0.3])))


@pytest.mark.parametrize("T,k,E", [(0, 8, 7), (1, 8, 60), (5, 3, 7), (100, 8, 60), (64, 2, 1),
                                   (300, 6, 5)])
def test_cpu_sort_by_expert(T, k, E, seed):
    ids = sort_inputs(T, k, E)
    sorted_rows, flat_to_sorted, offsets = ops.sort_by_expert(ids, E)
    flat = ids.reshape(-1).long()
    assert offsets.dtype == torch.int64 and offsets.shape == (E + 1,)
    assert offsets[0] == 0 and offsets[-1] == T * k
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(offsets.diff(), counts)
    # rows grouped by expert, ascending flat index within an expert (stable)
    assert torch.equal(flat[sorted_rows.long()], flat.sort(stable=True).values)
    for e in range(E):
        rows = sorted_rows[offsets[e]:offsets[e + 1]]
        assert bool((rows.diff() > 0).all())
    assert torch.equal(flat_to_sorted.reshape(-1)[sorted_rows.long()], torch.arange(T * k, dtype=torch.int32))


@pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (13, 36, 3), (40, 1032, 4)])
def test_cpu_gather_rows_fp8(T, K, k, seed):
    xq, xs = quantized_tokens(T, K)
    rows = torch.randperm(T * k).to(torch.int32)
    a, a_scale = ops.gather_rows_fp8(xq, xs, rows, k)
    tokens = rows.long() // k
    assert torch.equal(u8(a), u8(xq)[tokens]) and torch.equal(a_scale, xs[tokens])


@pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (13, 36, 3), (40, 1032, 4), (5, 0, 2)])
def test_cpu_quantize_scatter_fp8(T, K, k, seed):
    x, f2s = tokens_and_f2s(T, K, k)
    a, a_scale = ops.quantize_scatter_fp8(x, f2s)
    ref_a, ref_s = gathered_quantized(x, f2s)
    assert a.shape == (T * k, K) and a_scale.shape == (T * k, 1)
    assert torch.equal(u8(a), u8(ref_a)) and torch.equal(a_scale, ref_s)
    if T:  # each token's k rows are the same row
        assert torch.equal(u8(a)[f2s[:, 0].long()], u8(a)[f2s[:, -1].long()])
        assert a_scale[f2s[0, 0]] == formats.FP8_MIN_SCALE


def test_quantize_scatter_value_check_refuses_a_non_permutation():
    x, f2s = tokens_and_f2s(4, 32, 2)
    f2s[1, 1] = f2s[0, 0]  # row written twice, another never
    ops.quantize_scatter_fp8(x, f2s)  # default: no device read, positions clamped
    with value_checks(True), pytest.raises(W4A8InputError, match="permutation of \\[0, T \\* top_k\\)"):
        ops.quantize_scatter_fp8(x, f2s)


@pytest.mark.parametrize("R,I", [(0, 64), (1, 64), (17, 200), (4, 1536)])
def test_cpu_silu_mul_quantize_fp8(R, I, seed):
    x = (torch.randn(R, 2 * I) * 3).to(torch.bfloat16)
    if R:
        x[0] = 0  # an all-zero row takes the minimum scale
    q, s = ops.silu_mul_quantize_fp8(x)
    v = torch.nn.functional.silu(x[:, :I].float()) * x[:, I:].float()
    expect_s = formats.fp8_row_scale(v.abs().amax(dim=1, keepdim=True)) if R else s
    assert torch.equal(s, expect_s)
    if R:
        assert s[0, 0] == formats.FP8_MIN_SCALE
        # e4m3: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 for subnormals
        torch.testing.assert_close(q.float() * s, v, rtol=2**-4, atol=s.max().item() * 2**-10)


@pytest.mark.parametrize("T,k,H", [(0, 2, 64), (1, 8, 64), (13, 3, 36), (40, 8, 1030)])
def test_cpu_combine(T, k, H, seed):
    y = torch.randn(T * k, H).to(torch.bfloat16)
    f2s = torch.randperm(T * k).to(torch.int32).view(T, k)
    w = torch.rand(T, k)
    out = ops.combine(y, f2s, w)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    expect = sum(w[:, j:j + 1].double() * y[f2s[:, j].long()].double() for j in range(k)) if T \
        else torch.zeros(0, H)
    torch.testing.assert_close(out.double(), expect.double(), rtol=2**-8, atol=0)


def test_meta_shapes():
    m = "meta"
    w, ids = ops.select_experts(torch.empty(5, 60, device=m), torch.empty(60, device=m), 6, "sigmoid",
                                True, 4, 2, 1.0)
    assert w.shape == (5, 6) and ids.shape == (5, 6) and ids.dtype == torch.int32
    outs = ops.select_and_sort_experts(torch.empty(5, 60, device=m), torch.empty(60, device=m), 6,
                                       "sigmoid", True, 4, 2, 1.0)
    assert [tuple(o.shape) for o in outs] == [(5, 6), (5, 6), (30,), (5, 6), (61,)]
    assert [o.dtype for o in outs] == [torch.float32, torch.int32, torch.int32, torch.int32, torch.int64]
    rows, f2s, off = ops.sort_by_expert(torch.empty(5, 6, dtype=torch.int32, device=m), 60)
    assert rows.shape == (30,) and f2s.shape == (5, 6) and off.shape == (61,) and off.dtype == torch.int64
    a, s = ops.gather_rows_fp8(torch.empty(5, 64, dtype=FP8, device=m), torch.empty(5, 1, device=m),
                               rows, 6)
    assert a.shape == (30, 64) and a.dtype == FP8 and s.shape == (30, 1)
    a, s = ops.quantize_scatter_fp8(torch.empty(5, 64, dtype=torch.bfloat16, device=m), f2s)
    assert a.shape == (30, 64) and a.dtype == FP8 and s.shape == (30, 1) and s.dtype == torch.float32
    q, s = ops.silu_mul_quantize_fp8(torch.empty(30, 128, dtype=torch.bfloat16, device=m))
    assert q.shape == (30, 64) and q.dtype == FP8 and s.shape == (30, 1)
    out = ops.combine(torch.empty(30, 64, dtype=torch.bfloat16, device=m), f2s, w)
    assert out.shape == (5, 64) and out.dtype == torch.bfloat16


# ==========================================================================================
# Bad inputs: clear errors before anything runs
# ==========================================================================================
def _logits(T=4, E=8):
    return torch.randn(T, E)


BAD_CALLS = {
    "select: int logits": (lambda: ops.select_experts(torch.zeros(4, 8, dtype=torch.int32), None, 2,
                                                      "softmax", True, 0, 0, 1.0), "dtype"),
    "select: rank 3": (lambda: ops.select_experts(torch.randn(2, 4, 8), None, 2, "softmax", True, 0, 0,
                                                  1.0), "rank"),
    "select: top_k > E": (lambda: ops.select_experts(_logits(), None, 9, "softmax", True, 0, 0, 1.0),
                          "top_k"),
    "select: top_k = 0": (lambda: ops.select_experts(_logits(), None, 0, "softmax", True, 0, 0, 1.0),
                          "top_k"),
    "select: scoring": (lambda: ops.select_experts(_logits(), None, 2, "relu", True, 0, 0, 1.0),
                        "scoring"),
    "select: bias shape": (lambda: ops.select_experts(_logits(), torch.zeros(7), 2, "sigmoid", True, 0, 0,
                                                      1.0), "correction_bias"),
    "select: n_group": (lambda: ops.select_experts(_logits(), None, 2, "sigmoid", True, 3, 1, 1.0),
                        "n_group"),
    "select: topk_group": (lambda: ops.select_experts(_logits(), None, 2, "sigmoid", True, 4, 5, 1.0),
                           "topk_group"),
    "select: k beyond groups": (lambda: ops.select_experts(_logits(), None, 3, "sigmoid", True, 4, 1, 1.0),
                                "exceeds"),
    "route+sort: top_k > E": (lambda: ops.select_and_sort_experts(_logits(), None, 9, "softmax", True, 0, 0,
                                                                  1.0), "select_and_sort_experts: top_k=9"),
    "route+sort: n_group": (lambda: ops.select_and_sort_experts(_logits(), None, 2, "sigmoid", True, 3, 1,
                                                                1.0), "select_and_sort_experts: E=8 is not a multiple"),
    "route+sort: int logits": (lambda: ops.select_and_sort_experts(torch.zeros(4, 8, dtype=torch.int32), None,
                                                                   2, "softmax", True, 0, 0, 1.0), "dtype"),
    "sort: int64 ids": (lambda: ops.sort_by_expert(torch.zeros(4, 2, dtype=torch.int64), 8), "dtype"),
    "sort: rank 1": (lambda: ops.sort_by_expert(torch.zeros(8, dtype=torch.int32), 8), "rank"),
    "sort: no experts": (lambda: ops.sort_by_expert(torch.zeros(4, 2, dtype=torch.int32), 0),
                         "num_experts"),
    "sort: id too big": (lambda: ops.sort_by_expert(torch.full((4, 2), 8, dtype=torch.int32), 8),
                         "outside"),
    "sort: negative id": (lambda: ops.sort_by_expert(torch.full((4, 2), -1, dtype=torch.int32), 8),
                          "outside"),
    "sort: not contiguous": (lambda: ops.sort_by_expert(torch.zeros(2, 4, dtype=torch.int32).t(), 8),
                             "contiguous"),
    "gather: bf16 tokens": (lambda: ops.gather_rows_fp8(torch.zeros(4, 64, dtype=torch.bfloat16),
                                                        torch.ones(4, 1), torch.zeros(8, dtype=torch.int32),
                                                        2), "dtype"),
    "gather: scale shape": (lambda: ops.gather_rows_fp8(torch.zeros(4, 64, dtype=FP8), torch.ones(4),
                                                        torch.zeros(8, dtype=torch.int32), 2), "x_scale"),
    "gather: rows != T*k": (lambda: ops.gather_rows_fp8(torch.zeros(4, 64, dtype=FP8), torch.ones(4, 1),
                                                        torch.zeros(7, dtype=torch.int32), 2), "sorted_rows"),
    "gather: int64 rows": (lambda: ops.gather_rows_fp8(torch.zeros(4, 64, dtype=FP8), torch.ones(4, 1),
                                                       torch.zeros(8, dtype=torch.int64), 2), "dtype"),
    "scatter: fp32 tokens": (lambda: ops.quantize_scatter_fp8(torch.zeros(4, 64), torch.zeros(4, 2, dtype=torch.int32)),
                             "x must have dtype"),
    "scatter: int64 positions": (lambda: ops.quantize_scatter_fp8(torch.zeros(4, 64, dtype=torch.bfloat16),
                                                                  torch.zeros(4, 2, dtype=torch.int64)),
                                 "flat_to_sorted must have dtype"),
    "scatter: T mismatch": (lambda: ops.quantize_scatter_fp8(torch.zeros(4, 64, dtype=torch.bfloat16),
                                                             torch.zeros(3, 2, dtype=torch.int32)), "3 rows"),
    "scatter: rank 1": (lambda: ops.quantize_scatter_fp8(torch.zeros(4, 64, dtype=torch.bfloat16),
                                                         torch.zeros(8, dtype=torch.int32)), "rank"),
    "scatter: no slots": (lambda: ops.quantize_scatter_fp8(torch.zeros(4, 64, dtype=torch.bfloat16),
                                                           torch.zeros(4, 0, dtype=torch.int32)), "top_k >= 1"),
    "scatter: strided x": (lambda: ops.quantize_scatter_fp8(torch.zeros(64, 4, dtype=torch.bfloat16).t(),
                                                            torch.zeros(4, 2, dtype=torch.int32)), "contiguous"),
    "silu: odd width": (lambda: ops.silu_mul_quantize_fp8(torch.zeros(4, 63, dtype=torch.bfloat16)),
                        "even"),
    "silu: fp32": (lambda: ops.silu_mul_quantize_fp8(torch.zeros(4, 64)), "dtype"),
    "silu: not contiguous": (lambda: ops.silu_mul_quantize_fp8(
        torch.zeros(64, 4, dtype=torch.bfloat16).t()), "contiguous"),
    "combine: rows != T*k": (lambda: ops.combine(torch.zeros(7, 16, dtype=torch.bfloat16),
                                                 torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2)),
                             "T \\* top_k"),
    "combine: weights shape": (lambda: ops.combine(torch.zeros(8, 16, dtype=torch.bfloat16),
                                                   torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 3)),
                               "topk_weights"),
    "combine: fp32 y": (lambda: ops.combine(torch.zeros(8, 16), torch.zeros(4, 2, dtype=torch.int32),
                                            torch.ones(4, 2)), "dtype"),
    "combine: int64 index": (lambda: ops.combine(torch.zeros(8, 16, dtype=torch.bfloat16),
                                                 torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)),
                             "dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_refused(case):
    """Every bad call is refused; the id-range cases read device values, so they need the
    value-check debug switch (off by default: tests/test_checks.py)."""
    call, match = BAD_CALLS[case]
    with pytest.raises(W4A8InputError, match=match), value_checks(True):
        call()


def test_bad_inputs_refused_on_meta_too():
    # shape and dtype checks run in the fake kernels as well (torch.compile tracing sees them)
    with pytest.raises(W4A8InputError, match="even"):
        ops.silu_mul_quantize_fp8(torch.empty(4, 63, dtype=torch.bfloat16, device="meta"))
    with pytest.raises(W4A8InputError, match="T \\* top_k"):
        ops.combine(torch.empty(7, 16, dtype=torch.bfloat16, device="meta"),
                    torch.empty(4, 2, dtype=torch.int32, device="meta"), torch.empty(4, 2, device="meta"))


def assert_fp8_close(q, s, ref_q, ref_s, *, max_flip_fraction=1e-3):
    """Scales equal to an ulp and fp8 codes equal but for rare 1-code flips (exp rounding)."""
    assert q.dtype == FP8 and s.dtype == torch.float32 and q.shape == ref_q.shape
    torch.testing.assert_close(s, ref_s, rtol=5e-7, atol=0)  # amax through exp: a few ulps
    diff = (u8(q).int() - u8(ref_q).int()).abs()
    if diff.numel():
        assert int(diff.max()) <= 1
        assert float((diff != 0).float().mean()) <= max_flip_fraction


# ==========================================================================================
# Triton launchers under TRITON_INTERPRET=1 (CPU tensors)
# ==========================================================================================
if not INTERPRETED:
    def test_triton_launchers_under_interpreter():
        pytest.importorskip("triton")
        run_interpreted(__file__, select="test_interp_")

else:  # TRITON_INTERPRET=1: the launchers on CPU tensors
    def _launch(name):
        import importlib
        return importlib.import_module(f"inductor_w4a8.launch.{name}")

    @pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
    @pytest.mark.parametrize("T", [0, 1, 19])
    def test_interp_select_experts(routing, T, seed):
        args = routing_args(T, routing)
        with poisoned_empty():
            w, ids = _launch("routing").select_experts(*args)
        assert_valid_routing(w, ids, *args)
        ref_w, ref_ids = reference.select_experts(*args)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
    @pytest.mark.parametrize("T", [0, 1, 19])
    def test_interp_select_and_sort_experts(routing, T, seed):
        """T = 1: routing and sort in one program (sort_one_token); else the two kernels."""
        args = routing_args(T, routing)
        with poisoned_empty():
            outs = _launch("routing").select_and_sort_experts(*args)
        assert_routed_and_sorted(outs, args)

    @pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
    def test_interp_nan_logits_give_distinct_ids_and_nan_weights(scoring):
        """NaN choices rank first (as torch.topk), ids stay distinct and in range, the one-token
        sort is the stable sort of them, and renormalized weights are NaN (not a tiny-sum blowup)."""
        for E, k, nan_at in ((7, 3, [2]), (160, 8, list(range(160))), (8, 4, [3, 5])):
            logits = torch.randn(1, E)
            logits[0, nan_at] = float("nan")
            with poisoned_empty():
                w, ids, *sort = _launch("routing").select_and_sort_experts(logits, None, k, scoring,
                                                                           True, 0, 0, 1.0)
            assert bool(((ids >= 0) & (ids < E)).all()) and len(set(ids[0].tolist())) == k
            if scoring == "sigmoid":   # (softmax: one NaN makes every score NaN, all tie)
                assert set(ids[0].tolist()[:min(k, len(nan_at))]) <= set(nan_at)
            assert bool(torch.isnan(w).all())
            for got, want in zip(sort, reference.sort_by_expert(ids, E)):
                assert torch.equal(got, want)

    @pytest.mark.parametrize("T", [1, 3])
    def test_interp_ties_go_to_the_lowest_id(T):
        """Equal choices: the lowest ids, in order (the reference's torch.topk does not promise
        an order among ties, so this is checked on its own)."""
        for E, k, scoring in ((8, 3, "softmax"), (160, 8, "sigmoid"), (5, 5, "softmax")):
            w, ids = _launch("routing").select_experts(torch.zeros(T, E), None, k, scoring, True,
                                                       0, 0, 1.0)
            assert torch.equal(ids, torch.arange(k, dtype=torch.int32).expand(T, k))
            torch.testing.assert_close(w, torch.full((T, k), 1.0 / k))

    def test_interp_select_experts_bf16_strided_logits(seed):
        routing = ROUTINGS[2]
        logits, *rest = routing_args(9, routing, dtype=torch.bfloat16)
        wide = torch.randn(9, 2 * logits.shape[1]).to(torch.bfloat16)
        wide[:, ::2] = logits
        w, ids = _launch("routing").select_experts(wide[:, ::2], *rest)
        assert_valid_routing(w, ids, logits, *rest)

    def test_interp_select_experts_nan_logits_stay_in_range():
        logits = torch.full((3, 7), float("nan"))
        _, ids = _launch("routing").select_experts(logits, None, 3, "softmax", True, 0, 0, 1.0)
        assert bool(((ids >= 0) & (ids < 7)).all())

    @pytest.mark.parametrize("T,k,E,chunk", [(0, 8, 7, None), (1, 8, 160, None), (5, 3, 7, None),
                                             (100, 8, 60, None), (100, 8, 60, 16), (37, 4, 7, 16),
                                             (300, 6, 5, 32), (64, 2, 1, 16)])
    def test_interp_sort_by_expert(T, k, E, chunk, seed):
        ids = sort_inputs(T, k, E)
        with poisoned_empty():
            got = _launch("moe_sort").sort_by_expert(ids, E, chunk=chunk)
        for g, r in zip(got, reference.sort_by_expert(ids, E)):
            assert g.dtype == r.dtype and torch.equal(g, r)

    def test_interp_sort_by_expert_many_chunk_tiles(monkeypatch, seed):
        mod = _launch("moe_sort")
        monkeypatch.setattr(mod, "SCAN_CHUNKS", 2)  # the scan loops over several chunk tiles
        ids = sort_inputs(90, 2, 7)
        got = mod.sort_by_expert(ids, 7, chunk=16)
        for g, r in zip(got, reference.sort_by_expert(ids, 7)):
            assert torch.equal(g, r)

    def test_interp_sort_by_expert_clamps_bad_ids():
        ids = torch.tensor([[3, -5], [100, 0], [2**31 - 1, -2**31]], dtype=torch.int32)
        for chunk in (None, 16):
            got = _launch("moe_sort").sort_by_expert(ids, 4, chunk=chunk)
            for g, r in zip(got, reference.sort_by_expert(ids, 4)):
                assert torch.equal(g, r)

    @pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (13, 36, 3), (7, 10, 2), (5, 0, 2),
                                       (40, 1032, 4)])
    def test_interp_gather_rows_fp8(T, K, k, seed):
        xq, xs = quantized_tokens(T, K)
        rows = torch.randperm(T * k).to(torch.int32)
        if T:
            rows[0], rows[-1] = -5, 10**6  # out of range: clamped, never out of bounds
        with poisoned_empty():
            a, a_scale = _launch("moe_gather").gather_rows_fp8(xq, xs, rows, k)
        ref_a, ref_s = reference.gather_rows_fp8(xq, xs, rows, k)
        assert torch.equal(u8(a), u8(ref_a)) and torch.equal(a_scale, ref_s)

    @pytest.mark.parametrize("T,K,k", [(0, 64, 2), (1, 64, 8), (13, 36, 3), (7, 10, 2), (5, 0, 2),
                                       (9, 2500, 4), (3, 5120, 8)])
    @pytest.mark.parametrize("one_tile_max_k", [None, 128])   # 128: rows over it loop in chunks
    def test_interp_quantize_scatter_fp8(T, K, k, one_tile_max_k, seed, monkeypatch):
        if one_tile_max_k is not None:
            monkeypatch.setattr(_launch("fp8_quant"), "ONE_TILE_MAX_K", one_tile_max_k)
            monkeypatch.setattr(_launch("fp8_quant"), "LOOP_BLOCK_K", 128)
        x, f2s = tokens_and_f2s(T, K, k)
        with poisoned_empty():
            a, a_scale = _launch("quantize_scatter").quantize_scatter_fp8(x, f2s)
        ref_a, ref_s = gathered_quantized(x, f2s)
        assert torch.equal(u8(a), u8(ref_a)) and torch.equal(a_scale, ref_s)

    def test_interp_quantize_scatter_clamps_bad_positions(seed):
        x, f2s = tokens_and_f2s(6, 40, 3)
        flat = f2s.view(-1)
        first, last = int((flat == 0).nonzero()), int((flat == flat.numel() - 1).nonzero())
        bad = f2s.clone()
        bad.view(-1)[first], bad.view(-1)[last] = -7, 10**6  # clamped onto rows 0 and R - 1
        with poisoned_empty():
            a, a_scale = _launch("quantize_scatter").quantize_scatter_fp8(x, bad)
        ref_a, ref_s = gathered_quantized(x, f2s)
        assert torch.equal(u8(a), u8(ref_a)) and torch.equal(a_scale, ref_s)

    @pytest.mark.parametrize("R,I,tile", [
        (0, 64, None), (1, 64, None), (13, 36, None), (5, 0, None), (6, 1536, None),
        (7, 100, (32, 0, 4)), (3, 3000, (1024, 0, 4)),                    # two passes
        (4, 1536, (256, 6, 1)), (3, 700, (256, 3, 1)), (2, 36, (256, 1, 1)),  # warp-per-row chunks
        (3, 300, (128, 3, 1))])
    def test_interp_silu_mul_quantize_fp8(R, I, tile, seed):
        x = (torch.randn(R, 2 * I) * 3).to(torch.bfloat16)
        if R:
            x[0] = 0
        with poisoned_empty():
            q, s = _launch("silu_mul_quant").silu_mul_quantize_fp8(x, tile=tile)
        ref_q, ref_s = reference.silu_mul_quantize_fp8(x)
        assert_fp8_close(q, s, ref_q, ref_s)

    @pytest.mark.parametrize("T,k,H", [(0, 2, 5), (1, 8, 64), (13, 3, 36), (7, 1, 100), (5, 2, 0),
                                       (40, 8, 1030)])
    def test_interp_combine(T, k, H, seed):
        y = torch.randn(T * k, H).to(torch.bfloat16)
        f2s = torch.randperm(T * k).to(torch.int32).view(T, k)
        w = torch.rand(T, k)
        with poisoned_empty():
            out = _launch("moe_combine").combine(y, f2s, w)
        assert torch.equal(out, reference.combine(y, f2s, w).to(torch.bfloat16))

    def test_interp_combine_clamps_bad_rows():
        y = torch.randn(6, 8).to(torch.bfloat16)
        f2s = torch.tensor([[-3, 1], [2, 99], [4, 5]], dtype=torch.int32)
        w = torch.rand(3, 2)
        out = _launch("moe_combine").combine(y, f2s, w)
        assert torch.equal(out, reference.combine(y, f2s, w).to(torch.bfloat16))


# ==========================================================================================
# The compiled (GPU) code paths build for sm_90 without a GPU: Triton -> PTX -> cubin
# ==========================================================================================
def _sig(consts, **args):
    return {**args, **{k: "constexpr" for k in consts}}, consts


_ROUTING_ARGS = dict(logits_ptr="*fp32", bias_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32",
                     sorted_rows_ptr="*i32", flat_to_sorted_ptr="*i32", offsets_ptr="*i64", stride_t="i32", E="i32", n_group="i32", group_len="i32", topk_group="i32",
                     scaling="fp32")
_SORT_ARGS = dict(ids_ptr="*i32", prefix_ptr="*i32", totals_ptr="*i32", sorted_rows_ptr="*i32",
                  flat_to_sorted_ptr="*i32", offsets_ptr="*i64", N="i32", E="i32", CHUNK="i32")
SM90_BUILDS = {
    "routing-grouped-sigmoid": ("routing", "routing_kernel", *_sig(
        dict(TOP_K=8, BLOCK_G=8, BLOCK_GL=32, BLOCK_K=8, SOFTMAX=False, HAS_BIAS=True, GROUPED=True,
             RENORMALIZE=True, SORT_ONE_TOKEN=False, BLOCK_E1=1), **_ROUTING_ARGS)),
    "routing-and-sort-one-token": ("routing", "routing_kernel", *_sig(
        dict(TOP_K=8, BLOCK_G=8, BLOCK_GL=32, BLOCK_K=8, SOFTMAX=False, HAS_BIAS=True, GROUPED=True,
             RENORMALIZE=True, SORT_ONE_TOKEN=True, BLOCK_E1=256), **_ROUTING_ARGS)),
    "routing-softmax-bf16": ("routing", "routing_kernel", *_sig(
        dict(TOP_K=2, BLOCK_G=1, BLOCK_GL=8, BLOCK_K=2, SOFTMAX=True, HAS_BIAS=False, GROUPED=False,
             RENORMALIZE=False, SORT_ONE_TOKEN=False, BLOCK_E1=1), **{**_ROUTING_ARGS, "logits_ptr": "*bf16"})),
    "sort-count": ("moe_sort", "count_kernel", *_sig(
        dict(BLOCK_CHUNK=64, BLOCK_E=256), ids_ptr="*i32", counts_ptr="*i32", N="i32", E="i32",
        CHUNK="i32")),
    "sort-scan": ("moe_sort", "scan_kernel", *_sig(
        dict(BLOCK_NC=256, BLOCK_EE=16), counts_ptr="*i32", prefix_ptr="*i32", totals_ptr="*i32",
        num_chunks="i32", E="i32")),
    "sort-place-fused": ("moe_sort", "place_kernel", *_sig(
        dict(BLOCK_CHUNK=64, BLOCK_E=256, FUSED=True), **_SORT_ARGS)),
    "sort-place": ("moe_sort", "place_kernel", *_sig(
        dict(BLOCK_CHUNK=64, BLOCK_E=256, FUSED=False), **_SORT_ARGS)),
    "gather-words": ("moe_gather", "gather_rows_kernel", *_sig(
        dict(BLOCK_R=16, BLOCK_K=256), xq_ptr="*i32", xs_ptr="*fp32", rows_ptr="*i32", a_ptr="*i32",
        as_ptr="*fp32", R="i32", T="i32", K="i32", top_k="i32")),
    "quantize-scatter": ("quantize_scatter", "quantize_scatter_fp8_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=2048, HW=True, ONE_TILE=False),
        x_ptr="*bf16", f2s_ptr="*i32", a_ptr="*u8", a_scale_ptr="*fp32", K="i32", R="i32", top_k="i32")),
    "quantize-scatter-one-tile": ("quantize_scatter", "quantize_scatter_fp8_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=8192, HW=True, ONE_TILE=True),
        x_ptr="*bf16", f2s_ptr="*i32", a_ptr="*u8", a_scale_ptr="*fp32", K="i32", R="i32", top_k="i32")),
    "silu-one-tile": ("silu_mul_quant", "silu_mul_quant_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_I=2048, NUM_CHUNKS=1, HW=True),
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", I="i32")),
    "silu-warp-chunks": ("silu_mul_quant", "silu_mul_quant_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_I=256, NUM_CHUNKS=6, HW=True),
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", I="i32")),
    "silu-loop": ("silu_mul_quant", "silu_mul_quant_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_I=1024, NUM_CHUNKS=0, HW=True),
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", I="i32")),
    "fp8-per-token-quant": ("fp8_quant", "quantize_fp8_per_token_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=2048, HW=True, ONE_TILE=False),
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", K="i32")),
    "fp8-per-token-quant-one-tile": ("fp8_quant", "quantize_fp8_per_token_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_K=8192, HW=True, ONE_TILE=True),
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp32", K="i32")),
    "scale-convert": ("scale_convert", "bf16_scales_to_fp8_kernel", *_sig(
        dict(MIN_SCALE=formats.FP8_MIN_SCALE, BLOCK_R=16, BLOCK_G=64, HW=True),
        s_ptr="*bf16", q_ptr="*u8", chan_ptr="*fp32", n_rows="i32", G="i32")),
    "combine": ("moe_combine", "combine_kernel", *_sig(
        dict(TOP_K=8, BLOCK_T=2, BLOCK_H=1024, HW=True), y_ptr="*bf16", f2s_ptr="*i32", w_ptr="*fp32",
        out_ptr="*bf16", T="i32", H="i32", R="i32")),
}


@pytest.mark.parametrize("build", list(SM90_BUILDS))
def test_kernels_compile_for_sm90(build):
    """The HW=True paths (hardware fp8 / bf16 converts, compiled reductions and scans) cannot run
    on CPU CI, but they must at least build: compile each kernel for sm_90 down to a cubin."""
    triton = pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("the interpreter does not compile")
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name, signature, constexprs = SM90_BUILDS[build]
    fn = getattr(importlib.import_module(f"inductor_w4a8.kernels.{module}"), name)
    options = {}
    pdl = "PDL" in fn.arg_names
    if pdl:   # as fast_launch builds the forward's kernels on sm_90 (kernels/pdl.py)
        signature, constexprs = {**signature, "PDL": "constexpr"}, {**constexprs, "PDL": True}
        options["launch_pdl"] = True
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:  # no ptxas in this triton install: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot assemble for sm_90 here: {e}")
        raise
    assert compiled.asm.get("cubin")
    if pdl:   # nothing touches global memory before the wait for the previous kernel
        ptx = compiled.asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait = body.find("griddepcontrol.wait")
        release = body.find("griddepcontrol.launch_dependents")
        first_access = min((i for i in (body.find(op) for op in ("ld.global", "st.global", "cp.async",
                                                                  "atom.global", "red.global"))
                            if i >= 0), default=len(body))
        assert 0 <= wait < release < first_access, (wait, release, first_access)


# ==========================================================================================
# CUDA: the ops vs the CPU kernels, boundaries, poisoned outputs
# ==========================================================================================
def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 logits tie often
@pytest.mark.parametrize("T", BOUNDARY_T)
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_cuda_select_experts(T, routing, dtype, seed):
    args = routing_args(T, routing, device="cuda", dtype=dtype)
    with poisoned_empty():
        w, ids = ops.select_experts(*args)
    assert_valid_routing(w, ids, *[_cpu(a) for a in args])


@pytest.mark.cuda
@pytest.mark.parametrize("T", (1, 2, 513, 8192))
@pytest.mark.parametrize("routing", ROUTINGS, ids=ROUTING_IDS)
def test_cuda_select_and_sort_experts(T, routing, seed):
    args = routing_args(T, routing, device="cuda")
    with poisoned_empty():
        outs = ops.select_and_sort_experts(*args)
    assert_routed_and_sorted(outs, args)


@pytest.mark.cuda
@pytest.mark.parametrize("T", BOUNDARY_T + (0,))
@pytest.mark.parametrize("k,E", [(8, 160), (6, 60), (2, 7), (1, 1)])
def test_cuda_sort_by_expert_exact(T, k, E, seed):
    ids = sort_inputs(T, k, E)
    with poisoned_empty():
        got = ops.sort_by_expert(ids.cuda(), E)
    for g, r in zip(got, ops.sort_by_expert(ids, E)):
        assert g.dtype == r.dtype and torch.equal(g.cpu(), r)


@pytest.mark.cuda
def test_cuda_sort_by_expert_skewed():
    # every token to one expert, and every token to the last: the largest per-expert counts
    for E, fill in ((160, 0), (160, 159), (7, 3)):
        ids = torch.full((8192, 8), fill, dtype=torch.int32)
        got = ops.sort_by_expert(ids.cuda(), E)
        for g, r in zip(got, ops.sort_by_expert(ids, E)):
            assert torch.equal(g.cpu(), r)


@pytest.mark.cuda
@pytest.mark.parametrize("T", BOUNDARY_T)
@pytest.mark.parametrize("K,k", [(5120, 8), (1536, 6), (72, 2)])
def test_cuda_gather_rows_fp8_exact(T, K, k, seed):
    xq, xs = quantized_tokens(T, K)
    rows = torch.randperm(T * k).to(torch.int32)
    with poisoned_empty():
        a, a_scale = ops.gather_rows_fp8(xq.cuda(), xs.cuda(), rows.cuda(), k)
    ref_a, ref_s = ops.gather_rows_fp8(xq, xs, rows, k)
    assert torch.equal(u8(a).cpu(), u8(ref_a)) and torch.equal(a_scale.cpu(), ref_s)


@pytest.mark.cuda
@pytest.mark.parametrize("T", BOUNDARY_T)
@pytest.mark.parametrize("K,k", [(5120, 8), (1536, 6), (72, 2)])
def test_cuda_quantize_scatter_fp8_exact(T, K, k, seed):
    x, f2s = tokens_and_f2s(T, K, k)
    with poisoned_empty():
        a, a_scale = ops.quantize_scatter_fp8(x.cuda(), f2s.cuda())
    ref_a, ref_s = ops.quantize_scatter_fp8(x, f2s)
    assert torch.equal(u8(a).cpu(), u8(ref_a)) and torch.equal(a_scale.cpu(), ref_s)


@pytest.mark.cuda
@pytest.mark.parametrize("R", BOUNDARY_T)
@pytest.mark.parametrize("I", [1536, 192, 5000])
def test_cuda_silu_mul_quantize_fp8(R, I, seed):
    x = (torch.randn(R, 2 * I) * 3).to(torch.bfloat16)
    x[0] = 0
    with poisoned_empty():
        q, s = ops.silu_mul_quantize_fp8(x.cuda())
    ref_q, ref_s = ops.silu_mul_quantize_fp8(x)
    assert_fp8_close(q.cpu(), s.cpu(), ref_q, ref_s)


@pytest.mark.parametrize("tile", [(128, 1, 1), (100, 3, 1), (128, 2, 4)])
def test_silu_mul_quantize_tile_override_checked(tile):
    """A tile that does not cover the row (or a BLOCK_I that is not a power of 2) is refused
    before anything launches, naming the argument."""
    from inductor_w4a8.launch import silu_mul_quant as launcher
    with pytest.raises(ValueError, match=r"tile=.*NUM_CHUNKS \* BLOCK_I >= I = 300"):
        launcher.silu_mul_quantize_fp8(torch.randn(2, 600).to(torch.bfloat16), tile=tile)


@pytest.mark.cuda
@pytest.mark.parametrize("R", [1023, 1024, 8192 * 8])
def test_cuda_silu_mul_quantize_fp8_tiles_agree(R, seed):
    """Both in-register tiles (few rows: one chunk over several warps; many rows: a warp a row)
    and the two-pass loop give the same bits on GLM-4.6's I = 1536, either side of the switch."""
    from inductor_w4a8.launch import silu_mul_quant as launcher
    I = 1536
    x = (torch.randn(R, 2 * I, device="cuda") * 3).to(torch.bfloat16)
    x[R // 2] = float("nan")
    outs = []
    for tile in (None, (2048, 1, 8), (256, 6, 1), (1024, 0, 4)):
        with poisoned_empty():
            q, s = launcher.silu_mul_quantize_fp8(x, tile=tile)
        outs.append((u8(q), s))
    nan_as = lambda s: torch.nan_to_num(s, nan=-1.0)
    assert bool(torch.isnan(outs[0][1][R // 2])) and not bool(torch.isnan(outs[0][1][R // 2 - 1]))
    for q, s in outs[1:]:
        assert torch.equal(q, outs[0][0]) and torch.equal(nan_as(s), nan_as(outs[0][1]))


@pytest.mark.cuda
@pytest.mark.parametrize("T", BOUNDARY_T)
@pytest.mark.parametrize("k,H", [(8, 5120), (2, 72)])
def test_cuda_combine_exact(T, k, H, seed):
    y = torch.randn(T * k, H).to(torch.bfloat16)
    f2s = torch.randperm(T * k).to(torch.int32).view(T, k)
    w = torch.rand(T, k)
    with poisoned_empty():
        out = ops.combine(y.cuda(), f2s.cuda(), w.cuda())
    assert torch.equal(out.cpu(), ops.combine(y, f2s, w))


@pytest.mark.cuda
@pytest.mark.parametrize("op_case", ["select", "select+sort", "sort", "scatter", "gather", "silu", "combine"])
def test_cuda_opcheck(op_case, seed):
    d = "cuda"
    if op_case == "select":
        opcheck(ops.select_experts, routing_args(33, ROUTINGS[3], device=d))
    elif op_case == "select+sort":
        for T in (1, 33):
            opcheck(ops.select_and_sort_experts, routing_args(T, ROUTINGS[3], device=d))
    elif op_case == "sort":
        opcheck(ops.sort_by_expert, (random_ids(513, 8, 160, device=d), 160))
    elif op_case == "scatter":
        opcheck(ops.quantize_scatter_fp8, tokens_and_f2s(33, 256, 8, device=d))
    elif op_case == "gather":
        xq, xs = quantized_tokens(33, 256, device=d)
        opcheck(ops.gather_rows_fp8, (xq, xs, torch.randperm(33 * 8, device=d).to(torch.int32), 8))
    elif op_case == "silu":
        opcheck(ops.silu_mul_quantize_fp8, ((torch.randn(33, 384, device=d) * 3).to(torch.bfloat16),))
    else:
        y = torch.randn(33 * 8, 256, device=d).to(torch.bfloat16)
        f2s = torch.randperm(33 * 8, device=d).to(torch.int32).view(33, 8)
        opcheck(ops.combine, (y, f2s, torch.rand(33, 8, device=d)))


@pytest.mark.cuda
def test_cuda_plumbing_capturable():
    """Route, sort, gather, quantize + scatter, act-quant and combine captured in one CUDA graph, replayed on new data."""
    T, E, k, H, I = 513, 60, 6, 256, 192
    logits = torch.randn(T, E, device="cuda")
    bias = torch.randn(E, device="cuda") * 0.1
    xq, xs = quantized_tokens(T, H, device="cuda")
    x = (torch.randn(T, H, device="cuda") * 2).to(torch.bfloat16)
    h = (torch.randn(T * k, 2 * I, device="cuda") * 3).to(torch.bfloat16)
    y = torch.randn(T * k, H, device="cuda").to(torch.bfloat16)

    def run():
        w, ids = ops.select_experts(logits, bias, k, "sigmoid", True, 4, 2, 2.5)
        rows, f2s, off = ops.sort_by_expert(ids, E)
        a, a_s = ops.gather_rows_fp8(xq, xs, rows, k)
        b, b_s = ops.quantize_scatter_fp8(x, f2s)
        one = ops.select_and_sort_experts(logits[:1], bias, k, "sigmoid", True, 4, 2, 2.5)
        q, s = ops.silu_mul_quantize_fp8(h)
        return w, ids, rows, f2s, off, a, a_s, b, b_s, *one, q, s, ops.combine(y, f2s, w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(2):
        logits.copy_(torch.randn(T, E))
        x.copy_(torch.randn(T, H) * 2)
        y.copy_(torch.randn(T * k, H).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, run()):
            assert torch.equal(got.view(torch.uint8) if got.dtype == FP8 else got,
                               want.view(torch.uint8) if want.dtype == FP8 else want)


# ==========================================================================================
# inference only, at the op
# ==========================================================================================
def _grad_cases():
    """Each op with a floating input, that input requiring grad (the rest as in opcheck)."""
    xq, xs = quantized_tokens(5, 64)
    y = (torch.randn(10, 32)).to(torch.bfloat16)
    logits, *rest = routing_args(5, ROUTINGS[0])
    packed, w_scale = formats.quantize_w4((torch.randn(2, 16, 64) * 0.05).to(torch.bfloat16), 32)
    ops.convert_packed_uint4b8_to_signed_int4_(packed)
    w, _ = ops.encode_and_reorder_int4b_grouped(packed)
    a, a_scale = quantized_tokens(6, 64)
    offsets = torch.tensor([0, 2, 6], dtype=torch.int64)
    return {
        "grouped_gemm": (ops.grouped_gemm, (a, a_scale, w, w_scale, None, offsets, 32), 1),
        "select_experts": (ops.select_experts, (logits, *rest), 0),
        "select_and_sort_experts": (ops.select_and_sort_experts, (logits, *rest), 0),
        "quantize_fp8_per_token": (ops.quantize_fp8_per_token, ((torch.randn(5, 64)).to(torch.bfloat16),), 0),
        "silu_mul_quantize_fp8": (ops.silu_mul_quantize_fp8, ((torch.randn(5, 64)).to(torch.bfloat16),), 0),
        "gather_rows_fp8": (ops.gather_rows_fp8, (xq, xs, torch.randperm(10).to(torch.int32), 2), 1),
        "quantize_scatter_fp8": (ops.quantize_scatter_fp8, tokens_and_f2s(5, 64, 2), 0),
        "combine": (ops.combine, (y, torch.randperm(10).to(torch.int32).view(5, 2), torch.rand(5, 2)), 2),
        "convert_bf16_scales_to_fp8": (ops.convert_bf16_scales_to_fp8,
                                       ((torch.rand(3, 4, 2) * 0.02).to(torch.bfloat16),), 0),
    }


@pytest.mark.parametrize("name", list(_grad_cases()))
def test_op_needing_grad_is_refused_at_the_call(name, seed):
    op, args, i = _grad_cases()[name]
    args = list(args)
    args[i] = args[i].clone().requires_grad_(True)
    with pytest.raises(W4A8InputError, match=rf"w4a8::{name}: is inference only.*torch\.no_grad\(\)"):
        op(*args)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            outs = op(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert all(o.grad_fn is None and not o.requires_grad for o in outs)
