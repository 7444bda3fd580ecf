"""Host time of the eager W4A8MoE forward: per op and per forward, and where it goes.

    python examples/profile_eager.py                 # GPU: GLM-4.6 block (E=160, H=5120, I=1536)
    python examples/profile_eager.py --tokens 1 64   # token counts
    python examples/profile_eager.py --stub          # CPU: small block, kernels' math stubbed out

Prints, per token count:
* per forward: host us of one call with the device idle (synchronize, time the call, synchronize;
  median of --reps) for four settings: the dispatcher path (eager.direct_calls(False)) and the
  direct path (default; on CUDA at <= eager_graphs.MAX_TOKENS tokens that is the block's graph
  replay, eager_graphs.py), each with fast_launch on (default) and off (W4A8_FAST_LAUNCH=0 path);
* per op: host us of each op called through torch.ops.w4a8, directly with its checks, and
  directly without them (the direct path after its first call), on the block's own inputs;
* cProfile of the default forward: the top entries by total time.
With --stub (CPU) the ops' math is replaced by allocations of the right outputs, so the numbers
are the Python/dispatch/check overhead alone.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from inductor_w4a8.cli import positive_int, require_cuda

import inductor_w4a8 as w4a8
from inductor_w4a8 import eager, ops, testing
from inductor_w4a8.bench_block import GLM  # the benchmark's GLM-4.6 layer
from inductor_w4a8.launch import _common

SMALL = dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, group_size=64,
             scoring="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.5)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_us(fn, device, reps: int) -> float:
    """Median host us of one call of fn with the device idle before it."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync(device)
    return statistics.median(times)


def stub_math(monkeypatch_list):
    """Replace the ops' math by the fake kernels' allocations (CPU overhead measurements)."""
    from inductor_w4a8 import formats, reference
    fake = {
        "select_experts": lambda lg, b, k, *a: (lg.new_empty((lg.shape[0], k), dtype=torch.float32),
                                                 lg.new_zeros((lg.shape[0], k), dtype=torch.int32)),
        "sort_by_expert": lambda ids, E: (ids.new_zeros((ids.numel(),)), ids.new_zeros(ids.shape),
                                          torch.zeros(E + 1, dtype=torch.int64)),
        "quantize_scatter_fp8": lambda x, f2s: (x.new_empty((f2s.numel(), x.shape[1]), dtype=formats.FP8_DTYPE),
                                                x.new_empty((f2s.numel(), 1), dtype=torch.float32)),
        "silu_mul_quantize_fp8": lambda x: (x.new_empty((x.shape[0], x.shape[1] // 2), dtype=formats.FP8_DTYPE),
                                            x.new_empty((x.shape[0], 1), dtype=torch.float32)),
    }
    for name, fn in fake.items():
        monkeypatch_list.append((reference, name, getattr(reference, name)))
        setattr(reference, name, fn)
    gemm = lambda a, s, w, *r: a.new_empty((a.shape[0], w.shape[1]), dtype=torch.bfloat16)  # noqa: E731
    comb = lambda y, f2s, tw: y.new_empty((f2s.shape[0], y.shape[1]))  # noqa: E731
    for name, fn in (("grouped_gemm_cpu_math", gemm), ("combine_cpu_math", comb)):
        monkeypatch_list.append((ops, name, getattr(ops, name)))
        setattr(ops, name, fn)
    eager._tables.clear()


def per_op_rows(layer, x, logits, device, reps):
    """Host us per op: through the dispatcher, direct checked, direct unchecked."""
    rec_names = ("select_and_sort_experts", "quantize_scatter_fp8", "grouped_gemm",
                 "silu_mul_quantize_fp8", "combine")
    calls = []

    class Spy:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            fn = getattr(self.real, name)

            def record(*args):
                calls.append((name, args))
                return fn(*args)
            return record

    layer._run(Spy(torch.ops.w4a8), x, logits)
    checked, unchecked = eager._table(device.type)
    rows = []
    for name, args in calls:
        row = [name]
        for space in (torch.ops.w4a8, checked, unchecked):
            fn = getattr(space, name)
            row.append(host_us(lambda: fn(*args), device, reps))
        rows.append(row)
    assert [r[0] for r in rows][:2] == list(rec_names[:2])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="profile_eager.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, nargs="*", default=[1, 64, 8192])
    p.add_argument("--reps", type=positive_int, default=200)
    p.add_argument("--stub", action="store_true", help="CPU: small block, math stubbed out")
    p.add_argument("--top", type=positive_int, default=25, help="cProfile entries to print")
    args = p.parse_args(argv)
    if not args.stub:   # the real block needs the GPU; --stub is the CPU run
        require_cuda("profile_eager.py", "profiling without --stub")
    device = torch.device("cpu" if args.stub else "cuda")
    config = SMALL if device.type == "cpu" else GLM
    restore = []
    if device.type == "cpu":
        stub_math(restore)
    layer = w4a8.W4A8MoE(**config, device=device)
    testing.random_checkpoint_(layer, 0)
    layer.process_weights_after_loading()
    tokens = [t for t in args.tokens if device.type == "cuda" or t <= 512] or [1]
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (stubbed math)'}"
          f", torch {torch.__version__}, config {config}")
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, config["hidden_size"], device=device).to(torch.bfloat16)
            logits = torch.randn(T, config["num_experts"], device=device)
            print(f"\n## T = {T}\n\n| path | fast_launch | host us per forward |\n|---|---|---|")
            for direct in (False, True):
                for fast in (False, True):
                    _common.FAST_LAUNCH = fast
                    with eager.direct_calls(direct):
                        us = host_us(lambda: layer(x, logits), device, args.reps)
                    print(f"| {'direct' if direct else 'dispatcher'} | {'on' if fast else 'off'} | {us:.1f} |")
            _common.FAST_LAUNCH = True
            print("\n| op | dispatcher us | direct, checked us | direct, unchecked us |\n|---|---|---|---|")
            for name, a, b, c in per_op_rows(layer, x, logits, device, args.reps):
                print(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} |")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                layer(x, logits)
            prof.disable()
            sync(device)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\ncProfile, 50 default forwards (tottime):\n```\n{out.getvalue().strip()}\n```")
    for module, name, value in restore:
        setattr(module, name, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
