"""reference.py itself against straightforward loop implementations on tiny shapes.

The reference is what every kernel is checked against, so it is checked here against code that is
as plain as possible: Python loops over tokens, slots, experts and elements, Python sorting.
"""
import math

import pytest
import torch

from inductor_w4a8 import formats, reference

FP8 = formats.FP8_DTYPE


# ------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------
def loop_select_experts(logits, bias, top_k, scoring, renormalize, n_group, topk_group, scale):
    T, E = logits.shape
    weights, ids = [], []
    for t in range(T):
        row = [float(v) for v in logits[t].double()]
        if scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = list(range(E))
        if n_group:
            size = E // n_group
            group_score = []
            for g in range(n_group):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                group_score.append(sum(members[:2]) if bias is not None else members[0])
            keep = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = [e for e in range(E) if e // size in keep]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float64).view(T, top_k), torch.tensor(ids).view(T, top_k)


@pytest.mark.parametrize("E,k,scoring,renorm,ng,tg,scale,with_bias", [
    (7, 2, "softmax", True, 0, 0, 1.0, False),
    (7, 3, "softmax", False, 0, 0, 1.0, False),
    (12, 4, "sigmoid", True, 4, 2, 2.5, True),
    (12, 3, "sigmoid", False, 3, 1, 1.0, False),
    (10, 2, "sigmoid", True, 0, 0, 1.5, True),
])
def test_select_experts(E, k, scoring, renorm, ng, tg, scale, with_bias, seed):
    logits = torch.randn(6, E)
    bias = torch.randn(E) * 0.2 if with_bias else None
    w, ids = reference.select_experts(logits, bias, k, scoring, renorm, ng, tg, scale)
    lw, lids = loop_select_experts(logits, bias, k, scoring, renorm, ng, tg, scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), lids)
    torch.testing.assert_close(w.double(), lw, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# sort, gather, combine
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,k,E", [(0, 2, 3), (1, 1, 1), (5, 2, 4), (9, 3, 7)])
def test_sort_by_expert(T, k, E, seed):
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    sorted_rows, flat_to_sorted, offsets = reference.sort_by_expert(ids, E)
    flat = ids.reshape(-1).tolist()
    expect_rows = [i for e in range(E) for i in range(len(flat)) if flat[i] == e]
    expect_offsets = [0]
    for e in range(E):
        expect_offsets.append(expect_offsets[-1] + flat.count(e))
    assert sorted_rows.tolist() == expect_rows
    assert offsets.tolist() == expect_offsets
    for i in range(len(flat)):
        assert expect_rows[flat_to_sorted.reshape(-1)[i]] == i


def test_gather_rows_fp8(seed):
    T, K, k = 4, 16, 3
    xq, xs = formats.quantize_fp8_per_token(torch.randn(T, K).to(torch.bfloat16))
    rows = torch.randperm(T * k).to(torch.int32)
    a, a_scale = reference.gather_rows_fp8(xq, xs, rows, k)
    for r in range(T * k):
        t = int(rows[r]) // k
        assert torch.equal(a[r].view(torch.uint8), xq[t].view(torch.uint8))
        assert a_scale[r, 0] == xs[t, 0]


def test_combine(seed):
    T, k, H = 3, 2, 5
    y = torch.randn(T * k, H).to(torch.bfloat16)
    f2s = torch.randperm(T * k).to(torch.int32).view(T, k)
    w = torch.rand(T, k)
    out = reference.combine(y, f2s, w)
    for t in range(T):
        for h in range(H):
            acc = 0.0
            for j in range(k):
                acc += float(w[t, j]) * float(y[int(f2s[t, j]), h])
            assert out[t, h].item() == pytest.approx(acc, rel=1e-7, abs=1e-9)


# ------------------------------------------------------------------------------------------
# activation, GEMM
# ------------------------------------------------------------------------------------------
def test_silu_mul_quantize_fp8(seed):
    R, I = 3, 8
    x = (torch.randn(R, 2 * I) * 3).to(torch.bfloat16)
    q, s = reference.silu_mul_quantize_fp8(x)
    for r in range(R):
        v = [float(x[r, i]) / (1 + math.exp(-float(x[r, i]))) * float(x[r, I + i]) for i in range(I)]
        scale = max(max(abs(t) for t in v) / 448, 1 / (448 * 512))
        assert s[r, 0].item() == pytest.approx(scale, rel=1e-6)
        for i in range(I):
            # e4m3 has 3 mantissa bits: the dequantized value is within half a step of v
            assert abs(float(q[r, i].float()) * s[r, 0].item() - v[i]) <= abs(v[i]) * 2**-4 + scale * 2**-10


@pytest.mark.parametrize("with_chan", [False, True])
def test_grouped_gemm(with_chan, seed):
    E, N, K, G = 3, 4, 64, 32
    q = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)
    s_bf16 = (torch.rand(E, N, K // G) * 0.1).to(torch.bfloat16)
    s, chan = formats.convert_bf16_scales_to_fp8(s_bf16) if with_chan else (s_bf16, None)
    offsets = torch.tensor([0, 2, 2, 5])  # expert 1 empty
    a, a_scale = formats.quantize_fp8_per_token(torch.randn(5, K).to(torch.bfloat16))
    out = reference.grouped_gemm(a, a_scale, q, s, chan, offsets, G)
    for r in range(5):
        e = int((offsets[1:] > r).nonzero()[0])
        for n in range(N):
            acc = 0.0
            for g in range(K // G):
                part = sum(float(a[r, k].float()) * int(q[e, n, k]) for k in range(g * G, (g + 1) * G))
                # the effective scale is the exact product s * chan (Python floats are fp64)
                sg = float(s[e, n, g].float()) * (float(chan[e, n, 0]) if with_chan else 1.0)
                acc += sg * part
            assert out[r, n].item() == pytest.approx(acc * float(a_scale[r, 0]), rel=1e-9, abs=1e-12)


def test_grouped_gemm_fp8_mode_is_exact(seed):
    """fp8 mode's effective scale is fp8 s x fp32 chan taken exactly (fp64), not rounded to fp32:
    with a chan whose product with s needs more than 24 bits, the two differ, and the reference
    equals the fp64 product (the exact value of the op's own inputs)."""
    E, N, K, G = 2, 3, 64, 32
    q = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)
    s8 = (torch.rand(E, N, K // G) * 40 + 8).to(FP8)
    chan = (torch.rand(E, N, 1) + 0.5) * 2**-9    # 24 random mantissa bits
    assert not torch.equal(formats.effective_group_scales(s8, chan).double(),
                           formats.effective_group_scales(s8, chan, dtype=torch.float64))
    offsets = torch.tensor([0, 3, 7])
    a, a_scale = formats.quantize_fp8_per_token(torch.randn(7, K).to(torch.bfloat16))
    out = reference.grouped_gemm(a, a_scale, q, s8, chan, offsets, G)
    w = q.double() * (s8.double() * chan.double()).repeat_interleave(G, dim=2)
    expert = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    want = torch.stack([(a[r].double() @ w[expert[r]].T) * a_scale[r].double() for r in range(7)])
    assert torch.allclose(out, want, rtol=1e-14, atol=0)


def test_grouped_gemm_fp8_power_of_two_chan_equals_exact_mode(seed):
    """With a power-of-two channel scale, fp8 mode (s8, chan) and exact mode (bf16 s8 * chan, which
    is exact: 4 significant bits) mean the same product; the reference gives the same bits."""
    E, N, K, G = 2, 5, 128, 64
    q = torch.randint(-8, 8, (E, N, K), dtype=torch.int8)
    s8 = (torch.rand(E, N, K // G) * 40 + 8).to(FP8)
    chan = 2.0 ** torch.randint(-12, -4, (E, N, 1)).float()
    s_bf16 = (s8.float() * chan).to(torch.bfloat16)
    assert torch.equal(s_bf16.float(), s8.float() * chan)
    offsets = torch.tensor([0, 4, 9])
    a, a_scale = formats.quantize_fp8_per_token(torch.randn(9, K).to(torch.bfloat16))
    assert torch.equal(reference.grouped_gemm(a, a_scale, q, s8, chan, offsets, G),
                       reference.grouped_gemm(a, a_scale, q, s_bf16, None, offsets, G))


# ------------------------------------------------------------------------------------------
# the whole block
# ------------------------------------------------------------------------------------------
def loop_moe_forward(x, logits, q13, s13, q2, s2, G, routing_args, quantize_activations):
    """Token by token, slot by slot, one expert matrix-vector product at a time."""
    weights, ids = loop_select_experts(logits, *routing_args)
    T, H = x.shape
    I = q13.shape[1] // 2

    def act(v):  # per-token fp8 quantization of one vector, or nothing
        if not quantize_activations:
            return v
        qv, sv = formats.quantize_fp8_per_token(v.unsqueeze(0))
        return qv.double()[0] * sv.double()[0, 0]

    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        xt = act(x[t].float()).double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w13 = q13[e].double() * s13[e].double().repeat_interleave(G, dim=1)
            w2 = q2[e].double() * s2[e].double().repeat_interleave(G, dim=1)
            h = (w13 @ xt).to(torch.bfloat16).float()
            mid = torch.nn.functional.silu(h[:I]) * h[I:]
            y = (w2 @ act(mid).double()).to(torch.bfloat16).double()
            out[t] += float(weights[t, j]) * y
    return out


@pytest.mark.parametrize("quantize_activations", [True, False])
@pytest.mark.parametrize("routing", [("softmax", True, 0, 0, 1.0, False), ("sigmoid", True, 2, 1, 2.0, True)])
def test_moe_forward(routing, quantize_activations, seed):
    E, k, H, I, G, T = 4, 2, 64, 32, 32, 5
    scoring, renorm, ng, tg, scale, with_bias = routing
    q13 = torch.randint(-8, 8, (E, 2 * I, H), dtype=torch.int8)
    q2 = torch.randint(-8, 8, (E, H, I), dtype=torch.int8)
    s13 = (torch.rand(E, 2 * I, H // G) * 0.02).to(torch.bfloat16)
    s2 = (torch.rand(E, H, I // G) * 0.02).to(torch.bfloat16)
    x = torch.randn(T, H).to(torch.bfloat16)
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1 if with_bias else None
    out = reference.moe_forward(x, logits, q13, s13, q2, s2, top_k=k, group_size=G, scoring=scoring,
                                renormalize=renorm, n_group=ng, topk_group=tg,
                                routed_scaling_factor=scale, correction_bias=bias,
                                quantize_activations=quantize_activations)
    expect = loop_moe_forward(x, logits, q13, s13, q2, s2, G, (bias, k, scoring, renorm, ng, tg, scale),
                              quantize_activations)
    assert out.dtype == torch.float64 and out.shape == (T, H)
    # the loop weighs in fp64, the reference with its fp32 routing weights: ~1e-7 of the scale
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6 * float(expect.abs().max()))


def test_moe_forward_given_routing_and_fp8_scales(seed):
    E, k, H, I, G, T = 3, 2, 64, 32, 32, 4
    q13 = torch.randint(-8, 8, (E, 2 * I, H), dtype=torch.int8)
    q2 = torch.randint(-8, 8, (E, H, I), dtype=torch.int8)
    s13, c13 = formats.convert_bf16_scales_to_fp8((torch.rand(E, 2 * I, H // G) * 0.02).to(torch.bfloat16))
    s2, c2 = formats.convert_bf16_scales_to_fp8((torch.rand(E, H, I // G) * 0.02).to(torch.bfloat16))
    x = torch.randn(T, H).to(torch.bfloat16)
    w = torch.rand(T, k)
    ids = torch.tensor([[0, 2], [2, 1], [0, 1], [1, 0]], dtype=torch.int32)
    out = reference.moe_forward(x, torch.zeros(T, E), q13, s13, q2, s2, top_k=k, group_size=G,
                                w13_chan_scale=c13, w2_chan_scale=c2, routing=(w, ids))
    s13_eff = formats.effective_group_scales(s13, c13)
    s2_eff = formats.effective_group_scales(s2, c2)
    expect = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        xq, xs = formats.quantize_fp8_per_token(x[t:t + 1])
        xt = xq.double()[0] * xs.double()[0, 0]
        for j in range(k):
            e = int(ids[t, j])
            h = ((q13[e].double() * s13_eff[e].double().repeat_interleave(G, 1)) @ xt).to(torch.bfloat16)
            mq, ms = formats.quantize_fp8_per_token(torch.nn.functional.silu(h[:I].float()) * h[I:].float())
            m = mq.double() * ms.double()
            y = ((q2[e].double() * s2_eff[e].double().repeat_interleave(G, 1)) @ m).to(torch.bfloat16)
            expect[t] += float(w[t, j]) * y.double()
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-9)
