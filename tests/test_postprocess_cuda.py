"""GPU tests of post-processing (run on the device machine: `pytest -m cuda`).

* The four ops on CUDA: opcheck, bit exact vs the CPU ops on small and boundary shapes, every bf16
  value through the hardware fp8 converts, CUDA-graph capture of the runtime quantizer.
* Real GLM-4.6 sizes (E=160, w13 [160, 3072, 5120], w2 [160, 5120, 1536], group 128), checked in
  expert chunks so that the references fit: integer weight math against `formats` run by torch
  on the GPU (same integer ops as on the CPU) plus a sampled chunk against the CPU ops; scales and
  activations against the CPU in full.
* The race test: the layer is post-processed on a non-default stream that lags behind a
  `torch.cuda._sleep`, and must come out exact; with the checkpoint loaded on that lagging stream
  too, any kernel launched on another stream reads or writes the wrong data. Two negative controls
  (marked DELIBERATE WRONG-STREAM) move one launcher to a side stream and show the test then sees
  a wrong result, so the race test can fail.
"""
import contextlib

import pytest
import torch
from torch import nn

import inductor_w4a8  # noqa: F401  (registers the ops)
from inductor_w4a8 import formats
from inductor_w4a8.postprocess import CHECKPOINT_NAMES, process_weights_after_loading
from inductor_w4a8.testing import every_bf16_fp8_range_row, opcheck, poisoned_empty

pytestmark = pytest.mark.cuda

ops = torch.ops.w4a8
FP8 = torch.float8_e4m3fn
GLM = dict(E=160, H=5120, I=1536, G=128)
SLEEP_CYCLES = 1_000_000_000  # ~0.5 s of GPU clock: far longer than enqueuing a layer's kernels
CHUNK = 16  # experts per reference chunk


def u8(t):
    return t.view(torch.uint8) if t.dtype == FP8 else t


def equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(u8(a), u8(b))


def random_words(*shape, device="cpu", generator=None):
    return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device, generator=generator)


def random_scales(*shape, generator=None):
    return (torch.rand(shape, generator=generator) * 0.02 + 1e-4).to(torch.bfloat16)


