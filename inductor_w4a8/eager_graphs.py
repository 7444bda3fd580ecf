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
W4A8_EAGER_GRAPHS=0 turn it off). At most MAX_GRAPHS graphs per module, the least recently used
dropped; one graph per (key, parameter addresses, stream, inference mode); a capture that fails
warns once and leaves that key to the direct path.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import warnings

import torch

from .launch._common import pdl_launches
from .switches import ThreadSwitch

GRAPHS_ENV = "W4A8_EAGER_GRAPHS"
GRAPHS_ATTR = "_w4a8_eager_graphs"   # per module: its _Cache
# Memory: each captured forward holds its static inputs and a private pool with the block's
# intermediates (GLM-4.6 layer: ~0.2 MB at T = 1, ~2.5 MB at T = 16), per module, so a model's
# worst case is MAX_GRAPHS graphs of MAX_TOKENS tokens in every MoE layer.
MAX_TOKENS = 16
MAX_GRAPHS = 4


# graph_replay(False): forbid eager graph replay of W4A8MoE forwards in this thread (default: allowed)
graph_replay = ThreadSwitch(GRAPHS_ENV)
enabled = graph_replay.enabled


class _Graph:
    """One captured forward: its static inputs, its output buffer and the graph. Replays hold a
    lock from the input copies to the output clone, so that two threads sharing a stream cannot
    interleave their copies between the other's copy and replay."""

    __slots__ = ("graph", "x", "logits", "out", "lock")

    def __init__(self, run, x: torch.Tensor, logits: torch.Tensor):
        self.lock = threading.Lock()
        self.x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
        self.logits = torch.empty_like(logits, memory_format=torch.contiguous_format).copy_(logits)
        self.graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(x.device)
        side = _capture_stream(x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            # once uncaptured on the static buffers (their strides may specialize a kernel the
            # caller's tensors did not: any compile happens here, not inside the capture)
            run(self.x, self.logits)
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.out = run(self.x, self.logits)
            finally:
                self.graph.capture_end()
        current.wait_stream(side)

    def replay(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.x.copy_(x)
            self.logits.copy_(logits)
            self.graph.replay()
            return self.out.clone()


_FAILED = "capture failed"   # this key runs the kernels directly from now on
_capture_streams: dict = {}
_streams_lock = threading.Lock()


def _capture_stream(device: torch.device):
    """One side stream per device for every capture (not a new one from torch's pool each time,
    which could be a stream another thread is using)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _streams_lock:
        stream = _capture_streams.get(index)
        if stream is None:
            stream = _capture_streams[index] = torch.cuda.Stream(index)
    return stream


class _Cache:
    """A module's graphs (least recently used first) and the keys seen once, apart, so that a
    key seen once never evicts a graph."""

    __slots__ = ("graphs", "seen", "lock")

    def __init__(self):
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.seen: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def __reduce__(self):
        # copy.deepcopy / pickle of the module (torch.save): graphs belong to the original's
        # parameters and cannot be copied; the copy starts empty
        return (_Cache, ())


def _device_guard(device: torch.device):
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _eligible(hidden_states: torch.Tensor) -> bool:
    return (enabled() and hidden_states.device.type == "cuda" and hidden_states.shape[0] <= MAX_TOKENS
            and not torch.cuda.is_current_stream_capturing())


def _stream_id(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def captured_keys(moe) -> int:
    """How many forwards of this module have a captured graph (tests, diagnostics)."""
    cache = moe.__dict__.get(GRAPHS_ATTR)
    return 0 if cache is None else sum(isinstance(e, _Graph) for e in cache.graphs.values())


def _graph_key(moe, key, device: torch.device):
    # the graph bakes in the parameters' addresses (a parameter whose storage moved is a new key);
    # one graph per stream (its static buffers belong to that stream: no cross-stream sharing or
    # freeing under a running replay); inference mode apart (its static buffers would be
    # inference tensors, which a later call outside inference mode could not copy into); PDL on
    # or off apart (a graph keeps the launch attributes it was captured with)
    return (key, tuple(None if p is None else p.data_ptr() for p in moe._parameters.values()),
            _stream_id(device), torch.is_inference_mode_enabled(), pdl_launches.enabled())


def _entry(moe, graph_key, run, hidden_states, router_logits):
    """The key's graph (captured now if it was seen once before), or None (run directly)."""
    cache = moe.__dict__.get(GRAPHS_ATTR)
    if cache is None:
        cache = moe.__dict__.setdefault(GRAPHS_ATTR, _Cache())
    with cache.lock:
        entry = cache.graphs.get(graph_key)
        if entry is not None:
            cache.graphs.move_to_end(graph_key)
            return None if entry is _FAILED else entry
        if graph_key not in cache.seen:
            cache.seen[graph_key] = True
            while len(cache.seen) > 4 * MAX_GRAPHS:
                cache.seen.popitem(last=False)
            return None
        del cache.seen[graph_key]
        try:
            entry = _Graph(run, hidden_states, router_logits)
        except Exception as exc:  # noqa: BLE001  (the direct path still runs; say why once)
            warnings.warn(f"W4A8MoE eager graph replay: capturing a forward of {hidden_states.shape[0]} "
                          f"tokens failed ({exc!r}); this shape runs its kernels directly", stacklevel=3)
            entry = _FAILED
        cache.graphs[graph_key] = entry
        while len(cache.graphs) > MAX_GRAPHS:
            cache.graphs.popitem(last=False)
        return None if entry is _FAILED else entry


def replay(moe, run, key, hidden_states: torch.Tensor, router_logits: torch.Tensor):
    """The forward's output from a graph replay, or None when the caller is to run the kernels
    itself (not eligible, this key's first unchecked call, or its capture failed). `run(x,
    logits)` runs the block's unchecked kernels; `key` is eager.direct_kernels' key."""
    if not _eligible(hidden_states):
        return None
    with _device_guard(hidden_states.device):
        entry = _entry(moe, _graph_key(moe, key, hidden_states.device), run, hidden_states, router_logits)
        return None if entry is None else entry.replay(hidden_states, router_logits)


def clear(moe) -> None:
    """Drop a module's captured graphs (and their memory)."""
    moe.__dict__.pop(GRAPHS_ATTR, None)
