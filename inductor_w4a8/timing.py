"""GPU timing helpers shared by the benchmarks: L2 flushed before every timed call.

`graph_bench_us` times CUDA-graph replays (how a serving loop runs a kernel: no host overhead);
`do_bench_us` times eager calls (triton.testing.do_bench); `events_us` times eager calls with
CUDA events and a synchronize after each (for callables that are graphs themselves or launch
their own). All return medians in microseconds.
"""
from __future__ import annotations

import statistics

import torch

from .testing import capture_cuda_graph

FLUSH_BYTES = 256 << 20   # more than any GPU's L2: writing it evicts what a previous call left
_FLUSH: dict = {}


def flush_l2() -> None:
    """Evicts the L2 by writing FLUSH_BYTES on the current stream (the buffer is made once)."""
    _FLUSH.setdefault("buf", torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")).zero_()


def do_bench_us(fn, rep=200) -> float:
    """Median us of eager calls (triton.testing.do_bench, L2 flushed before each call)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def events_us(fn, reps=50, warmup=5) -> float:
    """Median us of eager calls, each between two CUDA events after an L2 flush, synchronized."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def graph_bench_us(fn, reps=60, fallback_rep_ms=200) -> float:
    """Median us of CUDA-graph replays of `fn`, with the L2 flushed before every replay. Falls
    back to do_bench when `fn` cannot be captured."""
    fn()   # a first call outside the graph: any compile or autotune happens here
    try:
        graph, _ = capture_cuda_graph(fn)
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize()
        return do_bench_us(fn, rep=fallback_rep_ms)
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush_l2()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) * 1e3 for start, end in events)
    del graph
    return times[len(times) // 2]
