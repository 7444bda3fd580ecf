"""A serving loop through the W4A8 MoE layer: decode batches and chunked-prefill chunks.

    python examples/serve_loop.py [--layer glm|small] [--steps 200] [--max-tokens 8192] [--device cuda]

A scheduler with a token budget of --max-tokens per step (vLLM's max_num_batched_tokens) emits a
stream of batches: decode steps of 1..256 tokens, chunked-prefill chunks of random sizes in
1..max (a long prompt is cut into chunks of exactly max tokens, so full 8192-token chunks
occur), and now and then one oversized batch that the runner itself splits. Each batch goes
through CUDAGraphRunner(torch.compile(layer, backend="w4a8")) and is checked against eager;
then the whole stream is timed through eager, compiled, and compiled + CUDA graphs, and the
tokens/s of each are printed, for the whole stream and for its decode steps (<= 256 tokens) and
prefill chunks apart. On CPU (--device cpu) the same loop runs without graphs.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

import inductor_w4a8 as w4a8
from inductor_w4a8 import value_checks
from inductor_w4a8.cudagraph import CUDAGraphRunner
from inductor_w4a8.testing import random_checkpoint_

LAYERS = {
    "glm": dict(num_experts=160, top_k=8, hidden_size=5120, intermediate_size=1536, group_size=128,
                scoring="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.5),
    "small": dict(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, group_size=64),
}


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=sorted(LAYERS), default="glm")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gemm", choices=("triton", "extern"), default="triton")
    p.add_argument("--tol", type=float, default=2e-2, help="max relative error vs eager per batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)

    moe = build_layer(LAYERS[args.layer], device)
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, options={"w4a8.grouped_gemm": args.gemm})
    stream = batch_stream(args.steps, args.max_tokens, args.seed)
    batches = [make_batch(T, moe, device, args.seed + i) for i, T in enumerate(stream)]
    for x, logits in batches:          # the token dim is dynamic: one compiled graph (T=1 aside)
        if x.shape[0] >= 2:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(logits, 0)
    total = sum(stream)
    print(f"layer {args.layer} on {device}: {len(stream)} batches, {total} tokens "
          f"(decode <= 256: {sum(t <= 256 for t in stream)}, full {args.max_tokens}-token chunks: "
          f"{sum(t == args.max_tokens for t in stream)}, above the max: {sum(t > args.max_tokens for t in stream)})")

    with value_checks(False):  # eager value checks synchronize; a serving loop turns them off
        runner = CUDAGraphRunner(compiled, max_num_batched_tokens=args.max_tokens)
        report = runner.capture(*batches[0])

        worst = 0.0
        for i, ((x, logits), T) in enumerate(zip(batches, stream)):
            out, ref = runner(x, logits), moe(x, logits)
            if out.shape != ref.shape or not torch.isfinite(out).all():
                print(f"batch {i} (T={T}): bad output {tuple(out.shape)}", file=sys.stderr)
                return 1
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            worst = max(worst, err)
            if err > args.tol:
                print(f"batch {i} (T={T}): relative error {err:.3e} vs eager > {args.tol}", file=sys.stderr)
                return 1
        print(f"all {len(stream)} batches match eager (worst relative error {worst:.2e})")

        # the whole stream, and its decode steps (<= 256 tokens: launch-bound, where graphs pay)
        # and prefill chunks (GPU-bound) apart
        classes = {"all": batches, "decode": [b for b, T in zip(batches, stream) if T <= 256],
                   "prefill": [b for b, T in zip(batches, stream) if T > 256]}
        results: dict[str, dict[str, tuple[float, float]]] = {}
        for name, fn in (("eager", moe), ("compiled", compiled), ("compiled+graphs", runner)):
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

    from torch._dynamo.utils import counters
    print(f"graphs: {report['num_graphs']} captured in {report['capture_s']:.1f} s "
          f"(+{report['warmup_s']:.1f} s warm-up), {report['pool_bytes'] / 2**20:.0f} MiB pool; "
          f"dynamo: {counters['stats']['unique_graphs']} compiled graph(s), "
          f"{sum(counters['graph_break'].values())} graph breaks")
    print(f"{'':>16}  " + "".join(f"{cls + ' tokens/s (ms/step, x eager)':>42}" for cls in results["eager"]))
    for name, per in results.items():
        cells = [f"{tps:>14,.0f} ({ms:8.3f} ms, {tps / results['eager'][cls][0]:5.2f}x)"
                 for cls, (tps, ms) in per.items()]
        print(f"{name:>16}: " + "".join(f"{c:>42}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
