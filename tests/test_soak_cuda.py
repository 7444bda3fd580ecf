"""GPU soak of the serving path: 10,000 random batch sizes in 1..12,000 through CUDAGraphRunner
(CUDA graphs up to 8192 tokens, larger batches chunked) against eager, bitwise equal, with device
memory flat after warm-up. A small layer keeps it to a few minutes on one H200.

    pytest -m "cuda and slow" tests/test_soak_cuda.py -s     (-s prints the numbers)
"""
import random
import time

import pytest
import torch

import inductor_w4a8 as w4a8
from inductor_w4a8.testing import random_checkpoint_

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

LAYER = dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, group_size=64,
             scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
STEPS, MAX_T, GRAPH_MAX = 10_000, 12_000, 8192
WARMUP_STEPS = 200


def held_memory() -> tuple[int, int]:
    """(allocated, reserved) bytes once the allocator has returned its unused cached blocks: what
    live tensors and the graphs' pool hold, not what earlier temporaries left cached."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def test_soak_random_sizes_bitwise_and_flat_memory(seed):
    device = torch.device("cuda")
    moe = w4a8.W4A8MoE(**LAYER, device=device)
    random_checkpoint_(moe, seed)
    moe.process_weights_after_loading()
    runner = w4a8.CUDAGraphRunner(torch.compile(moe, backend="w4a8", fullgraph=True),
                                  max_num_batched_tokens=GRAPH_MAX, progress=False)
    g = torch.Generator(device=device).manual_seed(seed)
    # one pool of random rows; each step takes a window of it (no input allocations in the loop)
    x_all = torch.randn(2 * MAX_T, LAYER["hidden_size"], device=device, generator=g).to(torch.bfloat16)
    logits_all = torch.randn(2 * MAX_T, LAYER["num_experts"], device=device, generator=g)
    rng = random.Random(seed)
    sizes = [rng.randint(1, MAX_T) for _ in range(WARMUP_STEPS + STEPS)]
    sizes[WARMUP_STEPS:WARMUP_STEPS + 4] = [1, GRAPH_MAX, GRAPH_MAX + 1, MAX_T]   # the edges, surely
    starts = [rng.randint(0, MAX_T) for _ in sizes]

    def step(i: int) -> None:
        T, lo = sizes[i], starts[i]
        x, logits = x_all[lo:lo + T], logits_all[lo:lo + T]
        # the eager reference without its own graph cache (eager_graphs.py): the cache's bounded
        # captures would show up in this test's memory check, which is about the runner
        with w4a8.eager_graphs.graph_replay(False):
            out, ref = runner(x, logits), moe(x, logits)
        if not torch.equal(out, ref):
            bad = (out != ref).any(dim=1).nonzero().flatten()
            raise AssertionError(f"step {i}: T={T} (window {lo}): {bad.numel()} rows differ from eager, "
                                 f"first {bad[:5].tolist()}")

    with torch.no_grad(), w4a8.value_checks(False):
        t0 = time.perf_counter()
        runner.capture(x_all[:1], logits_all[:1])
        capture_s = time.perf_counter() - t0
        for i in range(WARMUP_STEPS):
            step(i)
        allocated0, reserved0 = held_memory()
        t0 = time.perf_counter()
        for i in range(WARMUP_STEPS, WARMUP_STEPS + STEPS):
            step(i)
        soak_s = time.perf_counter() - t0
        allocated1, reserved1 = held_memory()

    soaked = sizes[WARMUP_STEPS:]
    print(f"\nsoak: {STEPS} steps, T in 1..{MAX_T} ({sum(t > GRAPH_MAX for t in soaked)} chunked above "
          f"{GRAPH_MAX}), {runner.report['num_graphs']} graphs captured in {capture_s:.1f} s; soak "
          f"{soak_s:.1f} s ({1e3 * soak_s / STEPS:.2f} ms/step, eager + runner + compare); memory "
          f"allocated {allocated0} -> {allocated1} B, reserved {reserved0 >> 20} -> {reserved1 >> 20} MiB "
          f"(graph pool {runner.report['pool_bytes'] >> 20} MiB)")
    assert runner.report["num_graphs"] == len(runner.sizes) and runner.sizes[-1] == GRAPH_MAX
    assert allocated1 == allocated0, "the serving loop leaks device memory"
    assert reserved1 == reserved0, "the caching allocator holds more device memory after the soak"
