"""A/B of the decode block's launch chain on the GPU: CUDA-graph replay of the GLM-4.6 block at
a few tokens with programmatic dependent launch on / off, beside the block's two GEMMs alone;
then the kernels of one replay (torch.profiler): name, duration, and the gap since the previous
kernel ended (negative with PDL: the next kernel was launched before this one ended). The two
GEMMs alone are timed once, with the default PDL setting, and subtracted from both replays.

    python scripts/ab_block_decode.py [--m 1 8] [--reps 60]
"""
import argparse
import torch

from inductor_w4a8 import eager_graphs
from inductor_w4a8.bench_block import gemms_fn, glm_layer
from inductor_w4a8.launch import _common
from inductor_w4a8.testing import capture_cuda_graph
from inductor_w4a8.timing import graph_bench_us


def kernel_timeline(fn):
    """[(name, us, gap us)] of the kernels of one replay of a graph of fn."""
    graph, _ = capture_cuda_graph(fn)
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                    key=lambda e: e.time_range.start)
    per_replay = len(events) // 5
    last = events[-per_replay:]
    rows, end = [], None
    for e in last:
        rows.append((e.name[:48], e.time_range.elapsed_us(),
                     0.0 if end is None else e.time_range.start - end))
        end = e.time_range.end
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=60)
    args = p.parse_args()
    layer = glm_layer("cuda")
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    with torch.no_grad(), eager_graphs.graph_replay(False):
        for M in args.m:
            g = torch.Generator(device="cuda").manual_seed(M)
            x = torch.randn(M, layer.hidden_size, device="cuda", generator=g).to(torch.bfloat16)
            logits = torch.randn(M, layer.num_experts, device="cuda", generator=g)
            gemm_us = graph_bench_us(gemms_fn(layer, x, logits), reps=args.reps)
            ref = None
            for pdl in (False, True):
                with _common.pdl_launches(pdl):
                    out = layer(x, logits)
                    ref = out if ref is None else ref
                    assert torch.equal(out, ref), "outputs differ with and without PDL"
                    us = graph_bench_us(lambda: layer(x, logits), reps=args.reps)
                print(f"M={M} pdl={pdl!s:5} replay {us:7.1f} us  two GEMMs {gemm_us:6.1f}  "
                      f"non-GEMM {us - gemm_us:5.1f}")
            for pdl in (False, True):
                with _common.pdl_launches(pdl):
                    print(f"M={M} pdl={pdl} kernels of one replay (us, gap us):")
                    for name, us, gap in kernel_timeline(lambda: layer(x, logits)):
                        print(f"   {us:7.2f} {gap:6.2f}  {name}")


if __name__ == "__main__":
    main()
