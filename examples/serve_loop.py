"""A serving loop through the W4A8 MoE layer: decode batches and chunked-prefill chunks.

    python examples/serve_loop.py [--layer glm|small] [--steps N] [--max-tokens M] [--device cuda|cpu]

Defaults: on a GPU the GLM-4.6 layer, 200 steps, 8192 tokens per step; on a CPU (the ops run
their reference kernels there) the small layer, 8 steps, 64 tokens per step, about a minute.

A scheduler with a token budget of --max-tokens per step (vLLM's max_num_batched_tokens) emits a
stream of batches: decode steps of 1..256 tokens, chunked-prefill chunks of random sizes in
1..max (a long prompt is cut into chunks of exactly max tokens, so full 8192-token chunks
occur), and now and then one oversized batch that the runner itself splits. Each batch goes
through CUDAGraphRunner(torch.compile(layer, backend="w4a8")) and is checked against eager;
then the whole stream is timed through eager, compiled, and compiled + CUDA graphs, and the
tokens/s of each are printed, for the whole stream and for its decode steps (<= 256 tokens) and
prefill chunks apart. On CPU the same loop runs without graphs.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

import inductor_w4a8 as w4a8
from inductor_w4a8 import value_checks
from inductor_w4a8.bench_block import GLM
from inductor_w4a8.cli import device_or_exit, exit_usage, positive_int
from inductor_w4a8.cudagraph import CUDAGraphRunner
from inductor_w4a8.testing import random_checkpoint_

LAYERS = {
    "glm": GLM,                           # the benchmark's GLM-4.6 layer
    "small": dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, group_size=64),
}
# (layer, steps, max tokens) when not given: GPU-sized and CPU-sized
DEFAULTS = {"cuda": ("glm", 200, 8192), "cpu": ("small", 8, 64)}


def build_layer(config: dict, device="cuda", seed=0) -> w4a8.W4A8MoE:
    """A processed layer of the given shape with random int4 words and scales."""
    moe = w4a8.W4A8MoE(**config, device=device)
    random_checkpoint_(moe, seed)
    moe.process_weights_after_loading()
    return moe


def batch_stream(steps: int, max_tokens: int, seed: int) -> list[int]:
    """Token counts of the scheduler's steps: decode, prefill chunks, full chunks, an oversize."""
    rng = random.Random(seed)
    stream: list[int] = []
    pending_prompt = 0
    while len(stream) < steps:
        r = rng.random()
        if pending_prompt:                        # continue a long prompt: full chunks
            chunk = min(pending_prompt, max_tokens)
            pending_prompt -= chunk
            stream.append(chunk)
        elif r < 0.55:
            stream.append(rng.randint(1, min(256, max_tokens)))      # decode step
        elif r < 0.85:
            stream.append(rng.randint(1, max_tokens))                # prefill chunk
        elif r < 0.95:
            pending_prompt = rng.randint(max_tokens, 3 * max_tokens)  # long prompt -> chunks of max
        else:
            stream.append(rng.randint(max_tokens + 1, 2 * max_tokens))  # runner splits it
    if max_tokens not in stream:
        stream[len(stream) // 2] = max_tokens
    return stream


def make_batch(T: int, moe, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, moe.hidden_size, device=device, generator=g).to(torch.bfloat16)
    logits = torch.randn(T, moe.num_experts, device=device, generator=g)
    return x, logits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="serve_loop.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=sorted(LAYERS), default=None,
                   help="layer shape (default: glm on a GPU, small on CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="scheduler steps (default: 200 GPU, 8 CPU)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="token budget per step, max_num_batched_tokens (default: 8192 GPU, 64 CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--gemm", choices=("triton", "extern"), default="triton",
                   help="grouped GEMM in compiled code: our Triton lowering or the extern op")
    p.add_argument("--tol", type=float, default=2e-2, help="max relative error vs eager per batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch stream and the inputs")
    args = p.parse_args(argv)
    args.device = device_or_exit(p.prog, args.device)
    layer, steps, max_tokens = DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"]
    args.layer = args.layer or layer
    args.steps = steps if args.steps is None else args.steps
    args.max_tokens = max_tokens if args.max_tokens is None else args.max_tokens
    if args.layer == "glm" and args.device.type != "cuda":
        exit_usage(p.prog, "--layer glm needs a GPU (its CPU reference kernels need tens of GB and "
                           "hours); use --layer small on CPU")
    return args


