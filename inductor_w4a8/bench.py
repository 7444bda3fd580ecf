"""Benchmark of the W4A8 grouped GEMM on GLM-4.6 MoE shapes: `python -m inductor_w4a8 bench`.

GLM-4.6 MoE layer per GPU: E=160 experts, hidden 5120, moe-intermediate 1536, top-8. Both GEMMs
of the layer are timed together (w13 [160, 3072, 5120] then w2 [160, 5120, 1536]) at M tokens
(R = 8 M rows sorted by expert, random routing). Beside ours: bf16 torch._grouped_mm, fp8 W8A8
torch._scaled_grouped_mm and FBGEMM's CUTLASS f8i4 grouped GEMM
(torch.ops.fbgemm.f8i4bf16_shuffled_grouped) when importable. Median microseconds of CUDA-graph
replays (no host overhead, as a serving loop runs them; L2 flushed before every replay; eager
do_bench where capture fails), TFLOP/s, GB/s, % of the floor, ratio to FBGEMM.

The floor is max(weight + activation bytes at the HBM rate, FLOPs at the fp8 rate), both rates
measured in the same run on the same GPU: a device-to-device copy of a multi-GB buffer and fp8
torch._scaled_mm (rowwise scales) at 8192^3. A numerics table follows (inductor_w4a8.
bench_numerics): ours in both scale modes and FBGEMM against the exact fp64 product of the
checkpoint's own int4 weights and the fp8 activations, beside the bf16 output floor.
Prints markdown tables, writes JSON and a PNG plot. `--block` times the whole W4A8MoE block
instead (inductor_w4a8.bench_block: eager, compiled and graph replay side by side).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

from . import cli, formats
from .bench_block import BLOCK_M
from .timing import do_bench_us, graph_bench_us  # noqa: F401  (the timers scripts use as bench.*)
from .checks import value_checks

E_GLM, HIDDEN_GLM, INTER_GLM, TOPK_GLM = 160, 5120, 1536, 8
M_LIST = (1, 16, 64, 256, 1024, 4096, 8192)
GLM_GEMMS = {"w13": (2 * INTER_GLM, HIDDEN_GLM), "w2": (HIDDEN_GLM, INTER_GLM)}   # name: (N, K)
PROG = "python -m inductor_w4a8 bench"
NUMERICS_M = (1, 64, 513)   # token counts of the numerics table (decode, mid, past a 512 boundary)


# ------------------------------------------------------------------------------------------
# Problem construction
# ------------------------------------------------------------------------------------------
def route(T: int, E: int, top_k: int, device, generator=None) -> torch.Tensor:
    """int64 [E + 1] offsets of T tokens routed to top_k distinct random experts each."""
    ids = torch.rand(T, E, device=device, generator=generator).topk(top_k, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


@dataclasses.dataclass
class Weights:
    w: torch.Tensor             # int32 [E, N, K // 8] GEMM layout
    s_bf16: torch.Tensor        # bf16 [E, N, K // G]
    s_fp8: torch.Tensor         # fp8 [E, N, K // G]
    chan: torch.Tensor          # fp32 [E, N, 1]
    group_size: int

    @property
    def shape(self):
        E, N, words = self.w.shape
        return E, N, words * 8


def random_weights(E: int, N: int, K: int, group_size: int, device) -> Weights:
    """Random GEMM-layout weights (any int32 is a valid word) and positive group scales."""
    w = torch.randint(-2**31, 2**31 - 1, (E, N, K // 8), dtype=torch.int32, device=device)
    s = (torch.rand(E, N, K // group_size, device=device) * 0.01 + 0.002).to(torch.bfloat16)
    s8, chan = formats.convert_bf16_scales_to_fp8(s)
    return Weights(w, s, s8, chan, group_size)


def random_activations(R: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    a = (torch.randn(R, K, device=device) * 3).clamp(-448, 448).to(formats.FP8_DTYPE)
    return a, torch.rand(R, 1, device=device) * 0.01 + 0.001


def gemm_bytes(R: int, offsets: torch.Tensor, N: int, K: int) -> int:
    """Fewest bytes: int4 weights of the experts hit, their scales, fp8 activations, bf16 output."""
    hit = int((offsets[1:] > offsets[:-1]).sum())
    return hit * N * (K // 2) + hit * N * (K // 128) * 2 + R * K + R * 4 + R * N * 2


# ------------------------------------------------------------------------------------------
# Ceilings of this GPU, measured in the same run
# ------------------------------------------------------------------------------------------
COPY_BYTES = 4 << 30          # large enough that the L2 (50-60 MB) plays no part
SCALED_MM_SIZE = 8192         # the fp8 rate is taken at 8192^3, where cuBLAS runs near its peak


@dataclasses.dataclass(frozen=True)
class Ceilings:
    hbm_tbps: float           # device-to-device copy: (bytes read + bytes written) / time, TB/s
    fp8_tflops: float         # torch._scaled_mm, fp8 e4m3, rowwise fp32 scales, bf16 out, TFLOP/s
    copy_bytes: int = COPY_BYTES
    scaled_mm_size: int = SCALED_MM_SIZE

    def describe(self) -> str:
        n = self.scaled_mm_size
        return (f"ceilings measured in this run: HBM {self.hbm_tbps:.2f} TB/s (device-to-device "
                f"copy of {self.copy_bytes / 2**30:.0f} GiB, read + write bytes), fp8 "
                f"{self.fp8_tflops:.0f} TFLOP/s (torch._scaled_mm rowwise, {n}x{n}x{n})")


def copy_rate_tbps(nbytes: int, seconds: float) -> float:
    """A copy of nbytes reads nbytes and writes nbytes: the rate counts both."""
    return 2 * nbytes / seconds / 1e12


def gemm_rate_tflops(m: int, n: int, k: int, seconds: float) -> float:
    return 2.0 * m * n * k / seconds / 1e12


def floor_us(flops: float, nbytes: float, ceilings: Ceilings) -> float:
    """The fewest microseconds the work can take: its bytes at the HBM rate or its FLOPs at the
    fp8 rate, whichever is longer."""
    return max(nbytes / (ceilings.hbm_tbps * 1e12), flops / (ceilings.fp8_tflops * 1e12)) * 1e6


def event_median_s(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn` between CUDA events (no L2 flush: for work far larger than L2)."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2] / 1e3


def measure_ceilings(nbytes: int = COPY_BYTES, size: int = SCALED_MM_SIZE) -> Ceilings:
    device = torch.device("cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy_s = event_median_s(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(size, size, device=device).to(formats.FP8_DTYPE)
    b = torch.randn(size, size, device=device).to(formats.FP8_DTYPE).t()   # column-major operand
    scale_a = torch.rand(size, 1, device=device) + 0.5
    scale_b = torch.rand(1, size, device=device) + 0.5
    mm_s = event_median_s(lambda: torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16))
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(copy_rate_tbps(nbytes, copy_s), gemm_rate_tflops(size, size, size, mm_s),
                    nbytes, size)


# ------------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------------
def ours_fn(a, a_scale, wt: Weights, offsets, scale_mode: str, tile=None):
    if tile is None:
        op = torch.ops.w4a8.grouped_gemm
        if scale_mode == "fp8":
            return lambda: op(a, a_scale, wt.w, wt.s_fp8, wt.chan, offsets, wt.group_size)
        return lambda: op(a, a_scale, wt.w, wt.s_bf16, None, offsets, wt.group_size)
    from .launch.grouped_gemm import grouped_gemm
    s, c = (wt.s_fp8, wt.chan) if scale_mode == "fp8" else (wt.s_bf16, None)
    return lambda: grouped_gemm(a, a_scale, wt.w, s, c, offsets, wt.group_size, tile=tile)


def _fbgemm_available() -> bool:
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401
        return hasattr(torch.ops.fbgemm, "f8i4bf16_shuffled_grouped")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False


class Peers:
    """bf16 / fp8 torch grouped GEMMs and FBGEMM f8i4 on dense random weights of one GEMM."""

    def __init__(self, E, N, K, device, want=("bf16", "fp8", "fbgemm"), w=None):
        """w: bf16 [E, N, K] weights the peers quantize their own way (random when None)."""
        self.E, self.N, self.K = E, N, K
        if w is None:
            w = torch.randn(E, N, K, device=device, dtype=torch.bfloat16) * 0.05
        self.have = {}
        if "bf16" in want:
            self.w_bf16 = w
            self.have["bf16"] = True
        if "fp8" in want:
            amax = w.float().abs().amax(dim=2).clamp_min(1e-6)
            self.scale_b = formats.fp8_row_scale(amax)                           # [E, N]
            self.w_fp8 = (w.float() / self.scale_b[..., None]).to(formats.FP8_DTYPE)
            self.have["fp8"] = True
        if "fbgemm" in want and _fbgemm_available():
            from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle
            wq, (gs, rs) = quantize_int4_preshuffle(w, group_size=128, dtype="fp8")
            self.fb = (wq, rs, gs)
            self.have["fbgemm"] = True
        if "bf16" not in want:
            del w

    def fns(self, a_fp8, a_scale, offsets):
        R, K = a_fp8.shape
        offs32 = offsets[1:].to(torch.int32)
        sizes32 = (offsets[1:] - offsets[:-1]).to(torch.int32)
        out = {}
        if self.have.get("bf16"):
            a16 = (a_fp8.float() * a_scale).to(torch.bfloat16)
            wt = self.w_bf16.transpose(1, 2)
            out["bf16"] = lambda: torch._grouped_mm(a16, wt, offs=offs32, out_dtype=torch.bfloat16)
        if self.have.get("fp8"):
            wt8 = self.w_fp8.transpose(1, 2)
            sa = a_scale.reshape(-1).contiguous()
            out["fp8"] = lambda: torch._scaled_grouped_mm(a_fp8, wt8, sa, self.scale_b, offs=offs32,
                                                          out_dtype=torch.bfloat16)
        if self.have.get("fbgemm"):
            wq, rs, gs = self.fb
            xs = a_scale.reshape(-1).contiguous()
            out["fbgemm"] = lambda: torch.ops.fbgemm.f8i4bf16_shuffled_grouped(a_fp8, wq, xs, rs, gs,
                                                                              sizes32)
        return out


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------
def run(m_list=M_LIST, scale_mode="fp8", peers=True, group_size=128, rep=200, out_dir=".",
        numerics_m=None, log=print):
    from . import bench_numerics
    torch.manual_seed(0)
    ceilings = measure_ceilings()
    log(ceilings.describe())
    rows = time_gemms(m_list, scale_mode, peers, group_size, rep, ceilings, log)
    torch.cuda.empty_cache()
    numerics = []
    if numerics_m:
        try:
            numerics = measure_numerics(numerics_m, group_size, torch.device("cuda"), fbgemm=peers, log=log)
        except Exception as exc:  # noqa: BLE001 - the timing table must still come out
            log(f"numerics failed: {exc!r}"[:500])
    log(ceilings.describe())
    log(markdown_table(rows))
    if numerics:
        log(bench_numerics.markdown_table(numerics))
    os.makedirs(out_dir, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "scale_mode": scale_mode,
            "group_size": group_size, "ceilings": dataclasses.asdict(ceilings)}
    with open(os.path.join(out_dir, "bench_grouped_gemm.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "numerics": numerics}, f, indent=1)
    try:
        plot(rows, os.path.join(out_dir, "bench_grouped_gemm.png"), meta)
    except Exception as exc:  # noqa: BLE001
        log(f"plot failed: {exc!r}")
    return rows


def time_gemms(m_list, scale_mode, peers, group_size, rep, ceilings: Ceilings, log=print) -> list[dict]:
    """The timing table's rows: both GLM-4.6 GEMMs back to back at each M, ours and the peers."""
    device = torch.device("cuda")
    E, k = E_GLM, TOPK_GLM
    gemms = GLM_GEMMS
    weights = {name: random_weights(E, N, K, group_size, device) for name, (N, K) in gemms.items()}
    peer = {}
    if peers:
        for name, (N, K) in gemms.items():
            try:
                peer[name] = Peers(E, N, K, device)
            except Exception as exc:  # noqa: BLE001
                log(f"peers for {name} unavailable: {exc!r}")
    rows = []
    for M in m_list:
        R = M * k
        offsets = route(M, E, k, device)
        acts = {name: random_activations(R, K, device) for name, (N, K) in gemms.items()}
        flops = sum(2.0 * R * N * K for N, K in gemms.values())
        nbytes = sum(gemm_bytes(R, offsets, N, K) for N, K in gemms.values())
        row = {"M": M, "R": R, "flops": flops, "bytes": nbytes,
               "floor_us": floor_us(flops, nbytes, ceilings)}
        impls = {"ours": [ours_fn(*acts[n], weights[n], offsets, scale_mode) for n in gemms]}
        for name in gemms:
            if name in peer:
                for key, fn in peer[name].fns(*acts[name], offsets).items():
                    impls.setdefault(key, []).append(fn)
        row.update(time_impls(impls, len(gemms), f"M={M}", rep, log))
        rows.append(row)
        log(json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}))
    return rows


