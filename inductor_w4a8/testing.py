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
