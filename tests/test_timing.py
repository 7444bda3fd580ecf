"""inductor_w4a8/timing.py: the benchmarks' GPU timers (CUDA only)."""
import pytest
import torch

from inductor_w4a8 import timing


@pytest.mark.cuda
def test_cuda_timers_measure_work_and_fall_back_where_capture_fails():
    x = torch.randn(4096, 4096, device="cuda")
    small = timing.graph_bench_us(lambda: x.add_(1.0), reps=10)
    big = timing.graph_bench_us(lambda: x @ x, reps=10)
    assert 0 < small < big                      # a matmul of 4096^2 takes longer than an add
    assert 0 < timing.events_us(lambda: x @ x, reps=5, warmup=1)
    # a host sync inside: not capturable, timed eagerly instead of raising
    assert timing.graph_bench_us(lambda: x.sum().item(), fallback_rep_ms=20) > 0


@pytest.mark.cuda
def test_cuda_flush_l2_writes_more_than_the_l2():
    timing.flush_l2()
    torch.cuda.synchronize()
    assert timing.FLUSH_BYTES > torch.cuda.get_device_properties(0).L2_cache_size