def time_impls(impls: dict, n_gemms: int, label: str, rep: int = 200, log=print) -> dict:
    """{name: median us of all the name's GEMMs back to back} for the names that have them all."""
    times = {}
    with value_checks(False):
        for key, fns in impls.items():
            if len(fns) != n_gemms:
                continue

            def both(fns=fns):
                for f in fns:
                    f()
            try:
                times[key] = graph_bench_us(both, fallback_rep_ms=rep)
            except Exception as exc:  # noqa: BLE001 - one failing peer must not end the run
                log(f"{label} {key} failed: {exc!r}"[:300])
    return times


def measure_numerics(m_list, group_size, device, fbgemm=True, experts=16, shapes=None,
                     log=print) -> list[dict]:
    """bench_numerics' table on the GLM-4.6 w13 and w2 shapes [N, K] (or `shapes`) with `experts`
    experts (the per-element error depends on N and K, not on E) at each M of m_list (R = 8 M
    routed rows). Runs wherever the op does (the CPU kernel is the reference rounded once)."""
    from . import bench_numerics as nm
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    with torch.no_grad():
        for name, (N, K) in (shapes or GLM_GEMMS).items():
            ckpt = nm.checkpoint_gemm(experts, N, K, group_size, device, gen)
            peer = None
            if fbgemm and _fbgemm_available():
                peer = Peers(experts, N, K, device, want=("fbgemm",), w=ckpt.dequantized_bf16())
            for M in m_list:
                R = M * TOPK_GLM
                offsets = route(M, experts, TOPK_GLM, device, gen)
                a, a_scale = nm.fp8_activations(R, K, device, gen)
                op = torch.ops.w4a8.grouped_gemm
                outputs = {"ours_exact": op(a, a_scale, ckpt.w, ckpt.s_bf16, None, offsets, group_size),
                           "ours_fp8": op(a, a_scale, ckpt.w, ckpt.s_fp8, ckpt.chan, offsets, group_size)}
                if peer is not None:
                    outputs["fbgemm"] = peer.fns(a, a_scale, offsets)["fbgemm"]()
                row = {"gemm": name, "N": N, "K": K, "M": M, "R": R,
                       **nm.error_row(outputs, *nm.exact_products(a, a_scale, ckpt, offsets))}
                rows.append(row)
                log(json.dumps({k: (float(f"{v:.3e}") if isinstance(v, float) else v) for k, v in row.items()}))
            del ckpt, peer
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows) -> str:
    """One line per M: every implementation's us, the floor, ours against the floor and FBGEMM."""
    keys = [k for k in ("bf16", "fp8", "fbgemm") if any(k in r for r in rows)]
    head = ("| M | R | ours us | " + " | ".join(f"{k} us" for k in keys)
            + " | floor us | ours % of floor | ours TFLOP/s | ours GB/s | FBGEMM / ours |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        us = r.get("ours")
        fb = r.get("fbgemm")
        cells = [str(r["M"]), str(r["R"]), _fmt(us, ".1f")]
        cells += [_fmt(r.get(k), ".1f") for k in keys]
        cells.append(_fmt(r["floor_us"], ".1f"))
        if us:
            cells += [f"{100 * r['floor_us'] / us:.0f}%", f"{r['flops'] / us / 1e6:.0f}",
                      f"{r['bytes'] / us / 1e3:.0f}", f"{fb / us:.2f}x" if fb else "-"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ms = [r["M"] for r in rows]
    for key, style in (("ours", "o-"), ("fbgemm", "s--"), ("fp8", "^--"), ("bf16", "v--"),
                       ("floor_us", "k:")):
        ys = [r.get(key, math.nan) for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax.plot(ms, ys, style, label={"floor_us": "floor"}.get(key, key))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("M tokens (R = 8 M rows)")
    ax.set_ylabel("median us, w13 + w2")
    ax.set_title(f"GLM-4.6 MoE GEMMs, {meta['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=cli.positive_int, nargs="+", default=None, metavar="TOKENS",
                   help=f"token counts M to time (R = 8 M rows); default: {' '.join(map(str, M_LIST))}, "
                        f"with --block {' '.join(map(str, BLOCK_M))}")
    p.add_argument("--scale-mode", choices=formats.SCALE_MODES, default=None,
                   help="group-scale mode: of our GEMM in the timing table (default fp8), of the "
                        "block with --block (default: W4A8MoE's)")
    p.add_argument("--no-peers", action="store_true",
                   help="time ours only (no bf16 / fp8 torch grouped GEMMs, no FBGEMM)")
    p.add_argument("--block", action="store_true",
                   help="time the whole GLM-4.6 W4A8MoE block (eager, compiled, graph replay) instead")
    p.add_argument("--rep", type=cli.positive_int, default=200, metavar="MS",
                   help="do_bench repetition time in ms, where a CUDA graph cannot be captured")
    p.add_argument("--numerics-m", type=cli.positive_int, nargs="*", default=list(NUMERICS_M), metavar="TOKENS",
                   help="token counts of the numerics table (errors against the exact fp64 "
                        "product); give none to skip it; default: %(default)s")
    p.add_argument("--out", type=cli.output_dir, default=os.environ.get("OUT", "."), metavar="DIR",
                   help="directory for bench_grouped_gemm.json / .png (bench_block.json with "
                        "--block); default: $OUT or .")
    return p


def main(argv=None):
    args = parser().parse_args(argv)    # --m, --rep and --out are checked here, before any work
    cli.require_cuda(PROG, "the benchmark")
    if args.block:  # eager / compiled / graph replay of the whole block: inductor_w4a8.bench_block
        from .bench_block import BLOCK_M, run as block_run
        block_run(tuple(args.m or BLOCK_M), out_dir=str(args.out), scale_mode=args.scale_mode)
        return 0
    import inductor_w4a8  # noqa: F401  (registers the ops)
    run(tuple(args.m or M_LIST), args.scale_mode or "fp8", not args.no_peers, rep=args.rep,
        out_dir=str(args.out), numerics_m=args.numerics_m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
