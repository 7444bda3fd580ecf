"""Property-based tests (hypothesis) of the ops' input checks and of NaN containment.

For random shapes, dtypes, contiguity, devices (cpu, meta) and group sizes, each op is called and
its answer compared with a specification written here from DESIGN.md: an input the spec refuses
must raise W4A8InputError naming the argument, before any write (the in-place op leaves its input
bit for bit as it was; no op touches its inputs); an input the spec accepts must give what
formats.py / reference.py compute (on meta: their shapes and dtypes).
"""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import inductor_w4a8 as w4a8
import inductor_w4a8.testing  # noqa: F401  (w4a8.testing)
from inductor_w4a8 import W4A8InputError, formats, reference

ops = torch.ops.w4a8
FP8 = torch.float8_e4m3fn
DTYPES = [torch.int32, torch.int64, torch.int16, torch.uint8, torch.float32, torch.float16,
          torch.bfloat16, FP8]
# bounded: each test is a few seconds on CPU; no example database written into the checkout
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# random tensors of any dtype, shape, contiguity and device
# ------------------------------------------------------------------------------------------
def random_tensor(shape, dtype, device, contiguous=True, seed=0):
    """Random values (random bits for ints, N(0, 4) for floats), optionally a transposed view."""
    g = torch.Generator().manual_seed(seed)
    make_shape = list(shape)
    if not contiguous:
        make_shape[-1], make_shape[-2] = make_shape[-2], make_shape[-1]
    if dtype.is_floating_point:
        t = (torch.randn(make_shape, generator=g) * 4).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -2**31), min(info.max, 2**31 - 1), make_shape, generator=g,
                          dtype=torch.int64).to(dtype)
    if not contiguous:
        t = t.transpose(-1, -2)
    return t.to(device)


def bits(t):
    """A tensor's bits as integers (NaN == NaN; fp8 has no CPU comparison kernels)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@st.composite
def tensors(draw, dtype, ranks, last_dims=None, max_dim=6):
    """Half the draws a tensor the op should take (dtype, a rank in `ranks`, contiguous, last dim
    from `last_dims`), half one with a random defect (another dtype, rank, layout or last dim);
    on cpu or meta. The test's spec, not this strategy, decides what is valid."""
    defect = draw(st.sampled_from([None, None, None, "dtype", "rank", "layout", "last dim"]))
    rank = draw(st.sampled_from(sorted(ranks)))
    if defect == "rank":
        rank = draw(st.sampled_from([r for r in range(0, 5) if r not in ranks]))
    shape = [draw(st.integers(1 if defect is None else 0, max_dim)) for _ in range(rank)]
    if rank and last_dims is not None:
        shape[-1] = draw(last_dims) if defect != "last dim" else draw(st.integers(0, 17))
    if defect == "layout" and rank >= 2:
        shape[-1], shape[-2] = max(shape[-1], 2), max(shape[-2], 2)
    t_dtype = draw(st.sampled_from([d for d in DTYPES if d != dtype])) if defect == "dtype" else dtype
    device = draw(st.sampled_from(["cpu", "meta"]))
    contiguous = not (defect == "layout" and rank >= 2)
    return random_tensor(shape, t_dtype, device, contiguous, seed=draw(st.integers(0, 2**31 - 1)))


def refusal(t, dtype, name, rank=None, min_rank=None):
    """The spec's first objection to tensor `t` as argument `name`, or None: the same checks, in
    the order DESIGN.md's ops document them (dtype, rank, contiguity)."""
    if t.dtype != dtype:
        return f"{name} must have dtype {dtype}"
    if min_rank is not None and t.dim() < min_rank:
        return f"{name} must have rank >= {min_rank}"
    if rank is not None and t.dim() != rank:
        return f"{name} must have rank {rank}"
    if not t.is_contiguous():
        return f"{name} must be contiguous"
    return None


def assert_refused(call, inputs, expected):
    event(f"refused: {expected.split(' must')[0].split(' has')[0][:40]}")
    before = [t.clone() for t in inputs if t.device.type != "meta"]
    with pytest.raises(W4A8InputError, match=expected.replace("(", r"\(").replace("[", r"\[")) as info:
        call()
    after = [t for t in inputs if t.device.type != "meta"]
    assert all(same_bits(a, b) for a, b in zip(before, after)), "an input changed before the refusal"
    return str(info.value)


