"""GPU check and timing of the Gluon wgmma grouped GEMM beside today's Triton kernel.

Run on an H100/H200 from the repo root: `python examples/bench_wgmma_gemm.py [out_dir]`.
1. Correctness of every candidate wgmma tile vs the fp64 reference of the kernel's own inputs
   (boundary row counts, odd group counts, empty experts, both scale modes, poisoned outputs),
   and garbage offsets (memory safety: must not fault).
2. GLM-4.6 w13 + w2 at M tokens x top-8: median us of CUDA-graph replays with the L2 flushed
   (bench.graph_bench_us), today's table tile vs each wgmma tile. Writes wgmma_bench.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_grouped_gemm import make_case, poisoned_out, ref_of  # noqa: E402

from inductor_w4a8 import bench  # noqa: E402
from inductor_w4a8.cli import output_dir, require_cuda  # noqa: E402
from inductor_w4a8.launch import grouped_gemm as launcher  # noqa: E402
from inductor_w4a8.launch.gemm_tiles import WGMMA_TILE, GemmTile, choose_tile  # noqa: E402
from inductor_w4a8.testing import GEMM_TOL_GPU, rel_error  # noqa: E402

CANDIDATES = {
    "wgmma_tile": WGMMA_TILE,                                   # 128 x 128, 8 warps, 4 stages
    "w128x128s5": GemmTile(128, 128, 8, 5, 1, kernel="wgmma"),
    "w64x64s6p2": GemmTile(64, 64, 4, 6, 2, kernel="wgmma"),
    "w128x64s4p2": GemmTile(128, 64, 4, 4, 2, kernel="wgmma"),
}
CASES = [  # R, E, N, K, G, empty, mode
    (1, 1, 200, 384, 128, 0, "fp8"), (511, 7, 72, 352, 32, 2, "exact"),
    (512, 7, 264, 640, 128, 2, "fp8"), (513, 60, 136, 192, 64, 20, "exact"),
    (8191, 160, 200, 384, 128, 53, "fp8"), (8192, 60, 3072 // 8, 1536, 128, 0, "exact"),
    (4096, 16, 512, 1024, 128, 0, "fp8"),
]


def check(log):
    ok = True
    gen = torch.Generator().manual_seed(int(time.time()))
    for name, tile in CANDIDATES.items():
        for R, E, N, K, G, empty, mode in CASES:
            args = make_case(R, E, N, K, G, empty=empty, mode=mode, device="cuda", gen=gen)
            out = launcher.grouped_gemm(*args, tile=tile, out=poisoned_out(args))
            err = rel_error(out, ref_of(args))
            good = bool(err <= GEMM_TOL_GPU)
            ok &= good
            log(f"check {name} R={R} E={E} N={N} K={K} G={G} {mode}: err {err:.3e} {'ok' if good else 'FAIL'}")
        a, a_scale, wg, ws, chan, _, G = make_case(300, 6, 64, 384, 128, mode="fp8", device="cuda")
        for off in ([0, 10**12, -5, 300, 7, 2, 300], [-(10**12), 3, 3, 3, 3, 3, 10**12], [300] * 7):
            launcher.grouped_gemm(a, a_scale, wg, ws, chan, torch.tensor(off, device="cuda"), G,
                                  tile=tile)
        torch.cuda.synchronize()
        log(f"check {name} garbage offsets: no fault")
    return ok


def timings(log, m_list=(1, 64, 256, 1024, 4096, 8192)):
    E, H, I, top_k = 160, 5120, 1536, 8
    w13 = bench.random_weights(E, 2 * I, H, 128, "cuda")
    w2 = bench.random_weights(E, H, I, 128, "cuda")
    rows = []
    for M in m_list:
        R = M * top_k
        off = bench.route(M, E, top_k, "cuda")
        a1, s1 = bench.random_activations(R, H, "cuda")
        a2, s2 = bench.random_activations(R, I, "cuda")
        row = {"M": M}
        variants = [("table", None)] + list(CANDIDATES.items())
        for name, tile in variants:
            for mode in ("fp8", "exact") if name in ("table", "wgmma_tile") else ("fp8",):
                t = 0.0
                for a, s, wt in ((a1, s1, w13), (a2, s2, w2)):
                    K = a.shape[1]
                    tl_ = tile or choose_tile(R, wt.shape[1], K, E, 128)
                    t += bench.graph_bench_us(bench.ours_fn(a, s, wt, off, mode, tile=tl_))
                row[f"{name}/{mode}"] = round(t, 1)
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_wgmma_gemm.py", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", type=output_dir, default=".",
                   help="where wgmma_bench.json goes (default: .)")
    out_dir = p.parse_args(argv).out_dir
    require_cuda("bench_wgmma_gemm.py")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
    log(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ok = check(log)
    rows = timings(log)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(out_dir, "wgmma_bench.json"), "w") as f:
        json.dump({"checks_ok": ok, "rows": rows, "log": lines}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
