"""Run under `compute-sanitizer --tool memcheck --error-exitcode 1 python examples/memcheck_grouped_gemm.py`.

The grouped GEMM on the GLM-4.6 8192-token case (w13 and w2, both scale modes), on E=60 with
empty experts and odd N / K, and with garbage offsets; memcheck must report no error. GPU only.
"""
import argparse
import sys

import torch

import inductor_w4a8  # noqa: F401
from inductor_w4a8 import bench
from inductor_w4a8.cli import require_cuda
from inductor_w4a8.launch.grouped_gemm import grouped_gemm
from inductor_w4a8.testing import random_expert_offsets


def main(argv=None):
    parser = argparse.ArgumentParser(prog="memcheck_grouped_gemm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    require_cuda(parser.prog, "the memcheck run of the grouped GEMM")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for (E, N, K, T, k) in ((160, 3072, 5120, 8192, 8), (160, 5120, 1536, 8192, 8), (60, 200, 352, 1000, 4)):
        G = 128 if K % 128 == 0 else 32
        wt = bench.random_weights(E, N, K, G, dev)
        off = bench.route(T, E, k, dev) if E == 160 else \
            random_expert_offsets(T * k, E, empty_experts=7).to(dev)
        a, a_scale = bench.random_activations(T * k, K, dev)
        for s, c in ((wt.s_fp8, wt.chan), (wt.s_bf16, None)):
            out = grouped_gemm(a, a_scale, wt.w, s, c, off, G)
            torch.cuda.synchronize()
            print(f"E={E} N={N} K={K} R={T * k} finite={bool(torch.isfinite(out).all())}", flush=True)
        bad = torch.tensor([0] + [10**12, -7] * (E // 2) + [T * k] * (E - 2 * (E // 2)), device=dev)
        grouped_gemm(a, a_scale, wt.w, wt.s_fp8, wt.chan, bad, G)
        torch.cuda.synchronize()
        print(f"E={E} garbage offsets ok", flush=True)
    print("memcheck script done")


if __name__ == "__main__":
    sys.exit(main())
