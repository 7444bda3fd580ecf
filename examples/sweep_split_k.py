"""Device script: split-K tile variants of the W4A8 grouped GEMM on GLM-4.6 w13 + w2 at small M.

    python examples/sweep_split_k.py [--m 1 2 4 16 64 256] [--variants bm,bn,w,st,ppsm,gps,sk ...]

For each M: CUDA-graph median us (L2 flushed, bench.graph_bench_us) of w13 + w2 per variant, with
each variant's output checked against an fp64 reference on the experts hit (all at M <= 2, a few
otherwise). Prints JSON lines; writes $OUT/sweep_split_k.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import inductor_w4a8  # noqa: F401
from inductor_w4a8 import bench, formats
from inductor_w4a8.checks import value_checks
from inductor_w4a8.launch.gemm_tiles import GemmTile, choose_tile
from inductor_w4a8.launch.grouped_gemm import grouped_gemm

DEFAULT_VARIANTS = [
    "16,64,4,3,4,2,1",   # the v5 small-M tile (no split)
    "16,64,4,3,4,2,2", "16,64,4,3,4,2,4", "16,64,4,3,4,2,8",
    "16,64,4,3,4,1,4", "16,64,4,3,8,2,4",
    "16,64,4,4,4,2,4", "16,64,4,4,4,2,1",
]


def ref_rows(a, a_scale, wt, off, experts):
    seff = formats.effective_group_scales(wt.s_fp8, wt.chan)
    offl = off.tolist()
    N = wt.w.shape[1]
    ref = torch.full((a.shape[0], N), float("nan"), dtype=torch.float64, device=a.device)
    for e in experts:
        lo, hi = offl[e], offl[e + 1]
        if hi > lo:
            q = formats.decode_gemm_layout(wt.w[e:e + 1])[0].double()
            wd = q * seff[e].double().repeat_interleave(wt.group_size, dim=-1)
            ref[lo:hi] = (a[lo:hi].double() @ wd.T) * a_scale[lo:hi].double()
    return ref


def err(out, ref):
    keep = ~torch.isnan(ref[:, 0])
    o, r = out[keep].double(), ref[keep].double()
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[1, 2, 4, 16, 64, 256])
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    p.add_argument("--heavy-m", type=int, default=16, help="M above which only --heavy variants run")
    p.add_argument("--heavy", nargs="*", default=["16,64,4,3,4,2,1", "16,64,4,3,4,2,2",
                                                   "16,64,4,4,4,2,1", "16,64,4,3,4,2,4"])
    p.add_argument("--warm", action="store_true", help="only compile (run each variant once)")
    args = p.parse_args()
    out_dir = os.environ.get("OUT", ".")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, H, I, k = 160, 5120, 1536, 8
    if os.environ.get("SWEEP_SMOKE"):   # CPU smoke test of this script (TRITON_INTERPRET=1)
        dev, E, H, I = torch.device("cpu"), 20, 512, 128
        bench.graph_bench_us = lambda fn, reps=0: (time.perf_counter(), fn(), time.perf_counter())[0] * 0
    gemms = {"w13": (2 * I, H), "w2": (H, I)}
    weights = {n: bench.random_weights(E, N, K, 128, dev) for n, (N, K) in gemms.items()}
    rows = []
    t0 = time.time()
    for M in args.m:
        R = M * k
        off = bench.route(M, E, k, dev)
        acts = {n: bench.random_activations(R, K, dev) for n, (N, K) in gemms.items()}
        hit = [e for e in range(E) if int(off[e + 1]) > int(off[e])]
        check = hit if M <= 2 else hit[:3] + hit[-2:]
        if args.warm:
            for v in args.variants if M <= args.heavy_m else args.heavy:
                for n, (N, K) in gemms.items():
                    grouped_gemm(*acts[n], weights[n].w, weights[n].s_fp8, weights[n].chan, off, 128,
                                 tile=GemmTile(*map(int, v.split(","))))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"warm M={M} t={time.time() - t0:.0f}s", flush=True)
            continue
        refs = {n: ref_rows(*acts[n], weights[n], off, check) for n in gemms}
        nbytes = sum(bench.gemm_bytes(R, off, N, K) for N, K in gemms.values())
        flops = sum(2.0 * R * N * K for N, K in gemms.values())
        row = {"M": M, "floor": round(bench.floor_us(flops, nbytes), 1),
               "auto_tile": "/".join(",".join(map(str, dataclasses_astuple(choose_tile(R, N, K, E, 128))))
                                for N, K in gemms.values())}
        variants = args.variants if M <= args.heavy_m else args.heavy
        for v in ["auto"] + variants:
            per = {}
            for n, (N, K) in gemms.items():
                tile = choose_tile(R, N, K, E, 128) if v == "auto" else GemmTile(*map(int, v.split(",")))
                a, a_scale = acts[n]
                wt = weights[n]
                fn = lambda a=a, a_scale=a_scale, wt=wt, tile=tile: grouped_gemm(  # noqa: E731
                    a, a_scale, wt.w, wt.s_fp8, wt.chan, off, 128, tile=tile)
                try:
                    e = err(fn(), refs[n])
                    with value_checks(False):
                        us = bench.graph_bench_us(fn, reps=40)
                    per[n] = (us, e)
                except Exception as exc:  # noqa: BLE001
                    print(f"M={M} {v} {n} failed: {repr(exc)[:300]}", flush=True)
            if len(per) == 2:
                row[v] = {"us": round(per["w13"][0] + per["w2"][0], 1),
                          "w13": round(per["w13"][0], 1), "w2": round(per["w2"][0], 1),
                          "err": max(per["w13"][1], per["w2"][1]),
                          "ok": max(per["w13"][1], per["w2"][1]) <= 3e-3}
                # both GEMMs in one graph, as bench.py times them
                if v == "auto":
                    fns = []
                    for n in gemms:
                        a, a_scale = acts[n]
                        wt = weights[n]
                        fns.append(lambda a=a, a_scale=a_scale, wt=wt: torch.ops.w4a8.grouped_gemm(
                            a, a_scale, wt.w, wt.s_fp8, wt.chan, off, 128))
                    with value_checks(False):
                        row["auto_op_both"] = round(bench.graph_bench_us(lambda: [f() for f in fns], reps=60), 1)
        print(json.dumps(row), f"t={time.time() - t0:.0f}s", flush=True)
        rows.append(row)
    with open(os.path.join(out_dir, "sweep_split_k.json"), "w") as f:
        json.dump(rows, f, indent=1)


def dataclasses_astuple(t):
    import dataclasses
    return dataclasses.astuple(t)


if __name__ == "__main__":
    main()
