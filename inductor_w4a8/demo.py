"""The main job, end to end: `python -m inductor_w4a8 demo`.

1. writes a small compressed-tensors W4A8 checkpoint (random bf16 experts quantized with
   formats.quantize_w4, router / norm weights in bf16) to a temporary directory;
2. loads it (inductor_w4a8.weights) into a stack of MoE layers and post-processes the weights;
3. compiles the model with torch.compile(backend="w4a8");
4. on a GPU, captures CUDA graphs at every capture size up to max_num_batched_tokens (8192);
   on CPU the same runner pads and chunks without graphs, on an embedded small config;
5. serves chunked-prefill chunks (exactly max_num_batched_tokens, and a ragged tail) and decode
   batches, and prints accuracy against the bf16 model (cosine, relative error) and timings.

The demo model is a residual stack of MoE layers (RMSNorm -> router -> W4A8MoE), the part of a
transformer this package replaces; every token is independent, so padding and chunking are exact.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, reference
from .cli import device_or_exit, output_file
from .weights import load_w4a8_checkpoint, save_w4a8_checkpoint


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    group_size: int
    scoring: str
    n_group: int | None
    topk_group: int | None
    routed_scaling_factor: float
    max_num_batched_tokens: int
    prefill_tokens: int                       # one prompt, served in chunks of at most the max
    decode_batches: tuple[int, ...]
    capture_sizes: tuple[int, ...] | None     # None: cudagraph.capture_sizes(max) (GPU)
    repeats: int                              # timing repetitions (median)

    def hf_config(self) -> dict:
        """The config.json of the demo checkpoint (HF MoE names, read back by weights.py)."""
        return {"architectures": ["W4A8DemoMoEModel"], "model_type": "w4a8_demo_moe",
                "num_hidden_layers": self.num_layers, "hidden_size": self.hidden_size,
                "moe_intermediate_size": self.intermediate_size, "n_routed_experts": self.num_experts,
                "num_experts_per_tok": self.top_k, "scoring_func": self.scoring, "norm_topk_prob": True,
                "n_group": self.n_group, "topk_group": self.topk_group,
                "routed_scaling_factor": self.routed_scaling_factor, "rms_norm_eps": 1e-6,
                "max_num_batched_tokens": self.max_num_batched_tokens, "torch_dtype": "bfloat16"}


PRESETS = {
    # CPU: small enough to compile and serve in well under a minute on two cores
    "cpu": DemoConfig(num_layers=2, num_experts=8, top_k=2, hidden_size=256, intermediate_size=256,
                      group_size=128, scoring="softmax", n_group=None, topk_group=None,
                      routed_scaling_factor=1.0, max_num_batched_tokens=256, prefill_tokens=600,
                      decode_batches=(1, 4, 16), capture_sizes=(8, 64, 256), repeats=1),
    # GPU: GLM-4.6-style routing (sigmoid, grouped top-k, scaled), 8192-token chunked prefill
    "gpu": DemoConfig(num_layers=4, num_experts=64, top_k=8, hidden_size=2048, intermediate_size=768,
                      group_size=128, scoring="sigmoid", n_group=8, topk_group=4,
                      routed_scaling_factor=2.5, max_num_batched_tokens=8192, prefill_tokens=20000,
                      decode_batches=(1, 8, 64, 256), capture_sizes=None, repeats=5),
}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # fp32 throughout, one rounding at the end: eager and Inductor's fused kernel then agree (a
    # bf16 rounding in the middle, which Inductor fuses away, flips near-tie routing decisions)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class DenseBF16MoE(nn.Module):
    """The bf16 reference: the same routing (reference.select_experts), unquantized experts."""

    def __init__(self, w1, w3, w2, *, top_k, scoring, renormalize, n_group, topk_group,
                 routed_scaling_factor, e_score_correction_bias=None):
        super().__init__()
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.bias = e_score_correction_bias
        self.route = (top_k, scoring, renormalize, n_group or 0, topk_group or 0, routed_scaling_factor)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = reference.select_experts(router_logits, self.bias, *self.route)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.w1.shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = F.silu(xe @ self.w1[e].T).float() * (xe @ self.w3[e].T).float()
            y = h.to(x.dtype) @ self.w2[e].T
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return out.to(x.dtype)


class DemoMoELayer(nn.Module):
    def __init__(self, norm_weight, router_weight, moe: nn.Module):
        super().__init__()
        self.norm_weight = nn.Parameter(norm_weight, requires_grad=False)
        self.router_weight = nn.Parameter(router_weight, requires_grad=False)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.norm_weight)
        # fp32 router logits (as DeepSeek-V3 / GLM): bf16 ones differ between GEMM backends by an
        # ulp, enough to flip near-tie routing between eager and compiled runs
        logits = F.linear(h.float(), self.router_weight.float())
        return x + self.moe(h, logits)


class DemoMoEModel(nn.Module):
    """hidden_states [T, H] bf16 -> [T, H] bf16 through a residual stack of MoE layers."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


