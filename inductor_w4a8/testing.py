"""Helpers for tests: an fp8-aware opcheck, output poisoning, random MoE data, error metrics."""
from __future__ import annotations

import contextlib
import unittest.mock

import torch

from . import formats

_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                  "float8_e5m2fnuz") if hasattr(torch, n))
_original_allclose = torch.allclose


def _fp8_aware_allclose(lhs, rhs, *args, **kwargs):
    # opcheck's test_schema compares inputs before/after with torch.allclose, which has no fp8
    # kernel on CPU; fp8 tensors are compared bitwise through a uint8 view instead.
    if isinstance(lhs, torch.Tensor) and lhs.dtype in _FP8_DTYPES:
        return lhs.shape == rhs.shape and torch.equal(lhs.view(torch.uint8), rhs.view(torch.uint8))
    return _original_allclose(lhs, rhs, *args, **kwargs)


@contextlib.contextmanager
def fp8_bitwise_allclose():
    with unittest.mock.patch.object(torch, "allclose", _fp8_aware_allclose):
        yield


def opcheck(op, args, kwargs=None, **opcheck_kwargs):
    """torch.library.opcheck with fp8 inputs compared bitwise; raises on any failure."""
    with fp8_bitwise_allclose():
        return torch.library.opcheck(op, args, kwargs, **opcheck_kwargs)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or an out-of-range sentinel (ints) so unwritten elements show."""
    if t.dtype in _FP8_DTYPES:
        t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


# The normwise error one grouped GEMM may have on the GPU against the exact (fp64) product of its
# own fp8/int4 inputs, bf16 output rounding included (Hopper's fp8 wgmma accumulates with reduced
# precision; tests/test_grouped_gemm.py holds every tile and group size to it).
GEMM_TOL_GPU = 3e-3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise ||out - ref|| / ||ref|| in fp64; NaN in `out` gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def random_w4_weights(E: int, N: int, K: int, group_size: int, *, device="cpu", generator=None):
    """Random bf16 weights [E, N, K] quantized: (uint4b8 packed int32, bf16 scales, bf16 source)."""
    w = (torch.randn(E, N, K, generator=generator, device="cpu") * 0.05).to(torch.bfloat16)
    packed, scale = formats.quantize_w4(w, group_size)
    return packed.to(device), scale.to(device), w.to(device)


def random_expert_offsets(R: int, E: int, *, empty_experts: int = 0, generator=None) -> torch.Tensor:
    """int64 [E + 1] cumulative offsets splitting R rows over E experts, some experts empty."""
    weights = torch.rand(E, generator=generator)
    if empty_experts:
        weights[torch.randperm(E, generator=generator)[:empty_experts]] = 0
    if weights.sum() == 0:
        weights[0] = 1
    counts = torch.distributions.Multinomial(total_count=R, probs=weights / weights.sum()).sample().long() \
        if R else torch.zeros(E, dtype=torch.long)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


@contextlib.contextmanager
def poisoned_empty():
    """Every `torch.empty` / `torch.empty_like` in the block returns a poisoned tensor (`poison_`),
    so an output element a kernel fails to write shows up as NaN or a sentinel."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        return poison_(empty(*args, **kwargs))

    def poisoned_like(*args, **kwargs):
        return poison_(empty_like(*args, **kwargs))

    with unittest.mock.patch.object(torch, "empty", poisoned), \
            unittest.mock.patch.object(torch, "empty_like", poisoned_like):
        yield


def capture_cuda_graph(fn, *args):
    """(graph, out): fn(*args) run once on a side stream (warm-up, as torch's docs ask), then
    captured into a CUDA graph whose replays rewrite `out` from the same argument tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out


def routing_choice_scores(router_logits: torch.Tensor, correction_bias: torch.Tensor | None,
                          scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (scores, choice) of vLLM routing: scores weigh the experts, choice = scores + bias picks them."""
    logits = router_logits.double().cpu()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.double().cpu()
    return scores, choice


