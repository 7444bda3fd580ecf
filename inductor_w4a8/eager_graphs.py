"""Graph replay for W4A8MoE's eager decode: the direct path's kernels, captured once per key.

At a few tokens the eager forward costs host time, not kernel time: six Python-launched kernels
at ~40-70 us of host time each against ~80 us of kernels in all (GLM-4.6 layer, H200,
docs/perf.md). So once a forward's key (shapes, dtypes, devices, parameters, settings: eager.py)
has run checked and then unchecked, the next call captures the unchecked kernels into a CUDA graph,
and every later call with that key copies its inputs into the graph's static buffers, replays the
graph and returns a copy of its output: four launches of host time instead of six kernels' worth.

Outputs are bit for bit the direct path's (the same kernels; their grids and tiles come from
shapes only, never from values: the capture rules of docs/compile.md), and each call returns a
fresh tensor. No host synchronization: the capture runs on a side stream ordered by stream
waits, replays and copies run on the caller's current stream.

Used when: CUDA; T <= MAX_TOKENS (above it the host time hides behind the kernels); the direct
path unchecked (so never with value checks on); not inside another capture (a serving loop's own
graphs capture the kernels as before); graph_replay on (the default; `graph_replay(False)` or
W4A8_EAGER_GRAPHS=0 turn it off). At most MAX_GRAPHS keys per module; the least recently used
graph is dropped.
"""
from __future__ import annotations

import collections
import contextlib

import torch

from .switches import ThreadSwitch

GRAPHS_ENV = "W4A8_EAGER_GRAPHS"
GRAPHS_ATTR = "_w4a8_eager_graphs"   # per module: OrderedDict key -> _SEEN or _Graph
# Memory: each captured forward holds its static inputs and a private pool with the block's
# intermediates (GLM-4.6 layer: ~0.2 MB at T = 1, ~2.5 MB at T = 16), per module, so a model's
# worst case is MAX_GRAPHS graphs of MAX_TOKENS tokens in every MoE layer.
MAX_TOKENS = 16
MAX_GRAPHS = 4
_SEEN = "seen once"   # a key's first unchecked call runs directly; the next one captures


# graph_replay(False): forbid eager graph replay of W4A8MoE forwards in this thread (default: allowed)
graph_replay = ThreadSwitch(GRAPHS_ENV)
enabled = graph_replay.enabled


class _Graph:
    """One captured forward: its static inputs, its output buffer and the graph."""

    __slots__ = ("graph", "x", "logits", "out", "device")

    def __init__(self, run, x: torch.Tensor, logits: torch.Tensor):
        self.device = x.device
        self.x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        self.logits = torch.empty_like(logits, memory_format=torch.contiguous_format).copy_(logits)
        self.graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = run(self.x, self.logits)
            finally:
                self.graph.capture_end()
        current.wait_stream(side)

    def replay(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.logits.copy_(logits)
        self.graph.replay()
        return self.out.clone()


def _device_guard(device: torch.device):
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _eligible(hidden_states: torch.Tensor) -> bool:
    return (enabled() and hidden_states.device.type == "cuda" and hidden_states.shape[0] <= MAX_TOKENS
            and not torch.cuda.is_current_stream_capturing())


def captured_keys(moe) -> int:
    """How many forwards of this module have a captured graph (tests, diagnostics)."""
    return sum(isinstance(e, _Graph) for e in moe.__dict__.get(GRAPHS_ATTR, {}).values())


def replay(moe, run, key, hidden_states: torch.Tensor, router_logits: torch.Tensor):
    """The forward's output from a graph replay, or None when the caller is to run the kernels
    itself (not eligible, or this key's first unchecked call). `run(x, logits)` runs the block's
    unchecked kernels; `key` is eager.direct_kernels' key of this forward."""
    if not _eligible(hidden_states):
        return None
    # the graph bakes in the parameters' addresses: a parameter whose storage moved is a new key
    graph_key = (key, tuple(None if p is None else p.data_ptr() for p in moe._parameters.values()))
    cache = moe.__dict__.get(GRAPHS_ATTR)
    if cache is None:
        cache = moe.__dict__[GRAPHS_ATTR] = collections.OrderedDict()
    entry = cache.get(graph_key)
    if entry is None:
        cache[graph_key] = _SEEN
        while len(cache) > MAX_GRAPHS:
            cache.popitem(last=False)
        return None
    with _device_guard(hidden_states.device):
        if entry is _SEEN:
            entry = cache[graph_key] = _Graph(run, hidden_states, router_logits)
        else:
            cache.move_to_end(graph_key)
        return entry.replay(hidden_states, router_logits)


def clear(moe) -> None:
    """Drop a module's captured graphs (and their memory)."""
    moe.__dict__.pop(GRAPHS_ATTR, None)
