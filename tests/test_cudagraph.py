"""capture_sizes and CUDAGraphRunner.

CPU (CI): the capture-size list's properties (pinned with expecttest for 8192), user lists
validated, the runner's padding / chunking / static buffers (on CPU it runs the function on the
padded static buffers without graphs), eager and compiled.
CUDA (`-m cuda`): graph replay vs eager at every capture size and each boundary +-1 (small
layer), the GLM-4.6 layer at 1, 512, 513, 4096, 8191, 8192 through the compiled module, the
capture report, and compute-sanitizer memcheck on a replay at 8192.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import expecttest
import pytest
import torch
from torch._dynamo.utils import counters

from inductor_w4a8.cudagraph import (MAX_CAPTURE_SIZES, MAX_PADDING_WASTE, CUDAGraphRunner, _ReplayByRerun,
                                     capture_sizes, padded_size, padding_waste)
from inductor_w4a8.testing import rel_error

from compile_utils import GLM, SMALL, make_inputs, make_moe
from compile_utils import fresh_dynamo  # noqa: F401  (autouse fixture)

MAXES = (1, 2, 3, 7, 8, 100, 255, 256, 257, 300, 1000, 4096, 8191, 8192, 20000, 65536)


def boundaries(sizes):
    """Every capture size and each one +-1, within 1..max."""
    out = set()
    for s in sizes:
        out.update({s - 1, s, s + 1})
    return sorted(t for t in out if 1 <= t <= sizes[-1])


# ============================================================================================
# capture_sizes
# ============================================================================================
@pytest.mark.parametrize("max_tokens", MAXES)
def test_capture_sizes_properties(max_tokens):
    sizes = capture_sizes(max_tokens)
    assert sizes == sorted(set(sizes)), "sorted and unique"
    assert sizes[0] == 1 and sizes[-1] == max_tokens
    assert len(sizes) <= MAX_CAPTURE_SIZES
    assert all(isinstance(s, int) for s in sizes)
    worst = max((padding_waste(sizes, T) for T in range(257, max_tokens + 1)), default=0.0)
    assert worst <= MAX_PADDING_WASTE, worst
    for T in (1, max_tokens, (max_tokens + 1) // 2):
        assert T <= padded_size(sizes, T) <= max_tokens


class TestCaptureSizesPinned(expecttest.TestCase):
    def test_default_8192(self):
        sizes = capture_sizes()
        self.assertEqual(sizes, capture_sizes(8192))
        self.assertExpectedInline(f"{len(sizes)}: {sizes}", """\
71: [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152, 160, 168, 176, 184, 192, 200, 208, 216, 224, 232, 240, 248, 256, 288, 320, 352, 384, 416, 448, 480, 512, 576, 640, 704, 768, 864, 960, 1056, 1152, 1280, 1408, 1536, 1728, 1920, 2112, 2304, 2560, 2816, 3072, 3456, 3840, 4224, 4608, 5120, 5632, 6144, 6912, 7680, 8192]""")


def test_user_sizes_validated():
    assert capture_sizes(512, [64, 8, 8, 1, 64, 256]) == [1, 8, 64, 256, 512]  # dedup, sort, max added
    assert capture_sizes(100, (100, 1)) == [1, 100]
    with pytest.warns(UserWarning, match=r"\[600, 1000\] exceed"):
        assert capture_sizes(512, [1000, 16, 600]) == [16, 512]  # capped at the max
    assert capture_sizes(8192, list(range(1, 96))) == list(range(1, 96)) + [8192]
    with pytest.raises(ValueError, match="at most 96"):
        capture_sizes(8192, list(range(1, 97)))
    for bad in ([0], [-4], [2.5], [True], ["8"], [None]):
        with pytest.raises((TypeError, ValueError)):
            capture_sizes(512, bad)
    with pytest.raises(TypeError):
        capture_sizes(512, "1,2,4")
    with pytest.raises(TypeError):
        capture_sizes(512, 64)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8192", None])
def test_max_validated(bad):
    with pytest.raises((TypeError, ValueError)):
        capture_sizes(bad)
    with pytest.raises((TypeError, ValueError)):
        CUDAGraphRunner(lambda x: x, max_num_batched_tokens=bad)


def test_too_many_default_sizes_refused():
    with pytest.raises(ValueError, match="more than 96"):
        capture_sizes(10**6)


def test_padded_size():
    sizes = capture_sizes(8192)
    assert padded_size(sizes, 1) == 1 and padded_size(sizes, 3) == 4 and padded_size(sizes, 257) == 288
    assert padded_size(sizes, 8191) == 8192 and padded_size(sizes, 8192) == 8192
    with pytest.raises(ValueError, match="exceed"):
        padded_size(sizes, 8193)


# ============================================================================================
# the runner on CPU (no graphs): padding, chunking, static buffers
# ============================================================================================
class Recorder:
    """fn(x, logits) that records the padded inputs it saw and returns rows tagged by value."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, logits):
        self.seen.append((x.shape[0], x.clone(), logits.clone()))
        return x * 2, logits.sum(-1, keepdim=True)


