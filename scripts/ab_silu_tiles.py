"""A/B of silu_mul_quantize_fp8's tiles on the GPU: CUDA-graph replays (L2 flushed) of GLM-4.6's
I = 1536 at several row counts, each tile beside the bytes floor (read 2I bf16, write I fp8 + a
scale per row, at the device-to-device copy rate measured in the run).

    python scripts/ab_silu_tiles.py [--rows 8 8192 65536] [--reps 60]
"""
import argparse

import torch

from inductor_w4a8 import bench
from inductor_w4a8.launch import silu_mul_quant
from inductor_w4a8.timing import graph_bench_us

TILES = {"default": None, "one chunk, 8 warps": (2048, 1, 8), "warp a row, 6 x 256": (256, 6, 1),
         "two passes, 4 warps": (1024, 0, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="*", default=[8, 8192, 65536])
    p.add_argument("--reps", type=int, default=60)
    args = p.parse_args()
    I = 1536
    hbm = bench.measure_ceilings().hbm_tbps
    print(f"HBM {hbm:.2f} TB/s (copy, measured now)\n| rows | tile | us | floor us | default tile |")
    for R in args.rows:
        x = (torch.randn(R, 2 * I, device="cuda") * 3).to(torch.bfloat16)
        for name, tile in TILES.items():
            us = graph_bench_us(lambda: silu_mul_quant.silu_mul_quantize_fp8(x, tile=tile), reps=args.reps)
            floor = R * (2 * I * 2 + I + 4) / (hbm * 1e6)
            print(f"| {R} | {name} | {us:.1f} | {floor:.1f} | {silu_mul_quant.silu_mul_tile(R, I)} |",
                  flush=True)


if __name__ == "__main__":
    main()