# ------------------------------------------------------------------------------------------
# post-processing ops
# ------------------------------------------------------------------------------------------
@SETTINGS
@given(tensors(torch.int32, ranks={2, 3, 4}))
def test_convert_uint4b8_in_place(packed):
    objection = refusal(packed, torch.int32, "packed", min_rank=2)
    if objection:
        message = assert_refused(lambda: ops.convert_packed_uint4b8_to_signed_int4_(packed), [packed],
                                 objection)
        if objection.startswith("packed must have dtype") and (
                packed.dtype.is_floating_point or packed.dtype == torch.uint8):
            assert ".view(torch.int32)" in message            # .to would change the bits
        return
    event(f"accepted on {packed.device.type}")
    original = packed.clone()
    ops.convert_packed_uint4b8_to_signed_int4_(packed)
    if packed.device.type == "meta":
        return
    # the same int4 values, now stored two's complement instead of biased by 8
    assert torch.equal(formats.unpack_int4(packed, biased=False), formats.unpack_int4(original, biased=True))


@SETTINGS
@given(tensors(torch.int32, ranks={3}, last_dims=st.sampled_from([4, 8, 12, 16])))
def test_encode_and_reorder(packed):
    objection = refusal(packed, torch.int32, "packed", min_rank=2)
    if not objection and not packed.is_contiguous():
        objection = "packed must be contiguous"
    if not objection and packed.dim() != 3:
        objection = "packed must have rank 3"
    if not objection and (packed.shape[-1] * 8) % formats.GEMM_CHUNK:
        objection = f"K={packed.shape[-1] * 8} weights per row"
    if objection:
        assert_refused(lambda: ops.encode_and_reorder_int4b_grouped(packed), [packed], objection)
        return
    event(f"accepted on {packed.device.type}")
    original = packed.clone()
    w, strides = ops.encode_and_reorder_int4b_grouped(packed)
    E, N, words = packed.shape
    assert tuple(w.shape) == formats.gemm_layout_shape(E, N, words * 8) and w.dtype == torch.int32
    assert tuple(strides.shape) == (E, 3) and strides.dtype == torch.int64
    if packed.device.type == "meta":
        return
    assert same_bits(packed, original)                         # out of place: input untouched
    assert torch.equal(formats.decode_gemm_layout(w), formats.unpack_int4(packed, biased=False))
    assert torch.equal(strides, formats.gemm_layout_strides(E, N, words * 8))


@SETTINGS
@given(tensors(torch.bfloat16, ranks={2, 3, 4}))
def test_convert_scales_to_fp8(scales):
    objection = refusal(scales, torch.bfloat16, "scales", min_rank=2)
    if not objection and scales.shape[-1] == 0:
        objection = "scales has 0 groups"
    if objection:
        assert_refused(lambda: ops.convert_bf16_scales_to_fp8(scales), [scales], objection)
        return
    event(f"accepted on {scales.device.type}")
    scales = scales.abs()                                       # group scales are >= 0
    fp8, chan = ops.convert_bf16_scales_to_fp8(scales)
    assert fp8.shape == scales.shape and fp8.dtype == FP8
    assert tuple(chan.shape) == tuple(scales.shape[:-1]) + (1,) and chan.dtype == torch.float32
    if scales.device.type == "meta":
        return
    ref_fp8, ref_chan = formats.convert_bf16_scales_to_fp8(scales)
    assert same_bits(fp8, ref_fp8) and same_bits(chan, ref_chan)
    # and what they stand for: each scale to e4m3's precision (2^-4 relative) or below its floor
    back = fp8.float() * chan
    floor = chan * 2**-9                                        # e4m3's smallest subnormal, x chan
    assert ((back - scales.float()).abs() <= scales.float() * 2**-4 + floor).all()


@SETTINGS
@given(tensors(torch.bfloat16, ranks={2}, last_dims=st.sampled_from([2, 4, 6, 10, 64])), st.booleans())
def test_quantize_and_silu_mul_quantize(x, silu):
    op = ops.silu_mul_quantize_fp8 if silu else ops.quantize_fp8_per_token
    objection = refusal(x, torch.bfloat16, "x", rank=2)
    if not objection and silu and x.shape[1] % 2:
        objection = f"x has {x.shape[1]} columns; it must be even"
    if objection:
        assert_refused(lambda: op(x), [x], objection)
        return
    event(f"accepted on {x.device.type}")
    q, scale = op(x)
    cols = x.shape[1] // 2 if silu else x.shape[1]
    assert q.shape == (x.shape[0], cols) and q.dtype == FP8
    assert scale.shape == (x.shape[0], 1) and scale.dtype == torch.float32
    if x.device.type == "meta":
        return
    ref_q, ref_scale = (reference.silu_mul_quantize_fp8 if silu else formats.quantize_fp8_per_token)(x)
    assert same_bits(q, ref_q) and same_bits(scale, ref_scale)
    source = reference.silu_mul(x) if silu else x.float()
    want_scale = torch.clamp(source.abs().amax(dim=1, keepdim=True) / 448, min=formats.FP8_MIN_SCALE) \
        if cols else torch.full_like(scale, formats.FP8_MIN_SCALE)
    assert torch.equal(scale, want_scale)


