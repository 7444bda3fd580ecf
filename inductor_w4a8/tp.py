"""Tensor parallel W4A8 MoE through torch.distributed.

Sharding (the vLLM scheme, on the checkpoint form of the weights, before post-processing):
    w13 [E, 2I, H]: split along N. Gate and up are each split by intermediate channel, so rank r
                    holds gate[s_r:e_r] and up[s_r:e_r] (its own slice of both halves).
    w2  [E, H, I] : split along K by the same intermediate channels.
Each rank computes a partial [T, H] output over its channels; one all-reduce (sum) after w2 gives
the full output. Routing is replicated: every rank sees the same router logits.

Groups cut by a rank boundary
-----------------------------
The group scales of w2 run along K = I. With I per rank not a multiple of the group size G
(GLM-4.6 at TP8: I = 1536, I per rank = 192, G = 128) a group straddles two ranks. Each rank
keeps that group's scale, and our grouped GEMM needs its local K to be a multiple of G, so a rank
pads its local intermediate dimension with zero channels until its local groups coincide with the
global groups: rank r covers global channels [floor(s_r / G) * G, ceil(e_r / G) * G). Channels in
that range that belong to the neighbour (or lie past I) are zero:
    w13 rows : q = 0 (stored nibble 8) and scale 0 -> gate = up = 0 -> silu(0) * 0 = 0
    w2 columns: q = 0 (stored nibble 8)             -> they add nothing to the output
so the padded rank computes exactly its share. GLM-4.6 TP8: ranks hold [0,192)+64 zeros,
64 zeros+[192,384), [384,576)+64 zeros, ... i.e. local I = 256 on every rank (2 groups), and each
rank's w2 scales are the global scales of the groups it touches (the shared group's scale on both
sides). The same padding makes a checkpoint whose I is not a multiple of G loadable at TP=1.

Tensor parallel activation quantization is per rank: the fp8 scale of the intermediate
activations is the amax over the rank's own channels, so TP>1 is not bitwise TP=1 (it is, if
anything, slightly more accurate); the tests check both against the exact reference.

This module holds the sharding math and the all-reduce wrapper only; layers are built (and
sharded) by `inductor_w4a8.moe_builder`, which imports this one (never the other way round).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import formats

__all__ = ["IntermediateShard", "intermediate_shard", "shard_rows", "shard_k", "shard_expert_weights",
           "TensorParallelW4A8MoE", "all_reduce", "process_on_side_stream"]


@dataclass(frozen=True)
class IntermediateShard:
    """Rank `rank` owns global intermediate channels [start, end); it stores [local_start, local_end)."""
    intermediate_size: int
    group_size: int
    rank: int
    world_size: int
    start: int
    end: int
    local_start: int
    local_end: int

    @property
    def local_size(self) -> int:
        """The rank's padded intermediate size (a multiple of the group size)."""
        return self.local_end - self.local_start

    @property
    def lead(self) -> int:
        """Zero channels before the rank's own ones (owned by the previous rank)."""
        return self.start - self.local_start

    @property
    def tail(self) -> int:
        """Zero channels after the rank's own ones (owned by the next rank, or past I)."""
        return self.local_end - self.end

    @property
    def padded(self) -> bool:
        return self.lead > 0 or self.tail > 0