def random_weights(cfg: DemoConfig, seed: int = 0) -> dict:
    """Random bf16 weights of the demo model, by checkpoint name (experts as (w1, w3, w2))."""
    g = torch.Generator().manual_seed(seed)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    experts, tensors = {}, {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp"
        experts[p] = (randn(E, I, H, std=H ** -0.5), randn(E, I, H, std=H ** -0.5),
                      randn(E, H, I, std=I ** -0.5))
        tensors[f"{p}.gate.weight"] = randn(E, H, std=H ** -0.5)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = (
            1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16)
        if cfg.scoring == "sigmoid":
            tensors[f"{p}.gate.e_score_correction_bias"] = 0.1 * torch.randn(E, generator=g)
    return {"experts": experts, "tensors": tensors}


def build_w4a8_model(ckpt, cfg: DemoConfig) -> DemoMoEModel:
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp"
        layers.append(DemoMoELayer(ckpt.tensors[f"model.layers.{i}.post_attention_layernorm.weight"],
                                   ckpt.tensors[f"{p}.gate.weight"], ckpt.moe_layers[p]))
    return DemoMoEModel(layers)


def _dequantized(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w as the checkpoint stores it (formats.quantize_w4), dequantized back to bf16."""
    packed, scale = formats.quantize_w4(w, group_size)
    return formats.dequantize_w4(formats.unpack_int4(packed, biased=True), scale, group_size).to(w.dtype)


def build_bf16_model(weights: dict, cfg: DemoConfig, device, dequantize: bool = False) -> DemoMoEModel:
    """The bf16 model (dequantize=False), or the bf16 model of the checkpoint's dequantized int4
    weights (dequantize=True: what the W4A8 kernels compute, up to the fp8 activations)."""
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp"
        w1, w3, w2 = (_dequantized(w, cfg.group_size) if dequantize else w for w in weights["experts"][p])
        w1, w3, w2 = w1.to(device), w3.to(device), w2.to(device)
        bias = weights["tensors"].get(f"{p}.gate.e_score_correction_bias")
        moe = DenseBF16MoE(w1, w3, w2, top_k=cfg.top_k, scoring=cfg.scoring, renormalize=True,
                           n_group=cfg.n_group, topk_group=cfg.topk_group,
                           routed_scaling_factor=cfg.routed_scaling_factor,
                           e_score_correction_bias=None if bias is None else bias.to(device))
        layers.append(DemoMoELayer(weights["tensors"][f"model.layers.{i}.post_attention_layernorm.weight"].to(device),
                                   weights["tensors"][f"{p}.gate.weight"].to(device), moe))
    return DemoMoEModel(layers)


# ------------------------------------------------------------------------------------------------
# Serving
# ------------------------------------------------------------------------------------------------
def schedule(cfg: DemoConfig) -> list[tuple[str, int]]:
    """Batches a serving loop sends: chunked prefill of one long prompt (full chunks of exactly
    max_num_batched_tokens, then the tail), then decode steps of a few batch sizes."""
    M, P = cfg.max_num_batched_tokens, cfg.prefill_tokens
    batches = [(f"prefill chunk {i + 1}", min(M, P - lo)) for i, lo in enumerate(range(0, P, M))]
    return batches + [(f"decode bs={b}", b) for b in cfg.decode_batches]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, x, repeats, device):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def layer_by_layer_rel_errors(model: DemoMoEModel, ref_model: DemoMoEModel, x: torch.Tensor) -> list[float]:
    """Each layer of `model` on the hidden states `ref_model` feeds its own layer (teacher forcing):
    the relative error of what each layer adds to the residual stream. End to end, a near-tie
    routing decision that a small error flips in one layer sends a token to other experts in every
    later layer, so the end-to-end error of a deep stack measures the routing's sensitivity; this
    one measures the layer."""
    errors, h = [], x
    for ours, ref in zip(model.layers, ref_model.layers):
        h_next = ref(h)
        errors.append(rel_error(ours(h).float() - h.float(), h_next.float() - h.float()))
        h = h_next
    return errors


def run(preset: str = "auto", device: str | None = None, backend: str = "w4a8", workdir=None,
        scale_mode: str | None = None, out=sys.stdout, progress: bool = False) -> dict:
    """Run the demo; returns its measurements (also printed). progress: the graph runner's
    per-size progress (stderr) during step 3."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if preset == "auto":
        preset = "gpu" if dev.type == "cuda" else "cpu"
    cfg = PRESETS[preset]
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    _say_header(say, preset, cfg, dev)
    result = {"preset": preset, "device": str(dev), "config": dataclasses.asdict(cfg), "batches": []}
    weights = random_weights(cfg)          # generated on CPU (same numbers everywhere), used on dev
    weights = {"experts": {k: tuple(w.to(dev) for w in v) for k, v in weights["experts"].items()},
               "tensors": {k: v.to(dev) for k, v in weights["tensors"].items()}}
    ckpt = _write_and_load(say, weights, cfg, dev, scale_mode, workdir)
    model = build_w4a8_model(ckpt, cfg).eval()
    ref_model = build_bf16_model(weights, cfg, dev).eval()
    deq_model = build_bf16_model(weights, cfg, dev, dequantize=True).eval()
    runner, report = _compile_and_capture(say, model, cfg, dev, backend, progress)
    result.update(capture=report, capture_sizes=list(runner.sizes))
    result["batches"] = _serve(say, model, runner, ref_model, deq_model, cfg, dev)
    _say_summary(say, result, report, dev)
    return result


def _say_header(say, preset, cfg, dev) -> None:
    if preset == "gpu" and dev.type == "cpu":
        say("note: preset 'gpu' on cpu runs the fp64 reference kernels on 4 layers of E=64 and "
            "71 sizes up to 8192 tokens: expect well over an hour; --preset cpu is sized for a CPU")
    say(f"inductor_w4a8 demo: device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}),"
        f" torch {torch.__version__}, preset {preset!r}")
    say(f"  model: {cfg.num_layers} MoE layers, E={cfg.num_experts}, top-{cfg.top_k}, H={cfg.hidden_size}, "
        f"I={cfg.intermediate_size}, group {cfg.group_size}, {cfg.scoring} routing"
        + (f" (n_group={cfg.n_group}, topk_group={cfg.topk_group}, scale {cfg.routed_scaling_factor})"
           if cfg.n_group else ""))


def _write_and_load(say, weights, cfg, dev, scale_mode, workdir):
    """Steps 1-2: the weights as a compressed-tensors checkpoint on disk, then loaded back."""
    with tempfile.TemporaryDirectory(prefix="w4a8_demo_", dir=workdir) as tmp:
        t = time.perf_counter()
        path = save_w4a8_checkpoint(Path(tmp) / "checkpoint", weights["experts"], group_size=cfg.group_size,
                                    config=cfg.hf_config(), tensors=weights["tensors"])
        files = sorted(path.iterdir())
        size = sum(f.stat().st_size for f in files)
        qc = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        say(f"[1/5] wrote a compressed-tensors W4A8 checkpoint ({', '.join(f.name for f in files)}; "
            f"{size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f} s")
        say(f"      weights: {qc['weights']['num_bits']}-bit {qc['weights']['type']} symmetric, strategy "
            f"{qc['weights']['strategy']}, group {qc['weights']['group_size']}; activations: "
            f"{qc['input_activations']['num_bits']}-bit {qc['input_activations']['type']} dynamic per "
            f"{qc['input_activations']['strategy']}")
        t = time.perf_counter()
        ckpt = load_w4a8_checkpoint(path, device=dev, scale_mode=scale_mode)
        _sync(dev)
        moe0 = next(iter(ckpt.moe_layers.values()))
        say(f"[2/5] loaded {len(ckpt.moe_layers)} MoE layers and post-processed them "
            f"(scale_mode={moe0.scale_mode!r}) in {time.perf_counter() - t:.1f} s")
    return ckpt


def _compile_and_capture(say, model, cfg, dev, backend, progress):
    """Steps 3-4: torch.compile, warm-up and CUDA-graph capture of every size."""
    from .cudagraph import CUDAGraphRunner
    H, M = cfg.hidden_size, cfg.max_num_batched_tokens
    t = time.perf_counter()
    compiled = torch.compile(model, backend=backend)
    runner = CUDAGraphRunner(compiled, max_num_batched_tokens=M, capture_sizes=cfg.capture_sizes,
                             progress=progress)
    say(f"[3/5] torch.compile(backend={backend!r}) and warm-up of {len(runner.sizes)} sizes "
        f"(1..{M} tokens){' (progress on stderr)' if progress else ''} ...")
    with torch.no_grad():
        report = runner.capture(torch.zeros(1, H, dtype=torch.bfloat16, device=dev))
        model(torch.zeros(8, H, dtype=torch.bfloat16, device=dev))        # eager warm-up (Triton JIT)
    _sync(dev)
    say(f"      compiled and warmed up in {time.perf_counter() - t:.1f} s")
    if report["num_graphs"]:
        say(f"[4/5] captured {report['num_graphs']} CUDA graphs (sizes {runner.sizes[0]}..{runner.sizes[-1]}) "
            f"in {report['capture_s']:.1f} s, graph pool {report['pool_bytes'] / 2**20:.0f} MiB")
    else:
        say(f"[4/5] no CUDA graphs on {dev.type}: the runner pads to the sizes {list(runner.sizes)} and "
            f"chunks above {M} tokens, running the compiled model directly")
    return runner, report


def _serve(say, model, runner, ref_model, deq_model, cfg, dev) -> list[dict]:
    """Step 5: the batch schedule, eager and served, with the accuracy of each batch."""
    H, M = cfg.hidden_size, cfg.max_num_batched_tokens
    say(f"[5/5] serving {len(schedule(cfg))} batches (prefill of {cfg.prefill_tokens} tokens in chunks "
        f"of at most {M}, then decode):")
    say("  accuracy of what the MoE layers add to the residual stream: cosine and relative error vs")
    say("  the bf16 model (includes int4 rounding of the weights), relative error vs the bf16 model of")
    say("  the dequantized int4 weights (the kernels' own error: fp8 activations), and vs our eager run;")
    say("  'layer deq': the worst layer fed the dequantized model's own hidden states (routing identical,")
    say("  so it is the kernels' error per layer; end to end it compounds with near-tie routing flips)")
    say(f"  {'batch':<17}{'tokens':>7}{'eager ms':>10}{'served ms':>11}{'cos bf16':>10}{'rel bf16':>10}"
        f"{'rel deq':>9}{'layer deq':>10}{'vs eager':>10}")
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    with torch.no_grad():
        for name, T in schedule(cfg):
            x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
            y_eager, t_eager = _timed(model, x, cfg.repeats, dev)
            y, t_served = _timed(runner, x, cfg.repeats, dev)
            # accuracy of what the layers add to the residual stream (the residual itself is exact)
            d, d_ref, d_deq, d_eager = (m.float() - x.float() for m in (y, ref_model(x), deq_model(x), y_eager))
            row = {"batch": name, "tokens": T, "eager_ms": 1e3 * t_eager, "served_ms": 1e3 * t_served,
                   "cosine": cosine(d, d_ref), "rel_error": rel_error(d, d_ref),
                   "rel_error_dequantized": rel_error(d, d_deq),
                   "layer_rel_errors_dequantized": layer_by_layer_rel_errors(model, deq_model, x),
                   "vs_eager_rel": rel_error(d, d_eager)}
            rows.append(row)
            say(f"  {name:<17}{T:>7}{row['eager_ms']:>10.2f}{row['served_ms']:>11.2f}{row['cosine']:>10.5f}"
                f"{row['rel_error']:>10.4f}{row['rel_error_dequantized']:>9.4f}"
                f"{max(row['layer_rel_errors_dequantized']):>10.4f}{row['vs_eager_rel']:>10.1e}")
    return rows


def _say_summary(say, result, report, dev) -> None:
    batches = result["batches"]
    tokens = sum(r["tokens"] for r in batches)
    worst_cos = min(r["cosine"] for r in batches)
    worst_rel = max(r["rel_error"] for r in batches)
    worst_deq = max(r["rel_error_dequantized"] for r in batches)
    worst_layer = max(max(r["layer_rel_errors_dequantized"]) for r in batches)
    result.update(worst_cosine=worst_cos, worst_rel_error=worst_rel, worst_rel_error_dequantized=worst_deq,
                  worst_layer_rel_error_dequantized=worst_layer,
                  served_tokens_per_s=tokens / (sum(r["served_ms"] for r in batches) / 1e3),
                  eager_tokens_per_s=tokens / (sum(r["eager_ms"] for r in batches) / 1e3))
    say(f"accuracy: vs bf16 worst cosine {worst_cos:.5f}, worst rel error {worst_rel:.4f}; vs the "
        f"dequantized-int4 bf16 model worst rel error {worst_deq:.4f} end to end, {worst_layer:.4f} "
        f"per layer")
    say(f"throughput: served {result['served_tokens_per_s']:,.0f} tokens/s "
        f"({'compiled + CUDA graphs' if report['num_graphs'] else 'compiled'}), eager "
        f"{result['eager_tokens_per_s']:,.0f} tokens/s"
        + ("; on CPU the ops run their fp64 reference kernels and the runner pads to capture sizes, "
           "so CPU timings say little" if dev.type == "cpu" else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m inductor_w4a8 demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("auto",) + tuple(PRESETS), default="auto",
                   help="model size: 'gpu' on CUDA, 'cpu' otherwise (default: auto)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backend", default="w4a8", help="torch.compile backend (default: w4a8)")
    p.add_argument("--scale-mode", choices=("exact", "fp8"), default=None,
                   help="W4A8MoE scale mode (default: the package default)")
    p.add_argument("--json", type=output_file, default=None,
                   help="also write the measurements to this JSON file (its folder must exist)")
    p.add_argument("--quiet", action="store_true", help="no per-size progress on stderr")
    args = p.parse_args(argv)
    device = device_or_exit(p.prog, args.device)
    result = run(args.preset, str(device), args.backend, scale_mode=args.scale_mode,
                 progress=not args.quiet)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
