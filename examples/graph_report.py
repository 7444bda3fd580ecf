"""CUDA-graph and torch.compile report for the GLM-4.6 MoE layer (E=160, H=5120, I=1536, top-8).

    python examples/graph_report.py [--max-tokens 8192] [--gemm triton|extern] [--fuse default|none|all]
    compute-sanitizer --tool memcheck python examples/graph_report.py --memcheck [--full]

Prints:
  * capture of every size up to --max-tokens: graph count, capture time, warm-up/compile time,
    memory (caching-allocator pool and device memory lost);
  * decode-step time at M = 1 and 64 and the 8192-token prefill time for eager, compiled
    ("w4a8" backend) and compiled + CUDA-graph replay (through CUDAGraphRunner, input copies
    included, and the bare replay), each beside the sum of its kernels' times (torch.profiler);
  * with --memcheck: one replay at 8192 and 8191 tokens of a captured compiled layer, to run
    under compute-sanitizer (a reduced hidden size unless --full).
Times are medians over repeated runs with the L2 flushed before each (as docs/perf.md).
Writes graph_report_<gemm>_<fuse>.json to --out (default $OUT, else .); --kernels lists each
kernel. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import inductor_w4a8 as w4a8
from inductor_w4a8 import value_checks
from inductor_w4a8.cli import output_dir, positive_int, require_cuda
from inductor_w4a8.cudagraph import CUDAGraphRunner
from inductor_w4a8.testing import random_checkpoint_
from inductor_w4a8.timing import events_us

GLM = dict(num_experts=160, top_k=8, hidden_size=5120, intermediate_size=1536, group_size=128,
           scoring="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.5)


def build_layer(config: dict, device="cuda", seed=0) -> w4a8.W4A8MoE:
    """A processed layer of the given shape with random int4 words and scales."""
    moe = w4a8.W4A8MoE(**config, device=device)
    random_checkpoint_(moe, seed)
    moe.process_weights_after_loading()
    return moe


def inputs(T: int, moe, device="cuda", seed=1):
    g = torch.Generator(device=device).manual_seed(seed + T)
    x = torch.randn(T, moe.hidden_size, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, moe.num_experts, device=device, generator=g)
    return x, logits


def kernel_times_us(fn) -> list[tuple[str, float]]:
    """(name, GPU time) of every kernel one call of fn launches, in launch order (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = []
    for ev in prof.events():
        if getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA and \
                not ev.name.startswith(("Memcpy", "Memset", "cudaGraph")):
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            kernels.append((ev.name, us))
    return kernels


def fmt(us: float) -> str:
    return f"{us:9.1f} us"


def report(args) -> dict:
    device = torch.device("cuda")
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "gemm": args.gemm, "fuse": args.fuse, "max_tokens": args.max_tokens}
    print(f"device: {result['device']}, torch {torch.__version__}, layer GLM-4.6 "
          f"(E=160, H=5120, I=1536, top-8), w4a8.grouped_gemm={args.gemm}, w4a8.fuse={args.fuse}")
    moe = build_layer(GLM, device)
    options = {"w4a8.grouped_gemm": args.gemm, "w4a8.fuse": args.fuse}
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options=options)

    with value_checks(False):  # eager value checks synchronize; a serving loop turns them off
        t0 = time.perf_counter()
        runner = CUDAGraphRunner(compiled, max_num_batched_tokens=args.max_tokens, progress=True)
        cap = runner.capture(*inputs(1, moe))
        result["capture"] = {**cap, "sizes": len(cap["sizes"]), "total_s": time.perf_counter() - t0}
        print(f"\ncapture 1..{args.max_tokens}: {cap['num_graphs']} graphs, capture {cap['capture_s']:.1f} s, "
              f"warm-up (compile, autotune) {cap['warmup_s']:.1f} s, pool {cap['pool_bytes'] / 2**20:.0f} MiB, "
              f"device {cap['device_bytes'] / 2**20:.0f} MiB")
        from torch._dynamo.utils import counters
        result["dynamo_graphs"] = counters["stats"]["unique_graphs"]
        result["graph_breaks"] = sum(counters["graph_break"].values())
        print(f"dynamo: {result['dynamo_graphs']} compiled graphs, {result['graph_breaks']} graph breaks")

        rows = []
        print(f"\n{'tokens':>6} {'path':<22} {'time':>12} {'sum of kernels':>16} {'kernels':>8}")
        for T in args.tokens:
            x, logits = inputs(T, moe)
            torch._dynamo.mark_dynamic(x, 0) if T >= 2 else None
            size = runner.padded_size(min(T, args.max_tokens))
            graph = runner.graphs.get(size)
            paths = {
                "eager": lambda: moe(x, logits),
                "compiled": lambda: compiled(x, logits),
                "compiled+graph (runner)": lambda: runner(x, logits),
            }
            if graph is not None and T <= args.max_tokens:
                paths["compiled+graph (replay)"] = graph.replay
            for name, fn in paths.items():
                us = events_us(fn, reps=args.reps)
                kernels = kernel_times_us(fn)
                ksum = sum(t for _, t in kernels)
                rows.append({"tokens": T, "path": name, "us": us, "kernel_sum_us": ksum,
                             "kernels": len(kernels), "kernel_list": kernels})
                print(f"{T:>6} {name:<22} {fmt(us)} {fmt(ksum):>16} {len(kernels):>8}")
                if args.kernels and name in ("eager", "compiled"):
                    for kname, kus in kernels:
                        print(f"{'':>8}{kus:9.1f} us  {kname[:110]}")
            out, ref = runner(x, logits), moe(x, logits)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            rows.append({"tokens": T, "path": "check", "rel_error_vs_eager": err})
            print(f"{T:>6} {'graph vs eager':<22} rel. error {err:.2e}")
        result["rows"] = rows
    return result