def intermediate_shard(intermediate_size: int, group_size: int, rank: int = 0,
                       world_size: int = 1) -> IntermediateShard:
    """Rank r of world_size owns channels [I*r//world, I*(r+1)//world), padded out to whole groups."""
    I, G = int(intermediate_size), int(group_size)
    if problem := formats.group_size_problem(G):
        raise ValueError(problem)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if I < world_size:
        raise ValueError(f"intermediate_size={I} is smaller than world_size={world_size}: some rank "
                         f"would own no channel; use fewer ranks")
    start, end = I * rank // world_size, I * (rank + 1) // world_size
    return IntermediateShard(I, G, rank, world_size, start, end, start // G * G, math.ceil(end / G) * G)


def _zero_word(device) -> torch.Tensor:
    """The uint4b8 word of eight q = 0 weights (every nibble 8)."""
    return formats.pack_int4(torch.zeros(1, formats.NIBBLES_PER_WORD, dtype=torch.int32, device=device),
                             biased=True).reshape(())


def shard_rows(packed: torch.Tensor, scale: torch.Tensor, spec: IntermediateShard):
    """Rows = intermediate channels (gate or up of w13): [..., I, W], [..., I, Gc] -> the rank's
    [..., local_size, W], [..., local_size, Gc] = [lead zero rows | rows[start:end] | tail zero rows]."""
    _check_rows("packed", packed, spec)
    _check_rows("scale", scale, spec)
    own_p = packed[..., spec.start:spec.end, :]
    own_s = scale[..., spec.start:spec.end, :]
    if not spec.padded:
        return own_p.contiguous(), own_s.contiguous()
    batch, zw = tuple(packed.shape[:-2]), _zero_word(packed.device)

    def zeros(n):   # n rows of q = 0 with scale 0
        return zw.expand(*batch, n, packed.shape[-1]), scale.new_zeros(*batch, n, scale.shape[-1])

    parts = [zeros(spec.lead), (own_p, own_s), zeros(spec.tail)]
    return (torch.cat([p for p, _ in parts], dim=-2).contiguous(),
            torch.cat([s for _, s in parts], dim=-2).contiguous())


def _check_rows(name, t, spec):
    if t.dim() < 2 or t.shape[-2] != spec.intermediate_size:
        raise ValueError(f"shard_rows: {name} must be [..., I={spec.intermediate_size}, *], got "
                         f"shape {tuple(t.shape)}")


def shard_k(packed: torch.Tensor, scale: torch.Tensor, spec: IntermediateShard):
    """K = intermediate channels (w2): uint4b8 [..., R, ceil(I/8)], scale [..., R, ceil(I/G)] ->
    [..., R, local_size/8], [..., R, local_size/G], covering global K [local_start, local_end);
    nibbles outside the rank's own [start, end) become q = 0. Scales are the global group scales
    (a group cut by a rank boundary keeps its scale on both sides)."""
    I, G = spec.intermediate_size, spec.group_size
    words, groups = math.ceil(I / formats.NIBBLES_PER_WORD), math.ceil(I / G)
    if packed.dim() < 2 or packed.shape[-1] != words:
        raise ValueError(f"shard_k: packed must be [..., R, ceil(I/8)={words}] for I={I}, got "
                         f"shape {tuple(packed.shape)}")
    if tuple(scale.shape) != tuple(packed.shape[:-1]) + (groups,):
        raise ValueError(f"shard_k: scale must be {tuple(packed.shape[:-1]) + (groups,)} "
                         f"([..., R, ceil(I/G)] for I={I}, G={G}), got {tuple(scale.shape)}")
    w0, w1 = spec.local_start // formats.NIBBLES_PER_WORD, spec.local_end // formats.NIBBLES_PER_WORD
    g0, g1 = spec.local_start // G, spec.local_end // G
    p = packed[..., w0:min(w1, words)]
    s = scale[..., g0:min(g1, groups)]
    if w1 > words:
        p = torch.cat([p, _zero_word(p.device).expand(*p.shape[:-1], w1 - words)], dim=-1)
    if g1 > groups:
        s = torch.cat([s, s.new_zeros(*s.shape[:-1], g1 - groups)], dim=-1)
    if spec.padded or I % formats.NIBBLES_PER_WORD:
        # keep = nibble mask of the rank's own channels; everything else becomes the q = 0 nibble
        k = torch.arange(spec.local_start, spec.local_end, device=p.device)
        keep = (k >= spec.start) & (k < spec.end)
        mask = formats.pack_int4(torch.where(keep, -1, 0), biased=False)       # nibble 0xF where kept
        fill = formats.pack_int4(torch.zeros_like(keep, dtype=torch.int32), biased=True) & ~mask
        p = (p & mask) | fill
    return p.contiguous(), s.contiguous()


def shard_expert_weights(w13_packed, w13_scale, w2_packed, w2_scale, spec: IntermediateShard):
    """Checkpoint-form stacked expert weights -> the rank's (w13_packed, w13_scale, w2_packed, w2_scale).

    w13 = cat(gate, up) along N; each half is sharded by intermediate channel and padded (see the
    module docstring), then concatenated again: the rank's w13 is [E, 2 * local_size, H // 8].
    """
    I = spec.intermediate_size
    if w13_packed.shape[-2] != 2 * I or w13_scale.shape[-2] != 2 * I:
        raise ValueError(f"w13 must have 2 * I = {2 * I} rows (gate then up), got packed "
                         f"{tuple(w13_packed.shape)} and scale {tuple(w13_scale.shape)}")
    gate = shard_rows(w13_packed[..., :I, :], w13_scale[..., :I, :], spec)
    up = shard_rows(w13_packed[..., I:, :], w13_scale[..., I:, :], spec)
    w2p, w2s = shard_k(w2_packed, w2_scale, spec)
    return (torch.cat([gate[0], up[0]], dim=-2).contiguous(), torch.cat([gate[1], up[1]], dim=-2).contiguous(),
            w2p, w2s)


# ------------------------------------------------------------------------------------------------
# Layers (built by inductor_w4a8.moe_builder: shard_w4a8_moe, tensor_parallel_moe)
# ------------------------------------------------------------------------------------------------
def process_on_side_stream(layer) -> None:
    """Post-process a layer on a stream of its own (each rank its own stream on CUDA).

    The side stream first waits for the current stream (which loaded the weights), and the
    current stream then waits for the side stream: no device-wide synchronize, and later work on
    the current stream sees the finished weights.
    """
    param = next(iter(layer.parameters()), None)
    if param is None or param.device.type != "cuda":
        layer.process_weights_after_loading()
        return
    current = torch.cuda.current_stream(param.device)
    side = torch.cuda.Stream(device=param.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        layer.process_weights_after_loading()
    current.wait_stream(side)
    # tensors the side stream allocated are now used on `current`
    for t in list(layer.parameters()) + list(layer.buffers()):
        if t.device.type == "cuda":
            t.record_stream(current)


def all_reduce(y: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the group; functional (returns a new tensor), traceable by torch.compile."""
    import torch.distributed as dist
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return y
    out = torch.ops._c10d_functional.all_reduce(y, "sum", group.group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


class TensorParallelW4A8MoE(nn.Module):
    """The rank's W4A8MoE followed by one all-reduce; forward(hidden_states, router_logits) -> [T, H].

    Inputs are replicated (every rank holds the same hidden states and router logits).
    """

    def __init__(self, local, group=None):
        super().__init__()
        self.local = local
        self.group = group

    def process_weights_after_loading(self) -> None:
        process_on_side_stream(self.local)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local(hidden_states, router_logits), self.group)
