"""`W4A8MoE`: the Mixture-of-Experts block users touch (DESIGN.md section 3).

Lifecycle, as in vLLM: construct (parameters named and shaped like a compressed-tensors
checkpoint) -> `load_state_dict` -> `process_weights_after_loading()` (int4 re-encoding for the
GEMM, scale conversion) -> `forward(hidden_states, router_logits)`.

forward is a straight line of `torch.ops.w4a8` ops, so torch.compile(fullgraph=True) sees only
our ops and the block is CUDA-graph capturable (no host sync, no value-dependent shape):

    select_and_sort_experts -> quantize_scatter_fp8 -> grouped_gemm(w13)
    -> silu_mul_quantize_fp8 -> grouped_gemm(w2) -> combine

(router: top-k experts per token and the (token, slot) pairs sorted by expert -> dispatch: each
token quantized once and written to its top_k expert-sorted rows -> experts: two grouped GEMMs
around the activation -> combine: the weighted sum of a token's rows).

It runs on CPU (the ops' CPU kernels), CUDA (Triton) and meta tensors (the fake kernels).
Eagerly, when nothing observes the dispatcher, the same kernels are called directly (eager.py)
and, at decode sizes on CUDA, replayed from a CUDA graph of the whole block (eager_graphs.py).
"""
from __future__ import annotations

import functools
import numbers

import torch
from torch import nn

from . import eager, eager_graphs, formats
from .checks import W4A8InputError, positive_int

SCORING_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fail(message: str) -> None:
    raise W4A8InputError(f"W4A8MoE: {message}")


def _positive_int(name: str, value) -> int:
    return positive_int(name, value, _fail)