def test_runner_pads_with_zeros_and_chunks():
    fn = Recorder()
    runner = CUDAGraphRunner(fn, max_num_batched_tokens=64, progress=False)
    x, logits = torch.randn(40, 8), torch.randn(40, 3)
    y, s = runner(x, logits)
    assert runner.captured and runner.report["num_graphs"] == 0 and runner.sizes == capture_sizes(64)
    assert torch.equal(y, x * 2) and torch.equal(s, logits.sum(-1, keepdim=True))
    size, px, pl = fn.seen[-1]
    assert size == 40 == runner.padded_size(40)
    # a smaller batch after a larger one: the rows past T are zeros again, not stale tokens
    y, s = runner(x[:33], logits[:33])
    size, px, pl = fn.seen[-1]
    assert size == 40 and torch.equal(px[:33], x[:33]) and torch.all(px[33:] == 0) and torch.all(pl[33:] == 0)
    assert torch.equal(y, x[:33] * 2)
    # above the max: chunks of at most the max
    big, big_logits = torch.randn(150, 8), torch.randn(150, 3)
    n0 = len(fn.seen)
    y, s = runner(big, big_logits)
    assert [t for t, _, _ in fn.seen[n0:]] == [64, 64, 24]
    assert torch.equal(y, big * 2) and torch.equal(s, big_logits.sum(-1, keepdim=True))
    # no tokens
    y, s = runner(big[:0], big_logits[:0])
    assert y.shape == (0, 8) and s.shape == (0, 1)


