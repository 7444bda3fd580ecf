"""The one place that turns expert tensors into a W4A8 MoE layer.

Every path ends here: the checkpoint loader (`weights.load_w4a8_checkpoint`), `from_pretrained`
(checkpoint tensors read module by module) and `patch_moe` (bf16 experts quantized with
`formats.quantize_w4` first). Input is the checkpoint form of the stacked experts:

    w13 packed uint4b8 int32 [E, 2I, ceil(H/8)], scale [E, 2I, H/G]   (gate rows, then up rows)
    w2  packed uint4b8 int32 [E, H, ceil(I/8)],  scale [E, H, ceil(I/G)]

The layer built holds this rank's shard (`inductor_w4a8.tp`): the intermediate channels the rank
owns, padded with zero channels to whole groups. At TP=1 that same padding makes an I that is not
a multiple of G loadable. With a process group the layer is wrapped in TensorParallelW4A8MoE
(one all-reduce after w2).

Imports run one way: moe_builder -> tp, moe, formats; weights, hf and pretrained import this.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from . import formats
from .checks import W4A8CheckpointError
from .moe import W4A8MoE
from .tp import (IntermediateShard, TensorParallelW4A8MoE, intermediate_shard, process_on_side_stream,
                 shard_expert_weights)

__all__ = ["W4A8CheckpointError", "ROUTING_ATTRIBUTES", "build_w4a8_moe", "quantize_experts",
           "shard_w4a8_moe", "tensor_parallel_moe", "process_group_rank"]

ROUTING_ATTRIBUTES = ("top_k", "scoring", "renormalize", "n_group", "topk_group", "routed_scaling_factor")


def process_group_rank(process_group) -> tuple[int, int]:
    """(rank, world size) in a torch.distributed group; (0, 1) for None."""
    if process_group is None:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError("a process_group was given but torch.distributed is not initialised "
                           "(call dist.init_process_group first)")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def quantize_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, group_size: int):
    """bf16/fp32 experts (gate [E, I, H], up [E, I, H], down [E, H, I]) -> checkpoint-form
    (w13_packed, w13_scale, w2_packed, w2_scale) through `formats.quantize_w4`.

    An I that is not a multiple of the group size is padded with zero channels first (exact:
    silu(0) * 0 = 0 and zero columns of w2 add nothing), so the quantization groups of w2 are
    whole; the layer's intermediate size is then the padded one.
    """
    pad = -w1.shape[1] % group_size
    if pad:
        w1, w3, w2 = F.pad(w1, (0, 0, 0, pad)), F.pad(w3, (0, 0, 0, pad)), F.pad(w2, (0, pad))
    w13_packed, w13_scale = formats.quantize_w4(torch.cat([w1, w3], dim=1), group_size)
    w2_packed, w2_scale = formats.quantize_w4(w2, group_size)
    return w13_packed, w13_scale, w2_packed, w2_scale


def _check_stacked(w13_packed, w13_scale, w2_packed, w2_scale, group_size: int) -> tuple[int, int, int]:
    """-> (E, I, H) of checkpoint-form stacked experts, or W4A8CheckpointError saying what is off."""
    if problem := formats.group_size_problem(group_size):
        raise W4A8CheckpointError(problem)
    for name, t in (("w13_packed", w13_packed), ("w2_packed", w2_packed)):
        if t.dtype != torch.int32 or t.dim() != 3:
            raise W4A8CheckpointError(f"{name} must be int32 [E, N, K/8] words, got {t.dtype} "
                                      f"{tuple(t.shape)}")
    E, N13, H_words = w13_packed.shape
    H = w2_packed.shape[1]
    if N13 % 2 or w2_packed.shape[0] != E:
        raise W4A8CheckpointError(f"w13 {tuple(w13_packed.shape)} and w2 {tuple(w2_packed.shape)} do not "
                                  f"fit [E, 2I, H/8] / [E, H, I/8]")
    I = N13 // 2
    if H % group_size or H_words * formats.NIBBLES_PER_WORD != H:
        raise W4A8CheckpointError(f"hidden size {H} must be a multiple of group_size={group_size} and "
                                  f"match w13's {H_words} words per row (w13 {tuple(w13_packed.shape)})")
    if tuple(w13_scale.shape) != (E, N13, H // group_size):
        raise W4A8CheckpointError(f"w13 scale {tuple(w13_scale.shape)} must be {(E, N13, H // group_size)}")
    if w2_packed.shape[2] != -(-I // formats.NIBBLES_PER_WORD) or tuple(w2_scale.shape) != \
            (E, H, -(-I // group_size)):
        raise W4A8CheckpointError(f"w2 packed {tuple(w2_packed.shape)} / scale {tuple(w2_scale.shape)} "
                                  f"do not fit I={I} (w13 has 2I={N13} rows) and group_size={group_size}")
    return E, I, H


def _owned(t: torch.Tensor, foreign: set) -> torch.Tensor:
    return t.clone() if t.untyped_storage().data_ptr() in foreign else t


def build_w4a8_moe(w13_packed, w13_scale, w2_packed, w2_scale, *, group_size: int, routing: Mapping,
                   e_score_correction_bias: torch.Tensor | None = None, scale_mode: str | None = None,
                   device=None, tp_rank: int = 0, tp_size: int = 1, process_group=None,
                   process: bool = True):
    """Checkpoint-form stacked experts -> this rank's W4A8MoE (post-processed unless process=False).

    routing: W4A8MoE's routing arguments (ROUTING_ATTRIBUTES). Scales are taken as bf16 (other
    float dtypes are rounded to bf16). tp_rank / tp_size pick a shard; with process_group (which
    sets them) the shard is wrapped in TensorParallelW4A8MoE. The layer's `tp_shard` records
    which channels it holds.
    """
    E, I, H = _check_stacked(w13_packed, w13_scale, w2_packed, w2_scale, group_size)
    if process_group is not None:
        tp_rank, tp_size = process_group_rank(process_group)
    spec: IntermediateShard = intermediate_shard(I, group_size, tp_rank, tp_size)
    w13p, w13s, w2p, w2s = shard_expert_weights(w13_packed, w13_scale.to(torch.bfloat16), w2_packed,
                                                w2_scale.to(torch.bfloat16), spec)
    device = torch.device(device) if device is not None else w13_packed.device
    kwargs = dict(num_experts=E, hidden_size=H, intermediate_size=spec.local_size, group_size=group_size,
                  device="meta", **{k: routing[k] for k in ROUTING_ATTRIBUTES if k in routing})
    if scale_mode is not None:
        kwargs["scale_mode"] = scale_mode
    moe = W4A8MoE(**kwargs)                 # meta: the parameters are assigned below, not filled twice
    state = {"w13_weight_packed": w13p, "w13_weight_scale": w13s, "w2_weight_packed": w2p,
             "w2_weight_scale": w2s}
    if moe.e_score_correction_bias is not None:
        bias = e_score_correction_bias
        state["e_score_correction_bias"] = torch.zeros(E) if bias is None else bias.float()
    elif e_score_correction_bias is not None:
        raise W4A8CheckpointError("an e_score_correction_bias was given for softmax routing; it is "
                                  "for scoring='sigmoid' only")
    # post-processing converts the packed words in place: the layer must own its tensors, never
    # alias the caller's (an unpadded shard can be a view of the whole input)
    inputs = {t.untyped_storage().data_ptr() for t in (w13_packed, w13_scale, w2_packed, w2_scale)}
    state = {k: _owned(v.to(device).contiguous(), inputs) for k, v in state.items()}
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise W4A8CheckpointError(f"W4A8MoE did not take the checkpoint tensors: missing {missing}, "
                                  f"unexpected {unexpected}")
    moe.tp_shard = spec
    if process:
        process_on_side_stream(moe)
    return TensorParallelW4A8MoE(moe, process_group) if process_group is not None else moe


def shard_w4a8_moe(layer, rank: int, world_size: int, *, device=None, process: bool = False):
    """A W4A8MoE holding checkpoint-form weights (not yet post-processed) -> the rank's W4A8MoE
    with local intermediate size `intermediate_shard(...).local_size` (post-processed if process)."""
    if getattr(layer, "w13_weight_packed", None) is None:
        raise ValueError("shard_w4a8_moe needs the checkpoint-form weights (w13_weight_packed ...): "
                         "shard before process_weights_after_loading()")
    missing = [n for n in ROUTING_ATTRIBUTES + ("group_size", "scale_mode") if not hasattr(layer, n)]
    if missing:
        raise TypeError(f"{type(layer).__name__} lacks the W4A8MoE attributes {missing}")
    bias = getattr(layer, "e_score_correction_bias", None)
    return build_w4a8_moe(layer.w13_weight_packed.detach(), layer.w13_weight_scale.detach(),
                          layer.w2_weight_packed.detach(), layer.w2_weight_scale.detach(),
                          group_size=layer.group_size,
                          routing={n: getattr(layer, n) for n in ROUTING_ATTRIBUTES},
                          e_score_correction_bias=None if bias is None else bias.detach(),
                          scale_mode=layer.scale_mode, device=device, tp_rank=rank, tp_size=world_size,
                          process=process)


def tensor_parallel_moe(layer, group=None, *, device=None, process: bool = True) -> TensorParallelW4A8MoE:
    """Shard a checkpoint-form W4A8MoE over the process group (rank and size from torch.distributed),
    move the rank's shard to `device`, and post-process it on a stream of its own."""
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RuntimeError("tensor_parallel_moe needs torch.distributed initialised "
                           "(dist.init_process_group) first")
    g = group if group is not None else dist.group.WORLD
    local = shard_w4a8_moe(layer, dist.get_rank(g), dist.get_world_size(g), device=device)
    tp = TensorParallelW4A8MoE(local, group)
    if process:
        tp.process_weights_after_loading()
    return tp