def checkpoint(E, H, I, G, seed=0):
    """CPU tensors of a compressed-tensors W4A8 MoE checkpoint (random words: every nibble value)."""
    g = torch.Generator().manual_seed(seed)
    return {"w13_weight_packed": random_words(E, 2 * I, H // 8, generator=g),
            "w13_weight_scale": random_scales(E, 2 * I, H // G, generator=g),
            "w2_weight_packed": random_words(E, H, I // 8, generator=g),
            "w2_weight_scale": random_scales(E, H, I // G, generator=g)}


def make_layer(ckpt, G, scale_mode, device):
    layer = nn.Module()
    for name in CHECKPOINT_NAMES:
        setattr(layer, name, nn.Parameter(ckpt[name].to(device, copy=True), requires_grad=False))
    layer.group_size, layer.scale_mode = G, scale_mode
    return layer


PROCESSED = [f"{p}{s}" for p in ("w13", "w2") for s in ("_weight", "_weight_strides", "_group_scale", "_chan_scale")]


def assert_layers_equal(gpu_layer, cpu_layer):
    for name in PROCESSED:
        a, b = getattr(gpu_layer, name), getattr(cpu_layer, name)
        if b is None:
            assert a is None, name
        else:
            assert a.device.type == "cuda" and equal(a.cpu(), b), name


# ------------------------------------------------------------------------------------------
# ops on CUDA: opcheck and small / boundary shapes vs the CPU ops
# ------------------------------------------------------------------------------------------
def test_opcheck_cuda():
    opcheck(ops.convert_packed_uint4b8_to_signed_int4_, (random_words(2, 3, 8, device="cuda"),))
    opcheck(ops.encode_and_reorder_int4b_grouped, (random_words(2, 3, 8, device="cuda"),))
    for shape in [(4, 3), (2, 5, 12), (2, 3, 4, 4)]:
        opcheck(ops.convert_bf16_scales_to_fp8, (random_scales(*shape).cuda(),))
    for T, K in [(1, 64), (5, 320), (0, 128)]:
        opcheck(ops.quantize_fp8_per_token, ((torch.randn(T, K, device="cuda") * 3).to(torch.bfloat16),))


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6), (2, 2, 2, 8), (7, 4099)])
def test_convert_cuda_vs_cpu(shape):
    cpu = random_words(*shape)
    gpu = cpu.cuda()
    ops.convert_packed_uint4b8_to_signed_int4_(cpu)
    ops.convert_packed_uint4b8_to_signed_int4_(gpu)
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("shape", [(6, 40), (3, 7, 12), (2, 3, 4, 4), (5, 300), (64, 1)])
def test_scale_convert_cuda_vs_cpu(shape):
    s = random_scales(*shape)
    s.view(-1, shape[-1])[0] = 0
    with poisoned_empty():
        fp8, chan = ops.convert_bf16_scales_to_fp8(s.cuda())
    ref_fp8, ref_chan = ops.convert_bf16_scales_to_fp8(s)
    assert equal(fp8.cpu(), ref_fp8) and equal(chan.cpu(), ref_chan)


@pytest.mark.parametrize("T", [1, 511, 512, 513, 8191, 8192])
@pytest.mark.parametrize("K", [1536, 5120])
def test_quantize_cuda_vs_cpu(T, K):
    x = (torch.randn(T, K) * torch.rand(T, 1) * 10).to(torch.bfloat16)
    x[0] = 0
    with poisoned_empty():
        q, s = ops.quantize_fp8_per_token(x.cuda())
    rq, rs = ops.quantize_fp8_per_token(x)
    assert equal(q.cpu(), rq) and equal(s.cpu(), rs)


@pytest.mark.parametrize("K", [1, 100, 2049, 12288])
def test_quantize_cuda_odd_k(K):
    x = (torch.randn(3, K) * 7).to(torch.bfloat16)
    q, s = ops.quantize_fp8_per_token(x.cuda())
    rq, rs = ops.quantize_fp8_per_token(x)
    assert equal(q.cpu(), rq) and equal(s.cpu(), rs)


def test_quantize_empty_cuda():
    q, s = ops.quantize_fp8_per_token(torch.empty(0, 5120, dtype=torch.bfloat16, device="cuda"))
    assert q.shape == (0, 5120) and s.shape == (0, 1)


def test_hardware_fp8_converts_on_every_bf16_value():
    # scale 1 exactly (the row holds 448): every bf16 value in range meets the hardware convert,
    # ties between e4m3 neighbours and the subnormal range included
    row = every_bf16_fp8_range_row()
    q, s = ops.quantize_fp8_per_token(row.cuda())
    rq, rs = ops.quantize_fp8_per_token(row)
    assert float(s) == 1.0 and equal(q.cpu(), rq)
    fp8, chan = ops.convert_bf16_scales_to_fp8(row.cuda())
    rfp8, rchan = ops.convert_bf16_scales_to_fp8(row)
    assert equal(fp8.cpu(), rfp8) and equal(chan.cpu(), rchan)


def test_quantize_random_fp32_quotients_cuda():
    # scales that are not powers of two: x / scale covers arbitrary fp32 values
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, 512, generator=g) * torch.rand(4096, 1, generator=g) ** 4 * 100).to(torch.bfloat16)
    q, s = ops.quantize_fp8_per_token(x.cuda())
    rq, rs = ops.quantize_fp8_per_token(x)
    assert equal(q.cpu(), rq) and equal(s.cpu(), rs)