@st.composite
def scatter_calls(draw):
    """(x, flat_to_sorted) for quantize_scatter_fp8: x any tensor near bf16 [T, K]; the positions
    a permutation of T * top_k rows or a spoiled one (dtype, rank, T, no slots)."""
    x = draw(tensors(torch.bfloat16, ranks={2}, last_dims=st.sampled_from([0, 2, 7, 64])))
    T = x.shape[0] if x.dim() else 0
    k = draw(st.integers(1, 4))
    f2s = torch.randperm(T * k, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))))
    f2s = f2s.to(torch.int32).view(T, k)
    spoil = draw(st.sampled_from([None, None, "dtype", "rank", "T", "no slots"]))
    if spoil == "dtype":
        f2s = f2s.long()
    elif spoil == "rank":
        f2s = f2s.reshape(-1)
    elif spoil == "T":
        f2s = torch.zeros((T + 1, k), dtype=torch.int32)
    elif spoil == "no slots":
        f2s = torch.zeros((T, 0), dtype=torch.int32)
    return x, f2s.to(x.device)


@SETTINGS
@given(scatter_calls())
def test_quantize_scatter(case):
    x, f2s = case
    objection = refusal(x, torch.bfloat16, "x", rank=2) or refusal(f2s, torch.int32, "flat_to_sorted", rank=2)
    if not objection and f2s.shape[0] != x.shape[0]:
        objection = f"flat_to_sorted has {f2s.shape[0]} rows but x has {x.shape[0]} tokens"
    if not objection and f2s.shape[1] == 0:
        objection = "flat_to_sorted has 0 columns"
    if objection:
        assert_refused(lambda: ops.quantize_scatter_fp8(x, f2s), [x, f2s], objection)
        return
    event(f"accepted on {x.device.type}")
    a, a_scale = ops.quantize_scatter_fp8(x, f2s)
    T, K = x.shape
    assert a.shape == (f2s.numel(), K) and a.dtype == FP8
    assert a_scale.shape == (f2s.numel(), 1) and a_scale.dtype == torch.float32
    if x.device.type == "meta":
        return
    q, scale = formats.quantize_fp8_per_token(x)
    rows = f2s.long()
    for j in range(f2s.shape[1]):           # row f2s[t, j] is token t, for every slot j
        assert same_bits(a[rows[:, j]], q) and same_bits(a_scale[rows[:, j]], scale)


# ------------------------------------------------------------------------------------------
# the grouped GEMM: a valid call, or one argument spoiled
# ------------------------------------------------------------------------------------------
SPOILERS = {
    "none": (None, None),
    "a dtype": (lambda c: c.update(a=c["a"].view(torch.uint8)), "a must have dtype torch.float8_e4m3fn"),
    "a rank": (lambda c: c.update(a=c["a"][None]), "a must have rank 2"),
    "a_scale dtype": (lambda c: c.update(a_scale=c["a_scale"].double()), "a_scale must have dtype torch.float32"),
    "a_scale shape": (lambda c: c.update(a_scale=c["a_scale"].reshape(-1)), "a_scale must have shape"),
    "w dtype": (lambda c: c.update(w=c["w"].view(torch.float32)), "w must have dtype torch.int32"),
    "w words": (lambda c: c.update(w=c["w"][..., :-1].contiguous()), "activations and weights must share K"),
    # every other word of a twice-as-wide tensor: non-contiguous for any E (a transpose round
    # trip is contiguous again when E == 1)
    "w noncontiguous": (lambda c: c.update(w=torch.stack([c["w"], c["w"]], dim=-1)[..., 0]),
                        "w must be contiguous"),
    "group size": (lambda c: c.update(group_size=96), "group_size=96 is not supported"),
    "offsets dtype": (lambda c: c.update(expert_offsets=c["expert_offsets"].int()),
                      "expert_offsets must have dtype torch.int64"),
    "offsets shape": (lambda c: c.update(expert_offsets=c["expert_offsets"][:-1]), "expert_offsets must have shape"),
    "scale shape": (lambda c: c.update(w_scale=c["w_scale"][:, :1].contiguous()), "w_scale must have shape"),
    "scale dtype": (lambda c: c.update(w_scale=c["w_scale"].float()), "w_scale must have dtype"),
    "scale on meta": (lambda c: c.update(w_scale=c["w_scale"].to("meta")), "w_scale is on meta"),
}


