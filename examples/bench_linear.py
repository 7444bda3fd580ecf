"""W4A8Linear vs bf16 F.linear at GLM-4.6's attention projection shapes (GPU only).

GLM-4.6: hidden 5120, 96 query heads and 8 key/value heads of 128 -> q_proj 5120 -> 12288,
k_proj / v_proj 5120 -> 1024, o_proj 12288 -> 5120. Median microseconds of CUDA-graph replays with
the L2 flushed before each (inductor_w4a8.bench.graph_bench_us), at 1 and 8192 tokens, plus the
normwise error of ours against the fp64 product of its own fp8 activations and int4 weights.

    python examples/bench_linear.py [--tokens 1 8192] [--scale-mode exact|fp8] [--json FILE]
"""
import argparse
import json
import sys

import torch

from inductor_w4a8.cli import output_file, positive_int, require_cuda
import torch.nn.functional as F

SHAPES = {"q_proj": (12288, 5120), "k_proj": (1024, 5120), "v_proj": (1024, 5120), "o_proj": (5120, 12288)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_linear.py", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 8192], help="token counts to time")
    p.add_argument("--scale-mode", choices=["exact", "fp8"], default="exact", help="W4A8Linear scale mode")
    p.add_argument("--json", type=output_file, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    require_cuda("bench_linear.py")
    import inductor_w4a8 as w4a8
    from inductor_w4a8 import formats
    from inductor_w4a8.bench import graph_bench_us
    from inductor_w4a8.testing import rel_error
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, scale_mode {args.scale_mode}")
    print(f"{'proj':8} {'N x K':>12} {'tokens':>6} {'bf16 us':>9} {'w4a8 us':>9} {'speedup':>8} {'rel err':>9}")
    for name, (N, K) in SHAPES.items():
        w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        lin = w4a8.W4A8Linear.from_float(w, group_size=128, scale_mode=args.scale_mode)
        packed, scale = formats.quantize_w4(w, 128)
        wq = formats.dequantize_w4(formats.unpack_int4(packed, biased=True), scale, 128, dtype=torch.float64)
        for T in args.tokens:
            x = torch.randn(T, K, device="cuda").to(torch.bfloat16)
            with torch.no_grad():
                xq, xs = formats.quantize_fp8_per_token(x)
                err = rel_error(lin(x), (xq.double() * xs.double()) @ wq.T)
                bf16 = graph_bench_us(lambda: F.linear(x, w))
                ours = graph_bench_us(lambda: lin(x))
            rows.append({"proj": name, "N": N, "K": K, "tokens": T, "bf16_us": bf16, "w4a8_us": ours,
                         "rel_error": err, "scale_mode": args.scale_mode})
            print(f"{name:8} {f'{N}x{K}':>12} {T:>6} {bf16:>9.1f} {ours:>9.1f} {bf16 / ours:>7.2f}x {err:>9.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
