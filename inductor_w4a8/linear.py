"""`W4A8Linear`: a compressed-tensors W4A8 linear layer (DESIGN.md section 3).

Lifecycle as W4A8MoE's: construct (parameters named and shaped like a compressed-tensors Linear:
`weight_packed` int32 [N, K // 8] uint4b8, `weight_scale` bf16 [N, K // G]) -> load ->
`process_weights_after_loading()` (the same ops as the MoE's: nibbles to signed int4, the GEMM
layout, fp8 scales in "fp8" mode) -> forward: bf16 [..., K] -> bf16 [..., N] through one op,
`w4a8::linear` (per-token fp8 activations, the grouped GEMM with one expert), so it compiles with
no graph break and captures in CUDA graphs.
"""
from __future__ import annotations

import torch
from torch import nn

from . import formats, postprocess
from .checks import W4A8InputError, positive_int

__all__ = ["W4A8Linear"]


def _fail(message: str) -> None:
    raise W4A8InputError(f"W4A8Linear: {message}")


def _size(name: str, value) -> int:
    return positive_int(name, value, _fail)


class W4A8Linear(nn.Module):
    """y = x @ W.T (+ bias) with W int4 (group scales along K) and x quantized to fp8 per token.

    Args:
        in_features, out_features: K and N; K a multiple of group_size.
        group_size: 32, 64 or 128.
        bias: add a bf16 [N] bias (kept as loaded).
        scale_mode: "exact" (bf16 group scales) or "fp8" (vLLM's fp8 group x fp32 channel scales).
        device: where the parameters live ("meta" works: shapes only).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 scale_mode: str = formats.DEFAULT_SCALE_MODE, device=None):
        super().__init__()
        K, N, G = _size("in_features", in_features), _size("out_features", out_features), _size("group_size", group_size)
        if problem := formats.group_size_problem(G):
            _fail(problem)
        if K % G:
            _fail(f"in_features={K} is not a multiple of group_size={G}; the int4 weights are "
                  f"quantized in whole groups along K")
        if scale_mode not in formats.SCALE_MODES:
            _fail(f"scale_mode={scale_mode!r} is not supported; use one of {formats.SCALE_MODES}")
        self.in_features, self.out_features, self.group_size = K, N, G
        self.scale_mode = scale_mode
        self.weights_processed = False

        def param(shape, dtype, fill):
            return nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device), requires_grad=False)

        self.weight_packed = param((N, K // formats.NIBBLES_PER_WORD), torch.int32, formats.UINT4B8_ZERO_WORD)
        self.weight_scale = param((N, K // G), torch.bfloat16, 0)
        self.bias = param((N,), torch.bfloat16, 0) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"scale_mode={self.scale_mode!r}, processed={self.weights_processed}")

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int = 128,
                   scale_mode: str = formats.DEFAULT_SCALE_MODE, process_weights: bool = True) -> "W4A8Linear":
        """A layer holding `weight` [N, K] quantized with `formats.quantize_w4` (tests, benchmarks)."""
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            _fail(f"from_float: weight must be a floating [N, K] tensor, got "
                  f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
        N, K = weight.shape
        layer = cls(K, N, group_size, bias=bias is not None, scale_mode=scale_mode, device="meta")
        packed, scale = formats.quantize_w4(weight, group_size)
        state = {"weight_packed": packed, "weight_scale": scale}
        if bias is not None:
            state["bias"] = bias.detach().to(torch.bfloat16).contiguous()
        layer.load_state_dict(state, assign=True)
        if process_weights:
            layer.process_weights_after_loading()
        return layer

    # ----------------------------------------------------------------------------------------
    def _checkpoint_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weights_processed:
            raise RuntimeError("W4A8Linear.process_weights_after_loading: already processed (the "
                               "checkpoint tensors are gone); call it once per load")
        N, K, G = self.out_features, self.in_features, self.group_size
        packed, scale = self.weight_packed.detach(), self.weight_scale.detach()
        for name, t, dtype, shape in (("weight_packed", packed, torch.int32, (N, K // 8)),
                                      ("weight_scale", scale, torch.bfloat16, (N, K // G))):
            if t.dtype != dtype or tuple(t.shape) != shape:
                _fail(f"{name} must be {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        return packed, scale

    def process_weights_after_loading(self, *, check_values: bool | None = None) -> None:
        """Checkpoint tensors -> the GEMM's (the MoE's post-processing ops, with one expert).
        Refuses an unloaded layer and NaN / infinite / negative scales first, under the same
        rule as `postprocess.process_weights_after_loading` (`check_values`)."""
        packed, scale = self._checkpoint_tensors()
        if postprocess.wants_value_checks(check_values, packed):
            postprocess.check_checkpoint_values("", packed, scale, sep="")
        ops = torch.ops.w4a8
        with torch.no_grad():
            packed = packed.reshape(1, *packed.shape).contiguous()
            scale = scale.reshape(1, *scale.shape).contiguous()
            ops.convert_packed_uint4b8_to_signed_int4_(packed)
            weight, _ = ops.encode_and_reorder_int4b_grouped(packed)
            if self.scale_mode == "fp8":
                group_scale, chan_scale = ops.convert_bf16_scales_to_fp8(scale)
            else:
                group_scale, chan_scale = scale, None
        del self.weight_packed, self.weight_scale
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group_scale = nn.Parameter(group_scale, requires_grad=False)
        self.chan_scale = None if chan_scale is None else nn.Parameter(chan_scale, requires_grad=False)
        self.weights_processed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 [..., K] -> bf16 [..., N]."""
        if not self.weights_processed:
            _fail("forward: the weights are not processed; call process_weights_after_loading() "
                  "after loading the checkpoint")
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            _fail(f"forward: x must be a [..., {self.in_features}] tensor, got "
                  f"{tuple(getattr(x, 'shape', ()))}")
        if x.requires_grad and torch.is_grad_enabled():
            _fail("forward: inference only (int4 weights have no gradient); run under torch.no_grad()")
        y = torch.ops.w4a8.linear(x.reshape(-1, self.in_features).contiguous(), self.weight,
                                  self.group_scale, self.chan_scale, self.group_size)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