@st.composite
def gemm_calls(draw):
    G = draw(st.sampled_from(formats.SUPPORTED_GROUP_SIZES))
    E, N = draw(st.integers(1, 4)), draw(st.integers(2, 24))
    K = G * draw(st.integers(1, 3))
    R = draw(st.integers(0, 40))
    mode = draw(st.sampled_from(["fp8", "exact"]))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    seed = draw(st.integers(0, 2**31 - 1))
    spoil = "none" if draw(st.booleans()) else draw(st.sampled_from(sorted(set(SPOILERS) - {"none"})))
    g = torch.Generator().manual_seed(seed)
    packed, scale, _ = w4a8.testing.random_w4_weights(E, N, K, G, generator=g)
    w, _ = formats.encode_gemm_layout(formats.uint4b8_to_signed_int4(packed))
    if mode == "fp8":
        w_scale, chan = formats.convert_bf16_scales_to_fp8(scale)
    else:
        w_scale, chan = scale, None
    a, a_scale = formats.quantize_fp8_per_token(torch.randn(R, K, generator=g).to(torch.bfloat16))
    cuts = torch.sort(torch.randint(0, R + 1, (E - 1,), generator=g)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), R)])
    call = dict(a=a, a_scale=a_scale, w=w, w_scale=w_scale, w_chan_scale=chan, expert_offsets=offsets,
                group_size=G)
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    action, message = SPOILERS[spoil]
    if action is not None and spoil == "scale on meta" and device == "meta":
        action, message = None, None                            # nothing to spoil on meta
    if action is not None:
        action(call)
    return call, message


@SETTINGS
@given(gemm_calls())
def test_grouped_gemm(case):
    call, message = case
    run = lambda: ops.grouped_gemm(**call)  # noqa: E731
    inputs = [v for v in call.values() if isinstance(v, torch.Tensor)]
    if message is not None:
        assert_refused(run, inputs, message)
        return
    event(f"accepted on {call['a'].device.type}")
    before = [t.clone() for t in inputs]
    out = run()
    R, N = call["a"].shape[0], call["w"].shape[1]
    assert out.shape == (R, N) and out.dtype == torch.bfloat16
    if out.device.type == "meta":
        return
    assert all(same_bits(a, b) for a, b in zip(before, inputs))
    q = formats.decode_gemm_layout(call["w"])
    ref = reference.grouped_gemm(call["a"], call["a_scale"], q, call["w_scale"], call["w_chan_scale"],
                                 call["expert_offsets"], call["group_size"])
    assert same_bits(out, ref.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------
# NaN in the forward stays in its token
# ------------------------------------------------------------------------------------------
def _layer(E, H, I, G, scoring, device, seed):
    kwargs = dict(scoring="sigmoid", n_group=2, topk_group=1) if scoring == "sigmoid" else {}
    moe = w4a8.W4A8MoE(E, 2, H, I, group_size=G, device=device, **kwargs)
    w4a8.testing.random_checkpoint_(moe, seed)
    moe.process_weights_after_loading()
    return moe


def _nan_containment(device, T, bad_token, where, scoring, seed):
    E, H, I, G = 4, 64, 64, 32
    moe = _layer(E, H, I, G, scoring, device, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, E, generator=g)
    clean = moe(x.to(device), logits.to(device)).cpu()
    value = {"nan-x": float("nan"), "inf-x": float("inf"), "nan-logit": float("nan")}[where]
    if where.endswith("-x"):
        x[bad_token, int(torch.randint(H, (1,), generator=g))] = value
    else:
        logits[bad_token, int(torch.randint(E, (1,), generator=g))] = value
    with w4a8.value_checks(False):
        out = moe(x.to(device), logits.to(device)).cpu()
    others = [t for t in range(T) if t != bad_token]
    finite = torch.isfinite(out[bad_token])
    if where == "nan-logit" and scoring == "sigmoid" and device == "cuda":
        # the CUDA top-k never selects a NaN score (every comparison with it is false), so the
        # token is routed among its finite logits: its row is wholly finite or wholly not
        assert finite.all() or not finite.any()
    else:
        assert not finite.all()
    assert same_bits(out[others], clean[others])


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(1, 24), st.data(), st.sampled_from(["nan-x", "inf-x", "nan-logit"]),
       st.sampled_from(["softmax", "sigmoid"]), st.integers(0, 2**31 - 1))
def test_nan_stays_in_its_token_cpu(T, data, where, scoring, seed):
    _nan_containment("cpu", T, data.draw(st.integers(0, T - 1)), where, scoring, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["nan-x", "inf-x", "nan-logit"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_nan_stays_in_its_token_cuda(where, scoring, seed):
    for T, bad in ((1, 0), (7, 3), (300, 299)):
        _nan_containment("cuda", T, bad, where, scoring, seed)