def test_quantize_captured_in_cuda_graph():
    x = torch.zeros(64, 5120, dtype=torch.bfloat16, device="cuda")
    ops.quantize_fp8_per_token(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = ops.quantize_fp8_per_token(x)
    new = (torch.randn(64, 5120) * 4).to(torch.bfloat16)
    x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    rq, rs = ops.quantize_fp8_per_token(new)
    assert equal(q.cpu(), rq) and equal(s.cpu(), rs)


def test_launch_follows_tensor_device_and_current_stream():
    # the result is right when a side stream is current and the inputs were made on another one
    x = (torch.randn(32, 256, device="cuda") * 3).to(torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES // 10)
        q, s = ops.quantize_fp8_per_token(x)
    torch.cuda.current_stream().wait_stream(side)
    rq, rs = ops.quantize_fp8_per_token(x.cpu())
    assert equal(q.cpu(), rq) and equal(s.cpu(), rs)


# ------------------------------------------------------------------------------------------
# real GLM-4.6 sizes
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glm_ckpt():
    return checkpoint(GLM["E"], GLM["H"], GLM["I"], GLM["G"], seed=46)


XOR = torch.tensor(formats.NIBBLE_SIGN_FLIP, dtype=torch.int32)  # (v - 8) & 0xF == v ^ 8 per nibble


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w13_weight_packed", "w2_weight_packed"])
def test_convert_glm_size(glm_ckpt, name):
    cpu = glm_ckpt[name]
    gpu = cpu.cuda()
    ops.convert_packed_uint4b8_to_signed_int4_(gpu)
    E = cpu.shape[0]
    # every word: the per-nibble identity (proved equal to formats on CPU in test_formats)
    for e0 in range(0, E, CHUNK):
        assert torch.equal(gpu[e0:e0 + CHUNK], cpu[e0:e0 + CHUNK].cuda() ^ XOR.cuda()), e0
    # sampled expert chunks: the CPU op itself
    for e0 in (0, E // 2, E - 4):
        ref = cpu[e0:e0 + 4].clone()
        ops.convert_packed_uint4b8_to_signed_int4_(ref)
        assert torch.equal(gpu[e0:e0 + 4].cpu(), ref), e0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w13_weight_scale", "w2_weight_scale"])
def test_scale_convert_glm_size(glm_ckpt, name):
    s = glm_ckpt[name]
    fp8, chan = ops.convert_bf16_scales_to_fp8(s.cuda())
    ref_fp8, ref_chan = ops.convert_bf16_scales_to_fp8(s)
    assert equal(fp8.cpu(), ref_fp8) and equal(chan.cpu(), ref_chan)


@pytest.mark.slow
def test_postprocess_glm_layer(glm_ckpt):
    """A full GLM-4.6 layer on the GPU in both scale modes, exact against the references."""
    G, E = GLM["G"], GLM["E"]
    results = {}
    for mode in ("fp8", "exact"):
        layer = make_layer(glm_ckpt, G, mode, "cuda")
        process_weights_after_loading(layer)
        assert layer.weights_processed and not hasattr(layer, "w13_weight_packed")
        results[mode] = layer
    fp8_layer, exact_layer = results["fp8"], results["exact"]
    for p in ("w13", "w2"):
        packed = glm_ckpt[f"{p}_weight_packed"]
        w = fp8_layer.get_parameter(f"{p}_weight")
        strides = fp8_layer.get_parameter(f"{p}_weight_strides")
        N, K = packed.shape[1], packed.shape[2] * 8
        assert tuple(w.shape) == formats.gemm_layout_shape(E, N, K)
        assert torch.equal(strides.cpu(), formats.gemm_layout_strides(E, N, K))
        # weights: formats' integer math, run by torch on the GPU in expert chunks
        for e0 in range(0, E, CHUNK):
            chunk = packed[e0:e0 + CHUNK].cuda()
            ref_w, _ = formats.encode_gemm_layout(formats.uint4b8_to_signed_int4(chunk))
            assert torch.equal(w[e0:e0 + CHUNK], ref_w), (p, e0)
            del chunk, ref_w
        # and a sampled chunk against the CPU ops
        ref = packed[-4:].clone()
        ops.convert_packed_uint4b8_to_signed_int4_(ref)
        ref_w, _ = ops.encode_and_reorder_int4b_grouped(ref)
        assert torch.equal(w[-4:].cpu(), ref_w)
        # the two modes share the weights exactly
        assert torch.equal(exact_layer.get_parameter(f"{p}_weight"), w)
        assert torch.equal(exact_layer.get_parameter(f"{p}_weight_strides"), strides)
        # scales: the CPU op in full (fp8 mode), the checkpoint as loaded (exact mode)
        scale = glm_ckpt[f"{p}_weight_scale"]
        ref_fp8, ref_chan = ops.convert_bf16_scales_to_fp8(scale)
        assert equal(getattr(fp8_layer, f"{p}_group_scale").cpu(), ref_fp8)
        assert equal(getattr(fp8_layer, f"{p}_chan_scale").cpu(), ref_chan)
        assert equal(getattr(exact_layer, f"{p}_group_scale").cpu(), scale)
        assert getattr(exact_layer, f"{p}_chan_scale") is None


# ------------------------------------------------------------------------------------------
# the race test: post-processing on a lagging non-default stream
# ------------------------------------------------------------------------------------------
RACE = dict(E=16, H=GLM["H"], I=GLM["I"], G=GLM["G"])  # real rows and K, fewer experts


@pytest.fixture(scope="module")
def race_case():
    """(checkpoint on CPU, the layer post-processed on CPU, per scale mode)."""
    ckpt = checkpoint(**RACE, seed=7)
    expected = {}
    for mode in ("fp8", "exact"):
        layer = make_layer(ckpt, RACE["G"], mode, "cpu")
        process_weights_after_loading(layer)
        expected[mode] = layer
        # compile every kernel for these shapes now: a Triton compile inside the timed window
        # would hold the host longer than the sleep and void the test
        process_weights_after_loading(make_layer(ckpt, RACE["G"], mode, "cuda"))
    torch.cuda.synchronize()
    return ckpt, expected


def _process_on_lagging_stream(ckpt, mode, load_on_stream):
    """Runs process_weights_after_loading with a fresh non-default stream current, behind a sleep.

    load_on_stream=False: the layer is made on the default stream (the brief's setting).
    load_on_stream=True: the layer is made holding garbage and the checkpoint is copied into it on
    the lagging stream, as a loader using that stream would; then every post-processing kernel
    must run on that stream to see the loaded data.
    Returns (layer, still_busy): still_busy is True when the stream was still sleeping when
    process_weights_after_loading returned (so nothing in it waited for the device).
    """
    default = torch.cuda.current_stream()
    if load_on_stream:
        layer = make_layer({n: torch.full_like(t, 0x1234) if t.dtype == torch.int32 else torch.full_like(t, 3.0)
                            for n, t in ckpt.items()}, RACE["G"], mode, "cuda")
        src = {n: t.cuda() for n, t in ckpt.items()}
    else:
        layer = make_layer(ckpt, RACE["G"], mode, "cuda")
    s = torch.cuda.Stream()  # PyTorch's pool streams are created cudaStreamNonBlocking
    s.wait_stream(default)
    with torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES)
        if load_on_stream:
            for name in CHECKPOINT_NAMES:
                getattr(layer, name).data.copy_(src[name])
        process_weights_after_loading(layer)
        still_busy = not s.query()
    default.wait_stream(s)
    torch.cuda.synchronize()
    return layer, still_busy


@pytest.mark.parametrize("load_on_stream", [False, True], ids=["made-on-default", "loaded-on-stream"])
@pytest.mark.parametrize("mode", ["fp8", "exact"])
def test_race_lagging_stream_is_exact(race_case, mode, load_on_stream):
    ckpt, expected = race_case
    layer, still_busy = _process_on_lagging_stream(ckpt, mode, load_on_stream)
    assert still_busy, "the stream finished its sleep before processing returned: no lag, no test"
    assert_layers_equal(layer, expected[mode])


@contextlib.contextmanager
def _on_side_stream(monkeypatch, module, attr):
    """DELIBERATE WRONG-STREAM: launch module.attr on a fresh side stream that waits for nothing
    (the bug class of the system we replace: a kernel on another stream than its inputs')."""
    original = getattr(module, attr)

    def wrong_stream(*args, **kwargs):
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            out = original(*args, **kwargs)
        current.wait_stream(side)  # later work waits for it; its inputs were read too early
        return out

    monkeypatch.setattr(module, attr, wrong_stream)
    yield


def _differs(layer, expected):
    return any(not equal(getattr(layer, n).cpu(), getattr(expected, n))
               for n in ("w13_weight", "w2_weight"))


def test_race_negative_control_wrong_stream_reorder(race_case, monkeypatch):
    """DELIBERATE WRONG-STREAM demonstration: the encode/reorder launcher moved to a side stream
    reads the packed weights before the (lagging) in-place conversion has run. The race test's
    comparison must then see wrong weights; if this test fails, the race test cannot fail."""
    import inductor_w4a8.launch.int4_reorder as int4_reorder
    ckpt, expected = race_case
    with _on_side_stream(monkeypatch, int4_reorder, "encode_and_reorder"):
        layer, still_busy = _process_on_lagging_stream(ckpt, "fp8", load_on_stream=False)
    assert still_busy
    assert _differs(layer, expected["fp8"]), "the wrong-stream launch went unnoticed"


def test_race_negative_control_wrong_stream_convert(race_case, monkeypatch):
    """DELIBERATE WRONG-STREAM demonstration: the in-place uint4b8 conversion moved to a side
    stream runs before the checkpoint is loaded on the lagging stream, so the loaded weights are
    never converted. The race test's comparison must then see wrong weights."""
    import inductor_w4a8.launch.int4_convert as int4_convert
    ckpt, expected = race_case
    with _on_side_stream(monkeypatch, int4_convert, "convert_uint4b8_to_signed_"):
        layer, still_busy = _process_on_lagging_stream(ckpt, "fp8", load_on_stream=True)
    assert still_busy
    assert _differs(layer, expected["fp8"]), "the wrong-stream launch went unnoticed"