def assert_valid_routing(weights: torch.Tensor, ids: torch.Tensor, router_logits: torch.Tensor,
                         correction_bias: torch.Tensor | None, top_k: int, scoring: str,
                         renormalize: bool, n_group: int, topk_group: int,
                         routed_scaling_factor: float, *, eps: float = 1e-5) -> None:
    """Check a routing against vLLM's semantics, accepting any choice among near-ties (|diff| <= eps).

    Kernels compute exp with their own rounding, so when two experts (or two groups) tie to within
    an ulp, either is right; this checks that the chosen experts are distinct, in range, among the
    best top_k of the kept groups up to eps, that the kept groups are among the best topk_group up
    to eps, and that the weights are the chosen experts' scores (renormalized, scaled) to 1e-5.
    """
    T, E = router_logits.shape
    assert weights.shape == (T, top_k) and ids.shape == (T, top_k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    ids = ids.long().cpu()
    assert bool(((ids >= 0) & (ids < E)).all()), "expert id out of range"
    if T == 0:
        return
    assert bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()), "an expert chosen twice"
    scores, choice = routing_choice_scores(router_logits, correction_bias, scoring)
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    candidates = torch.ones(T, E, dtype=torch.bool)
    if n_group and topk_group < n_group:
        per_group = choice.view(T, n_group, E // n_group)
        if correction_bias is not None:
            gs = per_group.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
        else:
            gs = per_group.amax(dim=-1)
        ranked = gs.sort(dim=-1, descending=True).values
        used = chosen.view(T, n_group, -1).any(dim=-1)
        assert bool((used.sum(dim=-1) <= topk_group).all()), "experts from too many groups"
        last_kept = ranked[:, topk_group - 1 : topk_group]
        first_dropped = ranked[:, topk_group : topk_group + 1]
        assert bool((gs[used] >= last_kept.expand_as(gs)[used] - eps).all()), "a group that is not among the best"
        surely_kept = gs > first_dropped + eps
        candidates = (surely_kept | used).unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    worst_chosen = torch.where(chosen, choice, torch.inf).amin(dim=-1)
    best_other = torch.where(candidates & ~chosen, choice, -torch.inf).amax(dim=-1)
    bad = worst_chosen < best_other - eps
    assert not bool(bad.any()), f"rows {bad.nonzero().flatten()[:8].tolist()} skip a better expert"
    expect = scores.gather(1, ids)
    if renormalize:
        expect = expect / expect.sum(dim=-1, keepdim=True)
    expect = expect * routed_scaling_factor
    torch.testing.assert_close(weights.double().cpu(), expect, rtol=1e-5, atol=1e-6)


def every_bf16_fp8_range_row() -> torch.Tensor:
    """bf16 [1, ~35k]: 448 followed by every bf16 value in [-448, 448].

    Quantized per row (scale exactly 1) or converted as scales (channel scale 1 before the x8
    headroom), it sends every rounding case of bf16 -> e4m3 through the kernel under test: ties
    between e4m3 neighbours, the subnormal range, both zeros.
    """
    every = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    in_range = every[torch.isfinite(every) & (every.float().abs() <= formats.FP8_MAX)]
    return torch.cat([torch.tensor([formats.FP8_MAX], dtype=torch.bfloat16), in_range]).reshape(1, -1)


def random_checkpoint_(moe, seed: int = 0):
    """Fill a checkpoint-form W4A8MoE (before process_weights_after_loading) in place with random
    int4 words and group scales (and correction bias), on the layer's own device. Fast at GLM
    size: no bf16 weights are materialized. Scales ~ U(0.015, 0.025), about amax / 7.5 of
    N(0, 0.05) weights, so outputs stay in a realistic range."""
    device = next(moe.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if p.dtype == torch.int32:
                words = torch.randint(-2**31, 2**31 - 1, p.shape, dtype=torch.int64, device=device, generator=g)
                p.copy_(words.to(torch.int32))
            elif name.endswith("weight_scale"):
                p.copy_((torch.rand(p.shape, device=device, generator=g) * 0.01 + 0.015).to(p.dtype))
            else:  # e_score_correction_bias
                p.copy_(torch.randn(p.shape, device=device, generator=g) * 0.1)
    return moe


# --------------------------------------------------------------------------------------------
# Looking inside a block: the outputs of the w4a8 ops one forward called
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_op_outputs(*op_names: str):
    """Inside the block, every call of a `w4a8::<name>` op in `op_names` appends its outputs to
    the yielded dict's list under that name (through a TorchDispatchMode: the module's forward is
    not touched). For checking a chained computation one link at a time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    unknown = [name for name in op_names if not hasattr(torch.ops.w4a8, name)]
    if unknown:
        raise ValueError(f"recorded_op_outputs: no w4a8 op named {unknown}")
    wanted = {f"w4a8::{name}" for name in op_names}
    recorded: dict[str, list] = {name: [] for name in op_names}

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.name()
            if name in wanted:
                recorded[name.split("::", 1)[1]].append(out)
            return out

    with _Recorder():
        yield recorded


# --------------------------------------------------------------------------------------------
# Running Triton kernels under the interpreter (CPU CI)
# --------------------------------------------------------------------------------------------
TRITON_INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str, select: str | None = None, timeout: int = 1800) -> str:
    """Re-run `test_file` (optionally only tests matching `select`) in a child pytest with
    TRITON_INTERPRET=1 — the variable must be set before triton is imported, so it cannot be
    switched on inside this process. Asserts the child passed with nothing skipped; returns its
    output."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"interpreted run failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-5000:]
    return proc.stdout


def gluon_gemm_sm90(tile, group_size: int, has_chan: bool, maxnreg: int | None = None):
    """The Gluon grouped GEMM (kernels/grouped_gemm_wgmma.py) compiled for sm_90 on this machine
    (no GPU needed) for a wgmma tile, with the launcher's argument specializations: 16-byte
    aligned pointers, K % 16 == 0. maxnreg None: the launcher's register cap for the tile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from .kernels.grouped_gemm_wgmma import w4a8_grouped_gemm_wgmma_kernel
    from .launch.grouped_gemm import register_cap
    sig = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", w_ptr="*i32",
               s_ptr="*fp8e4nv" if has_chan else "*bf16", chan_ptr="*fp32", off_ptr="*i64",
               out_ptr="*bf16", R="i32", N="i32", K="i32", E="i32")
    const = dict(GROUP=group_size, HAS_CHAN=has_chan, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                 BLOCK_E=256, STAGES=tile.num_stages, KG_PAD=64, num_warps=tile.num_warps)
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 9)}
    src = GluonASTSource(fn=w4a8_grouped_gemm_wgmma_kernel, signature=sig, constexprs=const,
                         attrs=attrs)
    cap = register_cap(tile) if maxnreg is None else maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=tile.num_warps, maxnreg=cap))
