"""`python -m inductor_w4a8 bench --block`: the GLM-4.6 MoE block (E=160, H=5120, I=1536, top-8,
grouped sigmoid routing as GLM-4.6 configures it) run three ways, side by side, per token count:

  eager     W4A8MoE.forward called from Python under no_grad, default settings
  compiled  torch.compile(layer, backend="w4a8", fullgraph=True, dynamic=True)
  graph     a CUDA graph of the eager forward, replayed

For eager and compiled: `us` is the wall time per forward of back-to-back calls (what a decode
loop without graphs sees: max(host, device)), `host us` the time the host spends inside one call
(the loop's time before it waits for the device), both medians over rounds. For graph: the median
replay time with the L2 flushed before each replay (as bench.py times GEMMs), and beside it the
two grouped GEMMs of the same block alone (same inputs, graph replay, L2 flushed): `non-GEMM us`
= graph - GEMMs is what routing, sort, quantization, gather, activation and combine cost.
Writes bench_block.json to --out.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

GLM = dict(num_experts=160, top_k=8, hidden_size=5120, intermediate_size=1536, group_size=128,
           scoring="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.5)
BLOCK_M = (1, 8, 64, 512, 2048, 8192)


def glm_layer(device, seed=0, scale_mode=None):
    from . import W4A8MoE, testing
    kwargs = {} if scale_mode is None else {"scale_mode": scale_mode}
    layer = W4A8MoE(**GLM, device=device, **kwargs)
    testing.random_checkpoint_(layer, seed)
    layer.process_weights_after_loading()
    return layer


def host_and_wall_us(fn, calls=20, rounds=7) -> tuple[float, float]:
    """(host us per call, wall us per call), medians over rounds of `calls` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    host, wall = [], []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return statistics.median(host), statistics.median(wall)


def gemms_fn(layer, x, logits):
    """A function running only the block's two grouped GEMMs, on the block's own inputs."""
    from .testing import recorded_op_outputs
    with recorded_op_outputs("quantize_scatter_fp8", "silu_mul_quantize_fp8", "select_and_sort_experts") as rec:
        layer(x, logits)
    (a, a_scale), = rec["quantize_scatter_fp8"]
    (hq, h_scale), = rec["silu_mul_quantize_fp8"]
    (*_, offsets), = rec["select_and_sort_experts"]
    G, gemm = layer.group_size, torch.ops.w4a8.grouped_gemm

    def both():
        return (gemm(a, a_scale, layer.w13_weight, layer.w13_group_scale, layer.w13_chan_scale,
                     offsets, G),
                gemm(hq, h_scale, layer.w2_weight, layer.w2_group_scale, layer.w2_chan_scale,
                     offsets, G))
    return both


def time_one(layer, compiled, M: int) -> dict:
    from .timing import graph_bench_us
    H, E = layer.hidden_size, layer.num_experts
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, H, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(M, E, device="cuda", generator=g)
    eager_host, eager_wall = host_and_wall_us(lambda: layer(x, logits))
    if M >= 2:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(logits, 0)
    comp_host, comp_wall = host_and_wall_us(lambda: compiled(x, logits))
    graph_us = graph_bench_us(lambda: layer(x, logits))
    gemm_us = graph_bench_us(gemms_fn(layer, x, logits))
    row = {"M": M, "eager_us": eager_wall, "eager_host_us": eager_host, "compiled_us": comp_wall,
           "compiled_host_us": comp_host, "graph_us": graph_us, "gemms_us": gemm_us,
           "non_gemm_us": graph_us - gemm_us}
    print(f"M={M}: eager {eager_wall:.1f} us (host {eager_host:.1f}), compiled {comp_wall:.1f} "
          f"(host {comp_host:.1f}), graph {graph_us:.1f}, two GEMMs {gemm_us:.1f}",
          file=sys.stderr, flush=True)
    return row


def markdown(rows) -> str:
    head = ("| M | eager us | eager host us | compiled us | compiled host us | graph replay us "
            "| two GEMMs us | non-GEMM us | non-GEMM % |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        share = 100.0 * r["non_gemm_us"] / r["graph_us"] if r["graph_us"] > 0 else float("nan")
        lines.append(f"| {r['M']} | {r['eager_us']:.1f} | {r['eager_host_us']:.1f} | "
                     f"{r['compiled_us']:.1f} | {r['compiled_host_us']:.1f} | {r['graph_us']:.1f} | "
                     f"{r['gemms_us']:.1f} | {r['non_gemm_us']:.1f} | {share:.1f} |")
    return "\n".join(lines)


def run(m_list=BLOCK_M, out_dir=".", scale_mode=None, log=print) -> list[dict]:
    import inductor_w4a8  # noqa: F401  (ops and backend)
    layer = glm_layer("cuda", scale_mode=scale_mode)
    compiled = torch.compile(layer, backend="w4a8", fullgraph=True, dynamic=True)
    rows = []
    with torch.no_grad():
        for M in m_list:
            rows.append(time_one(layer, compiled, M))
    table = markdown(rows)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "scale_mode": layer.scale_mode,
            "config": GLM}
    log(f"W4A8MoE GLM-4.6 block, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"scale_mode={layer.scale_mode}\n\n{table}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_block.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows
