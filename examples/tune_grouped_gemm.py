"""Device session script for the W4A8 grouped GEMM: correctness, SASS, tile variants, peers.

    python examples/tune_grouped_gemm.py [--quick] [--m 1 64 ...] [--variants BM,BN,BK,...] [--out DIR]

1. correctness of the Triton kernel (asm and plain-op int4 unpack) against an fp32 reference
   on the GPU, small odd shapes and GLM-4.6 shapes (reference on a subset of experts);
2. the compiled kernel's resources and SASS instruction counts (QGMMA present?);
3. times of tile variants on the GLM-4.6 GEMMs (w13 + w2) at several M, beside FBGEMM: CUDA-graph
   replays by default, as `bench` times them (`--timing eager`: do_bench of eager calls).
--quick: the small correctness cases only and M in 1, 64, 1024 with fewer repetitions.
Prints as it goes; with --out (default: $OUT when set) writes tune_log.txt and the kernels'
TTGIR / SASS there, only when the whole run succeeded. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

import inductor_w4a8  # noqa: F401
from inductor_w4a8 import bench, formats
from inductor_w4a8.cli import output_dir, positive_int, require_cuda
from inductor_w4a8.launch import grouped_gemm as gg
from inductor_w4a8.launch import gemm_tiles
from inductor_w4a8.launch.gemm_tiles import GemmTile, choose_tile

# what --out receives at the end of a successful run: file name -> text
OUTPUT_FILES: dict[str, str] = {"tune_log.txt": ""}
QUICK_M = [1, 64, 1024]


def log(*args):
    msg = " ".join(str(a) for a in args)
    print(msg, flush=True)
    OUTPUT_FILES["tune_log.txt"] += msg + "\n"


def reference_fp32(a, a_scale, w, s, chan, offsets, G, experts=None):
    """fp32 reference (no TF32) for the experts listed (all by default); NaN rows elsewhere."""
    torch.backends.cuda.matmul.allow_tf32 = False
    R, K = a.shape
    E, N, _ = w.shape
    ref = torch.full((R, N), float("nan"), device=a.device)
    seff = formats.effective_group_scales(s, chan)
    off = offsets.tolist()
    for e in (range(E) if experts is None else experts):
        lo, hi = off[e], off[e + 1]
        if hi <= lo:
            continue
        q = formats.decode_gemm_layout(w[e:e + 1])[0].float()
        wd = q * seff[e].float().repeat_interleave(G, dim=-1)
        ref[lo:hi] = (a[lo:hi].float() @ wd.T) * a_scale[lo:hi]
    return ref


def rel_err_rows(out, ref):
    keep = ~torch.isnan(ref[:, 0]) if ref.shape[1] else torch.zeros(0, dtype=torch.bool)
    o, r = out[keep].double(), ref[keep].double()
    if not torch.isfinite(o).all():
        return float("inf")
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def check_correctness(quick=False):
    dev = torch.device("cuda")
    torch.manual_seed(1)
    cases = [  # (R, E, N, K, G, empty)
        (1, 1, 64, 128, 128, 0), (37, 7, 200, 384, 128, 2), (513, 7, 200, 352, 32, 1),
        (512, 60, 136, 192, 64, 10), (511, 160, 72, 256, 128, 40), (0, 5, 64, 128, 128, 0),
        (8191, 60, 264, 512, 128, 3), (8192, 7, 3072, 640, 128, 0),
    ]
    if quick:
        cases = [c for c in cases if c[0] <= 1024]
    ok = True
    for (R, E, N, K, G, empty) in cases:
        wt = bench.random_weights(E, N, K, G, dev)
        a, asc = bench.random_activations(R, K, dev)
        from inductor_w4a8.testing import random_expert_offsets
        off = random_expert_offsets(R, E, empty_experts=empty).to(dev)
        for mode in ("fp8", "exact"):
            s, c = (wt.s_fp8, wt.chan) if mode == "fp8" else (wt.s_bf16, None)
            ref = reference_fp32(a, asc, wt.w, s, c, off, G)
            for use_asm in (True, False):
                torch.empty(R * N + 1024, dtype=torch.bfloat16, device=dev).fill_(float("nan"))
                out = gg.grouped_gemm(a, asc, wt.w, s, c, off, G, use_asm=use_asm)
                err = rel_err_rows(out, ref) if R else 0.0
                good = err <= 3e-3
                ok &= good
                log(f"check R={R} E={E} N={N} K={K} G={G} empty={empty} {mode} asm={use_asm}: "
                    f"asm={use_asm} rel_err={err:.2e} {'OK' if good else 'FAIL'}")
    # GLM-4.6 w13 / w2 at 8192 tokens, reference on 6 experts
    for (N, K) in () if quick else ((3072, 5120), (5120, 1536)):
        wt = bench.random_weights(160, N, K, 128, dev)
        off = bench.route(8192, 160, 8, dev)
        a, asc = bench.random_activations(8192 * 8, K, dev)
        experts = [0, 1, 77, 158, 159, int(torch.argmax(off[1:] - off[:-1]))]
        apos = (a.view(torch.uint8) & 0x7F).view(a.dtype)   # all >= 0: worst case for the -8 * sum(a)
        for mode, aa in (("fp8", a), ("exact", a), ("fp8+", apos)):
            s, c = (wt.s_fp8, wt.chan) if mode != "exact" else (wt.s_bf16, None)
            out = gg.grouped_gemm(aa, asc, wt.w, s, c, off, 128)
            ref = reference_fp32(aa, asc, wt.w, s, c, off, 128, experts)
            err = rel_err_rows(out, ref)
            fin = bool(torch.isfinite(out.float()).all())
            good = err <= 3e-3 and fin
            ok &= good
            log(f"check GLM N={N} K={K} 8192 tok {mode}: rel_err={err:.2e} finite={fin} "
                f"{'OK' if good else 'FAIL'}")
    return ok


def inspect_sass(tag):
    k = gg.LAST_COMPILED
    if k is None:
        return
    info = {"tag": tag, "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
            "shared": getattr(k, "metadata", None) and getattr(k.metadata, "shared", None)}
    try:
        ttgir = k.asm["ttgir"]
        info["wgmma"] = len(re.findall(r"warp_group_dot", ttgir))
        m = re.search(r"ttng\.warp_group_dot\s+(%\S+),\s*(%\S+)", ttgir)
        info["dot_line"] = next((l.strip()[:300] for l in ttgir.splitlines() if "warp_group_dot " in l), "")
        OUTPUT_FILES[f"ttgir_{tag}.mlir"] = ttgir
    except Exception as exc:  # noqa: BLE001
        info["ttgir_err"] = repr(exc)
    try:
        sass = k.asm["sass"]
        for op in ("QGMMA", "HGMMA", "HMMA", "F2FP", "I2F", "LOP3", "PRMT", "HADD2", "HFMA2", "LDG",
                   "LDGSTS", "LDS", "STS", "LDSM", "STG", "LDL", "STL", "SHFL", "BAR"):
            info[op] = len(re.findall(r"\b" + op + r"\b", sass))
        OUTPUT_FILES[f"sass_{tag}.txt"] = sass
    except Exception as exc:  # noqa: BLE001
        info["sass_err"] = repr(exc)
    log("sass", json.dumps(info))


KERNELS = ("triton", gemm_tiles.WGMMA_KERNEL, gemm_tiles.GEMV_KERNEL)


def parse_tile(text: str) -> GemmTile:
    """"BM,BN,warps,stages,programs_per_sm[,groups_per_step][,kernel][,p][,t]" -> GemmTile; a
    trailing "p" sets prefetch_scales, "t" tma_loads. Raises ValueError / TypeError for anything
    else."""
    fields = text.split(",")
    flags = set()
    while fields and fields[-1] in ("p", "t"):
        flags.add(fields.pop())
    prefetch = "p" in flags
    n_numbers = 6 if len(fields) >= 6 and fields[5].isdigit() else 5
    numbers = [int(f) for f in fields[:n_numbers]]
    kernel = fields[n_numbers:]
    if len(kernel) > 1 or (kernel and kernel[0] not in KERNELS):
        raise ValueError(f"after the numbers: one kernel name of {KERNELS} at most, got {kernel}")
    return GemmTile(*numbers, **({"kernel": kernel[0]} if kernel else {}), prefetch_scales=prefetch,
                    tma_loads="t" in flags)


def timer(timing: str, rep: int):
    """us of one call of fn: "graph" = median CUDA-graph replay (how `bench` and a serving loop
    run it), "eager" = triton's do_bench of eager calls; both flush the L2 before each call. The
    two disagreed by up to 20% on the small-M tiles (docs/perf.md, session 6)."""
    if timing == "graph":
        return lambda fn: bench.graph_bench_us(fn, reps=max(rep // 2, 10))
    return lambda fn: bench.do_bench_us(fn, rep=rep)


def time_variants(m_list, variants, fb=True, rep=100, timing="graph"):
    time_us = timer(timing, rep)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    E, H, I, k = 160, 5120, 1536, 8
    gemms = {"w13": (2 * I, H), "w2": (H, I)}
    weights = {n: bench.random_weights(E, N, K, 128, dev) for n, (N, K) in gemms.items()}
    peers = {}
    if fb:
        for n, (N, K) in gemms.items():
            try:
                peers[n] = bench.Peers(E, N, K, dev, want=("fbgemm",))
            except Exception as exc:  # noqa: BLE001
                log("fbgemm unavailable", repr(exc)[:300])
    ceilings = bench.measure_ceilings()   # this GPU's own copy and fp8 rates, for the floor
    log(ceilings.describe())
    results = []
    for M in m_list:
        R = M * k
        off = bench.route(M, E, k, dev)
        acts = {n: bench.random_activations(R, K, dev) for n, (N, K) in gemms.items()}
        flops = sum(2.0 * R * N * K for N, K in gemms.values())
        nbytes = sum(bench.gemm_bytes(R, off, N, K) for N, K in gemms.values())
        fl = bench.floor_us(flops, nbytes, ceilings)
        row = {"M": M, "floor": round(fl, 1)}
        if len(peers) == 2:
            fns = [peers[n].fns(*acts[n], off)["fbgemm"] for n in gemms]
            try:
                row["fbgemm"] = round(time_us(lambda: [f() for f in fns]), 1)
            except Exception as exc:  # noqa: BLE001
                log("fbgemm failed", repr(exc)[:300])
        cands = [("auto", None)] + [(v, parse_tile(v)) for v in variants]
        for name, tile in cands:
            if tile is not None and ((tile.block_m <= 32 and M > 1024) or (tile.block_m >= 128 and M <= 64)):
                continue
            per = {}
            for n, (N, K) in gemms.items():
                t = tile or choose_tile(R, N, K, E, 128, allow_gluon=True)   # what eager runs
                f = bench.ours_fn(*acts[n], weights[n], off, "fp8", tile=t)
                try:
                    f()
                    per[n] = time_us(f)
                    if M in (64, 4096) and name in ("auto", "sass"):
                        inspect_sass(f"{n}_M{M}")
                except Exception as exc:  # noqa: BLE001
                    log(f"M={M} {name} {n} failed: {repr(exc)[:400]}")
            if len(per) == 2:
                row[name] = round(per["w13"] + per["w2"], 1)
                row[name + ":w13"] = round(per["w13"], 1)
        log(json.dumps(row))
        results.append(row)
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tune_grouped_gemm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small correctness cases only, M in {QUICK_M} (unless --m), --rep 20 (unless --rep)")
    p.add_argument("--m", type=positive_int, nargs="*", default=None,
                   help="token counts M timed (default: 1 16 64 256 1024 4096 8192)")
    p.add_argument("--variants", nargs="*", default=[],
                   help="extra tiles to time, each as block_m,block_n,num_warps,num_stages,"
                        "programs_per_sm[,groups_per_step[,kernel]][,p][,t] (GemmTile's fields; kernel triton, wgmma or "
                        "gemv; a trailing p sets prefetch_scales, t tma_loads)")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-fbgemm", action="store_true", help="do not time FBGEMM beside ours")
    p.add_argument("--rep", type=positive_int, default=None,
                   help="do_bench repetitions; half as many graph replays (default: 100)")
    p.add_argument("--timing", choices=("graph", "eager"), default="graph",
                   help="graph: median CUDA-graph replay, as `bench` times (default); eager: do_bench")
    p.add_argument("--out", type=output_dir, default=os.environ.get("OUT") or None,
                   help="folder for tune_log.txt and the TTGIR / SASS files (default: $OUT when set, "
                        "else none); written only when the run succeeds")
    args = p.parse_args(argv)
    if args.m is None:
        args.m = QUICK_M if args.quick else [1, 16, 64, 256, 1024, 4096, 8192]
    if args.rep is None:
        args.rep = 20 if args.quick else 100
    for v in args.variants:
        try:
            parse_tile(v)
        except (TypeError, ValueError) as exc:
            p.error(f"--variants {v}: not a GemmTile ({exc})")
    require_cuda(p.prog, "tuning the grouped GEMM")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    t0 = time.time()
    ok = True
    if not args.skip_check:
        ok = check_correctness(quick=args.quick)
        log(f"correctness {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f}s)")
    res = time_variants(args.m, args.variants, fb=not args.no_fbgemm, rep=args.rep, timing=args.timing)
    log(json.dumps(res))
    log(f"total {time.time() - t0:.0f}s")
    if not ok:
        print("correctness FAILED: nothing written", file=sys.stderr)
        return 1
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in OUTPUT_FILES.items():
            (args.out / name).write_text(text)
        print(f"wrote {', '.join(sorted(OUTPUT_FILES))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