def memcheck(args) -> None:
    """One capture at 8192 of the compiled layer and replays at 8192 / 8191 (for memcheck)."""
    config = dict(GLM) if args.full else {**GLM, "hidden_size": 1024, "intermediate_size": 512}
    moe = build_layer(config)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True,
                             options={"w4a8.grouped_gemm": args.gemm, "w4a8.fuse": args.fuse})
    with value_checks(False):
        runner = CUDAGraphRunner(compiled, max_num_batched_tokens=8192, capture_sizes=[8192], progress=False)
        for T in (8192, 8191):
            x, logits = inputs(T, moe)
            out = runner(x, logits)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), f"non-finite output at T={T}"
            print(f"memcheck replay T={T}: ok ({config['hidden_size']} hidden)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="graph_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=positive_int, default=8192, help="largest capture size")
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 64, 8192], help="token counts timed")
    p.add_argument("--gemm", choices=("triton", "extern"), default="triton",
                   help="grouped GEMM in compiled code: our Triton lowering or the extern op")
    p.add_argument("--fuse", default="default", help="w4a8.fuse option: default, none or all")
    p.add_argument("--reps", type=positive_int, default=50, help="timed replays per measurement (median)")
    p.add_argument("--out", type=output_dir, default=os.environ.get("OUT", "."),
                   help="folder of the JSON report (default: $OUT, else the current folder)")
    p.add_argument("--kernels", action="store_true", help="list each kernel of eager and compiled")
    p.add_argument("--memcheck", action="store_true", help="replays at 8192 for compute-sanitizer")
    p.add_argument("--full", action="store_true", help="--memcheck at the full GLM-4.6 size")
    args = p.parse_args(argv)
    require_cuda(p.prog, "the CUDA-graph report")
    if args.memcheck:
        memcheck(args)
        return 0
    result = report(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = os.path.join(args.out, f"graph_report_{args.gemm}_{args.fuse}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