def check_against_eager(runner, moe, batches, stream, tol) -> float | None:
    """Every batch through the runner vs eager; the worst relative error, or None on a failure."""
    worst, last_report = 0.0, time.perf_counter()
    for i, ((x, logits), T) in enumerate(zip(batches, stream)):
        out, ref = runner(x, logits), moe(x, logits)
        if out.shape != ref.shape or not torch.isfinite(out).all():
            print(f"batch {i} (T={T}): bad output {tuple(out.shape)}", file=sys.stderr)
            return None
        err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        if err > tol:
            print(f"batch {i} (T={T}): relative error {err:.3e} vs eager > {tol}", file=sys.stderr)
            return None
        if time.perf_counter() - last_report > 5 or i + 1 == len(stream):
            print(f"  checked {i + 1}/{len(stream)} batches against eager", flush=True)
            last_report = time.perf_counter()
    return worst


def time_paths(paths, batches, stream, device) -> dict[str, dict[str, tuple[float, float]]]:
    """tokens/s and ms/step of each path, for the whole stream and for its decode steps (<= 256
    tokens: launch-bound, where graphs pay) and prefill chunks (GPU-bound) apart."""
    classes = {"all": batches, "decode": [b for b, T in zip(batches, stream) if T <= 256],
               "prefill": [b for b, T in zip(batches, stream) if T > 256]}
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for name, fn in paths.items():
        print(f"  timing {name} ...", flush=True)
        for x, logits in batches[:3]:  # warm
            fn(x, logits)
        results[name] = {}
        for cls, subset in classes.items():
            if not subset:
                continue
            sync(device)
            t0 = time.perf_counter()
            for x, logits in subset:
                fn(x, logits)
            sync(device)
            seconds = time.perf_counter() - t0
            tokens = sum(x.shape[0] for x, _ in subset)
            results[name][cls] = (tokens / seconds, 1e3 * seconds / len(subset))
    return results


def print_table(results) -> None:
    print(f"{'':>16}  " + "".join(f"{cls + ' tokens/s (ms/step, x eager)':>42}" for cls in results["eager"]))
    for name, per in results.items():
        cells = [f"{tps:>14,.0f} ({ms:8.3f} ms, {tps / results['eager'][cls][0]:5.2f}x)"
                 for cls, (tps, ms) in per.items()]
        print(f"{name:>16}: " + "".join(f"{c:>42}" for c in cells))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    print(f"building the {args.layer} layer on {device} ...", flush=True)
    moe = build_layer(LAYERS[args.layer], device)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options={"w4a8.grouped_gemm": args.gemm})
    stream = batch_stream(args.steps, args.max_tokens, args.seed)
    batches = [make_batch(T, moe, device, args.seed + i) for i, T in enumerate(stream)]
    for x, logits in batches:          # the token dim is dynamic: one compiled graph (T=1 aside)
        if x.shape[0] >= 2:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(logits, 0)
    print(f"layer {args.layer} on {device}: {len(stream)} batches, {sum(stream)} tokens "
          f"(decode <= 256: {sum(t <= 256 for t in stream)}, full {args.max_tokens}-token chunks: "
          f"{sum(t == args.max_tokens for t in stream)}, above the max: {sum(t > args.max_tokens for t in stream)})",
          flush=True)

    with value_checks(False):  # eager value checks synchronize; a serving loop turns them off
        runner = CUDAGraphRunner(compiled, max_num_batched_tokens=args.max_tokens)
        print(f"compiling and {'capturing' if device.type == 'cuda' else 'warming up'} "
              f"{len(runner.sizes)} sizes (1..{args.max_tokens} tokens; progress on stderr) ...", flush=True)
        report = runner.capture(*batches[0])
        worst = check_against_eager(runner, moe, batches, stream, args.tol)
        if worst is None:
            return 1
        print(f"all {len(stream)} batches match eager (worst relative error {worst:.2e})", flush=True)
        results = time_paths({"eager": moe, "compiled": compiled, "compiled+graphs": runner},
                             batches, stream, device)

    from torch._dynamo.utils import counters
    print(f"graphs: {report['num_graphs']} captured in {report['capture_s']:.1f} s "
          f"(+{report['warmup_s']:.1f} s warm-up), {report['pool_bytes'] / 2**20:.0f} MiB pool; "
          f"dynamo: {counters['stats']['unique_graphs']} compiled graph(s), "
          f"{sum(counters['graph_break'].values())} graph breaks")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