class W4A8MoE(nn.Module):
    """W4A8 MoE block: int4 expert weights (per-group scales along K), fp8 per-token activations,
    bf16 in and out.

    Args:
        num_experts, top_k, hidden_size, intermediate_size: E, k, H, I.
        group_size: weight quantization group along K (32, 64 or 128); H and I are multiples of it.
        scoring: "softmax" (top-k of the softmax, weights renormalized when `renormalize`) or
            "sigmoid" (DeepSeek-V3 / GLM-4.x: `e_score_correction_bias` steers the choice only;
            grouped top-k when `n_group` is set).
        n_group, topk_group: grouped top-k: keep the `topk_group` best of `n_group` expert groups.
        routed_scaling_factor: multiplies the routing weights.
        scale_mode: "exact" (bf16 group scales as loaded) or "fp8" (vLLM's fp8 group scales x
            fp32 channel scales); see `formats.DEFAULT_SCALE_MODE`.
        params_dtype: dtype of the checkpoint's group scales and of the activations (bf16).
        device: where the parameters live ("meta" works: shapes only).

    Parameters (checkpoint names; `load_state_dict` fills them):
        w13_weight_packed int32 [E, 2I, H // 8]   w13_weight_scale bf16 [E, 2I, H // G]
        w2_weight_packed  int32 [E, H, I // 8]    w2_weight_scale  bf16 [E, H, I // G]
        e_score_correction_bias fp32 [E]          (sigmoid scoring only; None otherwise)
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 group_size: int = 128, scoring: str = "softmax", renormalize: bool = True,
                 n_group: int | None = None, topk_group: int | None = None,
                 routed_scaling_factor: float = 1.0, scale_mode: str = formats.DEFAULT_SCALE_MODE,
                 params_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        E = _positive_int("num_experts", num_experts)
        top_k = _positive_int("top_k", top_k)
        H = _positive_int("hidden_size", hidden_size)
        I = _positive_int("intermediate_size", intermediate_size)
        G = _positive_int("group_size", group_size)
        if problem := formats.group_size_problem(G):
            _fail(problem)
        for name, size in (("hidden_size", H), ("intermediate_size", I)):
            if size % G:
                _fail(f"{name}={size} is not a multiple of group_size={G}; the int4 weights are "
                      f"quantized in whole groups along K (pad {name} up to a multiple of {G})")
        if top_k > E:
            _fail(f"top_k={top_k} must be <= num_experts={E}")
        if scoring not in SCORING_FUNCTIONS:
            _fail(f"scoring={scoring!r} is not supported; use one of {SCORING_FUNCTIONS}")
        if (n_group is None) != (topk_group is None):
            _fail(f"n_group={n_group!r} and topk_group={topk_group!r}: set both (grouped top-k) "
                  f"or neither")
        if n_group is not None:
            n_group = _positive_int("n_group", n_group)
            topk_group = _positive_int("topk_group", topk_group)
            if E % n_group:
                _fail(f"num_experts={E} is not a multiple of n_group={n_group}")
            if topk_group > n_group:
                _fail(f"topk_group={topk_group} must be <= n_group={n_group}")
            if top_k > topk_group * (E // n_group):
                _fail(f"top_k={top_k} exceeds the {topk_group * (E // n_group)} experts of the "
                      f"topk_group={topk_group} groups of {E // n_group} that grouped top-k keeps")
        if not isinstance(routed_scaling_factor, numbers.Real) or isinstance(routed_scaling_factor, bool):
            _fail(f"routed_scaling_factor must be a float, got {routed_scaling_factor!r}")
        if scale_mode not in formats.SCALE_MODES:
            _fail(f"scale_mode={scale_mode!r} is not supported; use one of {formats.SCALE_MODES}")
        if params_dtype != torch.bfloat16:
            _fail(f"params_dtype={params_dtype} is not supported; the checkpoint's group scales "
                  f"and the activations are torch.bfloat16")

        self.num_experts, self.top_k = E, top_k
        self.hidden_size, self.intermediate_size, self.group_size = H, I, G
        self.scoring, self.renormalize = scoring, bool(renormalize)
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.scale_mode = scale_mode
        self.params_dtype = params_dtype
        self.weights_processed = False

        def param(shape, dtype, fill):
            return nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device), requires_grad=False)

        # all-zero weights until a checkpoint is loaded (nibble 8 is q = 0 in uint4b8)
        self.w13_weight_packed = param((E, 2 * I, H // 8), torch.int32, formats.UINT4B8_ZERO_WORD)
        self.w13_weight_scale = param((E, 2 * I, H // G), params_dtype, 0)
        self.w2_weight_packed = param((E, H, I // 8), torch.int32, formats.UINT4B8_ZERO_WORD)
        self.w2_weight_scale = param((E, H, I // G), params_dtype, 0)
        if scoring == "sigmoid":
            self.e_score_correction_bias = param((E,), torch.float32, 0)
        else:
            self.register_parameter("e_score_correction_bias", None)

    # ----------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        s = (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
             f"intermediate_size={self.intermediate_size}, group_size={self.group_size}, "
             f"scoring={self.scoring!r}, renormalize={self.renormalize}")
        if self.n_group is not None:
            s += f", n_group={self.n_group}, topk_group={self.topk_group}"
        if self.routed_scaling_factor != 1.0:
            s += f", routed_scaling_factor={self.routed_scaling_factor}"
        return s + f", scale_mode={self.scale_mode!r}, processed={self.weights_processed}"

    def process_weights_after_loading(self, *, check_values: bool | None = None) -> None:
        """Checkpoint tensors -> the GEMM's (see `inductor_w4a8.postprocess`); once per load."""
        from .postprocess import process_weights_after_loading
        process_weights_after_loading(self, check_values=check_values)

    # ----------------------------------------------------------------------------------------
    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # The input checks run here, outside forward, so that under torch.compile(moe) they run
        # before Dynamo traces anything (backend.register() has Dynamo run this frame and
        # check_forward_inputs as plain Python): a bad input raises our W4A8InputError, not
        # Dynamo's "Observed exception". Inside a larger compiled model this frame is traced
        # like any other code (nothing here breaks the graph).
        check_forward_inputs(self, hidden_states, router_logits)
        return nn.Module.__call__(self, hidden_states, router_logits)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """bf16 [T, H], router logits [T, E] -> bf16 [T, H]. Inference only (see __call__)."""
        if not torch.compiler.is_compiling():
            # eager with nothing watching the dispatcher: the same kernels, called directly
            kernels, key, checked = eager.direct_kernels(self, hidden_states, router_logits)
            if kernels is not None and not checked:
                # decode sizes: the same unchecked kernels, replayed from a CUDA graph
                out = eager_graphs.replay(self, functools.partial(self._run, kernels), key,
                                          hidden_states, router_logits)
                if out is not None:
                    return out
            if kernels is not None:
                out = self._run(kernels, hidden_states, router_logits)
                if checked and key is not None:
                    eager.remember_checked(self, key)
                return out
        return self._run(torch.ops.w4a8, hidden_states, router_logits)

    def _run(self, ops, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The block as a straight line of `ops` (torch.ops.w4a8, or the same kernels direct)."""
        G = self.group_size
        topk_weights, _, _, flat_to_sorted, offsets = ops.select_and_sort_experts(
            router_logits, self.e_score_correction_bias, self.top_k, self.scoring,
            self.renormalize, self.n_group or 0, self.topk_group or 0, self.routed_scaling_factor)
        a, a_scale = ops.quantize_scatter_fp8(hidden_states.contiguous(), flat_to_sorted)
        h = ops.grouped_gemm(a, a_scale, self.w13_weight, self.w13_group_scale, self.w13_chan_scale,
                             offsets, G)
        hq, h_scale = ops.silu_mul_quantize_fp8(h)
        y = ops.grouped_gemm(hq, h_scale, self.w2_weight, self.w2_group_scale, self.w2_chan_scale,
                             offsets, G)
        return ops.combine(y, flat_to_sorted, topk_weights)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *, top_k: int,
                   group_size: int = 128, e_score_correction_bias: torch.Tensor | None = None,
                   process_weights: bool = False, device=None, **kwargs) -> "W4A8MoE":
        """A layer holding bf16/fp32 expert weights quantized with `formats.quantize_w4`.

        w1 (gate) [E, I, H], w3 (up) [E, I, H], w2 (down) [E, H, I]; w13 = cat(w1, w3) along N.
        kwargs are the constructor's routing / scale arguments. The layer is returned in checkpoint
        form (its state_dict is a compressed-tensors checkpoint) unless process_weights=True.
        """
        for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
            if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 3:
                _fail(f"from_float: {name} must be a floating tensor of rank 3, got "
                      f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        E, I, H = w1.shape
        if tuple(w3.shape) != (E, I, H) or tuple(w2.shape) != (E, H, I):
            _fail(f"from_float: expected w1, w3 [E, I, H] and w2 [E, H, I]; got w1 "
                  f"{tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)}")
        device = w1.device if device is None else torch.device(device)
        layer = cls(E, top_k, H, I, group_size=group_size, device=device, **kwargs)
        w13_packed, w13_scale = formats.quantize_w4(torch.cat([w1, w3], dim=1), group_size)
        w2_packed, w2_scale = formats.quantize_w4(w2, group_size)
        state = {"w13_weight_packed": w13_packed, "w13_weight_scale": w13_scale,
                 "w2_weight_packed": w2_packed, "w2_weight_scale": w2_scale}
        if layer.e_score_correction_bias is not None:
            bias = e_score_correction_bias
            state["e_score_correction_bias"] = torch.zeros(E) if bias is None else bias.float()
        elif e_score_correction_bias is not None:
            _fail("from_float: e_score_correction_bias is for scoring='sigmoid' only")
        layer.load_state_dict({k: v.to(device) for k, v in state.items()})
        if process_weights:
            layer.process_weights_after_loading()
        return layer


def check_forward_inputs(moe: W4A8MoE, hidden_states, router_logits) -> None:
    """What W4A8MoE.__call__ refuses, before any op runs: unprocessed weights, a call that would
    need gradients, inputs of the wrong type, rank, dtype, size or device.

    Self-contained on purpose (no calls into other Python functions): under torch.compile this
    runs as plain Python in a frame Dynamo skips, and any Python callee would be compiled.
    """
    if not moe.weights_processed:
        raise W4A8InputError("W4A8MoE.forward: the weights are not processed; call "
                             "process_weights_after_loading() after loading the checkpoint")
    for name, t in (("hidden_states", hidden_states), ("router_logits", router_logits)):
        if not isinstance(t, torch.Tensor):
            raise W4A8InputError(f"W4A8MoE: forward: {name} must be a torch.Tensor, got "
                                 f"{type(t).__name__}")
        if t.dim() != 2:
            raise W4A8InputError(f"W4A8MoE: forward: {name} must have rank 2, got shape "
                                 f"{tuple(t.shape)}")
    T, H = hidden_states.shape
    if H != moe.hidden_size:
        raise W4A8InputError(f"W4A8MoE: forward: hidden_states has {H} features but "
                             f"hidden_size={moe.hidden_size}")
    if hidden_states.dtype != moe.params_dtype:
        raise W4A8InputError(f"W4A8MoE: forward: hidden_states must be {moe.params_dtype}, got "
                             f"{hidden_states.dtype}; convert it with .to({moe.params_dtype})")
    if router_logits.shape[0] != T or router_logits.shape[1] != moe.num_experts:
        raise W4A8InputError(f"W4A8MoE: forward: router_logits must have shape (T, num_experts) = "
                             f"{(T, moe.num_experts)}, got {tuple(router_logits.shape)}")
    if router_logits.dtype not in ROUTER_DTYPES:
        raise W4A8InputError(f"W4A8MoE: forward: router_logits must be one of {ROUTER_DTYPES}, "
                             f"got {router_logits.dtype}")
    weight = moe._parameters.get("w13_weight")  # the dict first: nn.Module.__getattr__ is slow
    device = (moe.w13_weight if weight is None else weight).device
    if hidden_states.device != device or router_logits.device != device:
        raise W4A8InputError(f"W4A8MoE: forward: hidden_states is on {hidden_states.device} and "
                             f"router_logits on {router_logits.device} but the weights are on "
                             f"{device}; move the inputs to {device}")
    if torch.is_grad_enabled():
        needs_grad = hidden_states.requires_grad or router_logits.requires_grad
        for p in moe._parameters.values():  # a loop, not any(...): no generator frame
            needs_grad = needs_grad or (p is not None and p.requires_grad)
        if needs_grad:
            raise W4A8InputError("W4A8MoE: forward is inference only (the ops have no backward): "
                                 "an input or parameter requires grad; call it under "
                                 "torch.no_grad() or torch.inference_mode(), or detach() the inputs")

# Code that torch.compile(moe) must run as plain Python instead of tracing (backend.register).
EAGER_FRAMES = (W4A8MoE.__call__, check_forward_inputs)