def test_runner_refuses_bad_inputs():
    runner = CUDAGraphRunner(lambda x, l: x, max_num_batched_tokens=16, progress=False)
    with pytest.raises(TypeError, match="Tensor"):
        runner(torch.randn(4, 2), 3)
    with pytest.raises(ValueError, match="share the token count"):
        runner(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="scalar"):
        runner(torch.tensor(1.0))
    with pytest.raises(TypeError, match="call it with"):
        runner()
    runner(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="captured for"):
        runner(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="captured for"):
        runner(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2))
    with pytest.raises(TypeError, match="captured with 2 arguments"):
        runner(torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="already captured"):
        runner.capture(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(TypeError, match="callable"):
        CUDAGraphRunner(3)
    with pytest.raises(ValueError, match="use_cuda_graphs=True needs CUDA"):
        CUDAGraphRunner(lambda x: x, 8, use_cuda_graphs=True).capture(torch.randn(2, 2))
    bad_out = CUDAGraphRunner(lambda x: x[:1], 8, progress=False)
    with pytest.raises(ValueError, match="token count as first dim"):
        bad_out(torch.randn(3, 2))


def test_graph_bookkeeping_with_replay_stand_in():
    """The CUDA-graph path (warm-up, capture into the shared output buffer, replay from the
    static buffers) with a stand-in whose replay re-runs the captured body on the same buffers."""
    fn = Recorder()
    runner = CUDAGraphRunner(fn, max_num_batched_tokens=64, use_cuda_graphs=_ReplayByRerun("cpu"),
                             warmup_iters=2, progress=False)
    report = runner.capture(torch.randn(3, 8), torch.randn(3, 3))
    sizes = capture_sizes(64)
    assert report["num_graphs"] == len(sizes) == len(runner.graphs)
    # largest first, each warmed up twice, then captured once
    assert [t for t, _, _ in fn.seen[:4]] == [64, 64, 64, 56]
    assert [b.shape for b in runner.static_output_buffers] == [(64, 8), (64, 1)]
    assert report["static_bytes"] == 4 * 64 * (8 + 3) + 4 * 64 * (8 + 1)  # fp32 inputs, outputs
    for T in (1, 3, 5, 33, 64, 65, 130):
        x, logits = torch.randn(T, 8), torch.randn(T, 3)
        n0 = len(fn.seen)
        y, s = runner(x, logits)
        assert torch.equal(y, x * 2) and torch.equal(s, logits.sum(-1, keepdim=True)), T
        assert len(fn.seen) - n0 == -(-T // 64)  # one replay per chunk
    view_runner = CUDAGraphRunner(fn, 64, use_cuda_graphs=_ReplayByRerun("cpu"), copy_outputs=False,
                                  progress=False)
    y, _ = view_runner(torch.randn(10, 8), torch.randn(10, 3))
    assert y.data_ptr() == view_runner.static_output_buffers[0].data_ptr()


def test_graph_path_refuses_outputs_that_change_shape():
    def fn(x):
        return x if x.shape[0] > 8 else x[:, :1]
    runner = CUDAGraphRunner(fn, 16, use_cuda_graphs=_ReplayByRerun("cpu"), progress=False)
    with pytest.raises(ValueError, match="changed shape"):
        runner(torch.randn(2, 4))


@pytest.mark.parametrize("compiled", [False, True])
def test_runner_moe_cpu_matches_eager_at_boundaries(compiled):
    moe = make_moe()
    fn = torch.compile(moe, backend="w4a8", fullgraph=True) if compiled else moe
    runner = CUDAGraphRunner(fn, max_num_batched_tokens=100, progress=False)
    for T in boundaries(runner.sizes) + [101, 250]:
        x, logits = make_inputs(T, moe)
        out = runner(x, logits)
        ref = moe(x, logits)
        # padding rows never change real rows: on CPU the result is bitwise the unpadded one
        assert torch.equal(out, ref), f"T={T}: {rel_error(out, ref)}"
    if compiled:
        assert counters["stats"]["unique_graphs"] <= 2
        assert sum(counters["graph_break"].values()) == 0


# ============================================================================================
# CUDA
# ============================================================================================
cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_replay_matches_eager_at_every_size_and_boundary(compiled):
    moe = make_moe(SMALL, device="cuda")
    fn = torch.compile(moe, backend="w4a8", fullgraph=True) if compiled else moe
    runner = CUDAGraphRunner(fn, max_num_batched_tokens=8192, progress=False)
    report = runner.capture(*make_inputs(1, moe))
    assert report["num_graphs"] == len(runner.sizes) == len(capture_sizes(8192))
    # the pool holds at least the largest intermediate of one 8192-token forward (the w13 output),
    # and far less than one copy per graph
    w13_out = 8192 * moe.top_k * 2 * moe.intermediate_size * 2
    assert w13_out <= report["pool_bytes"] < len(runner.sizes) * w13_out, report
    H, E = moe.hidden_size, moe.num_experts
    assert report["static_bytes"] == 8192 * (2 * H + 4 * E) + 8192 * 2 * H
    for T in boundaries(runner.sizes) + [8193, 16384 + 5]:
        x, logits = make_inputs(T, moe)
        out = runner(x, logits)
        ref = moe(x, logits)
        assert rel_error(out, ref) < 1e-2, f"T={T}: {rel_error(out, ref)}"
    if compiled:
        assert counters["stats"]["unique_graphs"] <= 2
        assert sum(counters["graph_break"].values()) == 0


@cuda
def test_cuda_replay_views_and_static_buffers():
    moe = make_moe(SMALL, device="cuda")
    runner = CUDAGraphRunner(moe, max_num_batched_tokens=512, copy_outputs=False, progress=False)
    x, logits = make_inputs(300, moe)
    out = runner(x, logits)
    assert out.data_ptr() == runner.static_output_buffers[0].data_ptr()
    ref = moe(x, logits)
    assert rel_error(out, ref) < 1e-2
    buffers = [b.data_ptr() for b in runner.static_inputs]
    runner(*make_inputs(5, moe))
    assert [b.data_ptr() for b in runner.static_inputs] == buffers  # reused, never reallocated
    assert torch.all(runner.static_inputs[0][5:8] == 0)


@cuda
@pytest.mark.slow
def test_cuda_glm46_layer_replay():
    moe = make_moe(GLM, device="cuda")
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True)
    runner = CUDAGraphRunner(compiled, max_num_batched_tokens=8192, progress=True)
    report = runner.capture(*make_inputs(1, moe))
    print(f"GLM-4.6 layer: {report}")
    assert report["num_graphs"] == len(capture_sizes(8192))
    for T in (1, 512, 513, 4096, 8191, 8192):
        x, logits = make_inputs(T, moe)
        out = runner(x, logits)
        ref = moe(x, logits)
        assert torch.isfinite(out).all()
        assert rel_error(out, ref) < 2e-2, f"T={T}: {rel_error(out, ref)}"
    assert counters["stats"]["unique_graphs"] <= 2


@cuda
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_cuda_memcheck_replay_at_8192():
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "graph_report.py")
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable, script,
           "--memcheck"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout + proc.stderr


def test_serve_loop_example_on_cpu(capsys):
    """examples/serve_loop.py end to end on CPU (the runner without graphs): every batch of the
    stream, oversized ones included, matches eager, and the three paths are timed per class."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "serve_loop.py"
    spec = importlib.util.spec_from_file_location("serve_loop", path)
    serve_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_loop)
    stream = serve_loop.batch_stream(40, 256, seed=0)
    assert 256 in stream and any(T > 256 for T in stream) and any(T <= 16 for T in stream)
    assert serve_loop.main(["--layer", "small", "--device", "cpu", "--steps", "12", "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "all 12 batches match eager (worst relative error 0.00e+00)" in out
    for path_name in ("eager:", "compiled:", "compiled+graphs:"):
        assert path_name in out
