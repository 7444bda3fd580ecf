"""CUDA graphs at every batch size a serving loop uses, up to and including the max.

`capture_sizes(max_num_batched_tokens)` is the list of token counts to capture; `CUDAGraphRunner`
captures a function (eager or compiled) at each of them into one shared memory pool and replays
the graph of the next size up for any token count T, splitting T above the max into chunks.

Why padding is safe: every step of the MoE block works row by row (per-token quantization,
routing, the expert GEMMs, the combine), so padding rows never change the outputs of real rows.
Padding rows are zeros: zero hidden states quantize to zeros with the minimum scale, and zero
router logits route to valid expert ids, so padding rows never index out of bounds either.
"""
from __future__ import annotations

import bisect
import logging
import math
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

MAX_CAPTURE_SIZES = 96
# Above DENSE_LIMIT tokens, a token count padded up to the next capture size runs at most this
# fraction of extra rows: (padded - T) / T <= MAX_PADDING_WASTE.
MAX_PADDING_WASTE = 0.125
DENSE_LIMIT = 256
# Decode batch sizes below DENSE_LIMIT: 1, 2, 4, then every multiple of DENSE_STEP.
DENSE_STEP = 8


def _alignment(size: int) -> int:
    """Round capture sizes above DENSE_LIMIT to multiples of this (tile-friendly sizes)."""
    if size < 1024:
        return 32
    if size < 2048:
        return 64
    if size < 4096:
        return 128
    return 256


def _default_sizes(max_tokens: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_tokens]
    sizes += list(range(DENSE_STEP, min(DENSE_LIMIT, max_tokens) + 1, DENSE_STEP))
    a = sizes[-1]
    while a < max_tokens:
        # The worst padding above a is T = a + 1 padded to b: (b - a - 1) / (a + 1) <= waste.
        limit = math.floor((1.0 + MAX_PADDING_WASTE) * (a + 1))
        align = _alignment(a)
        b = (limit // align) * align
        if b <= a:  # only below DENSE_LIMIT-sized steps; never for the defaults above
            b = limit
        a = min(b, max_tokens)
        sizes.append(a)
    return sizes


def _check_max(max_num_batched_tokens: Any) -> int:
    if isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int):
        raise TypeError(f"max_num_batched_tokens must be an int, got {type(max_num_batched_tokens).__name__}")
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    return max_num_batched_tokens


def capture_sizes(max_num_batched_tokens: int = 8192, sizes: Sequence[int] | None = None) -> list[int]:
    """The token counts to capture CUDA graphs at: sorted, unique, ending at exactly the max.

    Default list: 1, 2, 4, every multiple of 8 up to 256, then sizes growing by at most 12.5%
    (multiples of 32..256) up to the max, so that any T above 256 is padded by at most 12.5% and
    no more than 96 graphs are captured (69 for 8192).

    `sizes` (a user list) is validated instead: every entry an int >= 1, duplicates removed,
    entries above the max dropped (with a warning), the max itself added; at most 96 sizes.
    """
    max_tokens = _check_max(max_num_batched_tokens)
    if sizes is None:
        result = _default_sizes(max_tokens)
        if len(result) > MAX_CAPTURE_SIZES:
            raise ValueError(
                f"max_num_batched_tokens={max_tokens} needs {len(result)} capture sizes to keep "
                f"padding within {MAX_PADDING_WASTE:.1%}, more than {MAX_CAPTURE_SIZES}; pass an "
                f"explicit `sizes` list or a smaller max (larger batches are chunked anyway)")
        return result
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"capture sizes must be a sequence of ints, got {type(sizes).__name__}")
    values = list(sizes)
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"capture sizes must be ints, got {s!r} ({type(s).__name__})")
        if s < 1:
            raise ValueError(f"capture sizes must be >= 1, got {s}")
    above = sorted({s for s in values if s > max_tokens})
    if above:
        warnings.warn(f"capture sizes {above} exceed max_num_batched_tokens={max_tokens} and are "
                      f"dropped (larger batches are split into chunks of at most the max)",
                      stacklevel=2)
    result = sorted({s for s in values if s <= max_tokens} | {max_tokens})
    if len(result) > MAX_CAPTURE_SIZES:
        raise ValueError(f"{len(result)} capture sizes given; at most {MAX_CAPTURE_SIZES} are allowed "
                         f"(each graph holds its own kernel launches and workspace)")
    return result


_capture_sizes = capture_sizes  # CUDAGraphRunner's argument of the same name shadows it


def padded_size(sizes: Sequence[int], num_tokens: int) -> int:
    """The smallest capture size >= num_tokens (num_tokens must be <= sizes[-1])."""
    i = bisect.bisect_left(sizes, num_tokens)
    if i == len(sizes):
        raise ValueError(f"{num_tokens} tokens exceed the largest capture size {sizes[-1]}")
    return sizes[i]


def padding_waste(sizes: Sequence[int], num_tokens: int) -> float:
    """(padded - T) / T for T = num_tokens."""
    return (padded_size(sizes, num_tokens) - num_tokens) / num_tokens


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str = "w4a8: capturing CUDA graphs"):
        self.total, self.enabled, self.done, self.desc = total, enabled, 0, desc
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="size")
            except ImportError:
                self._bar = None

    def update(self, size: int) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(tokens=size)
            self._bar.update(1)
        else:
            print(f"\r{self.desc} {self.done}/{self.total} (tokens={size})",
                  end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _CudaGraphOps:
    """The CUDA calls of capture and replay (a seam: tests swap in `_ReplayByRerun`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def pool_bytes(self, pool) -> int:
        """Bytes the caching allocator holds in `pool` (its segments, by pool id). A difference of
        memory_reserved() would also count what warm-up (compile, autotuning) freed or cached."""
        segments = torch.cuda.memory._snapshot(self.device)["segments"]
        return sum(seg["total_size"] for seg in segments
                   if tuple(seg.get("segment_pool_id", ())) == tuple(pool))

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def on_side_stream(self, fn: Callable[[], Any]) -> Any:
        """Run fn on a side stream (as capture does), ordered after and before the current one."""
        side = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = fn()
        current.wait_stream(side)
        return result

    def capture(self, fn: Callable[[], Any], pool) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph


class _ReplayByRerun(_CudaGraphOps):
    """Stand-in for tests without a GPU: "capture" keeps fn, "replay" runs it again (same static
    buffers in and out), so the runner's graph bookkeeping runs on any device."""

    class Graph:
        def __init__(self, fn):
            self.replay = fn

    def synchronize(self) -> None:
        pass

    def free_bytes(self) -> int:
        return 0

    def pool_bytes(self, pool) -> int:
        return 0

    def new_pool(self):
        return None

    def on_side_stream(self, fn):
        return fn()

    def capture(self, fn, pool):
        fn()
        return self.Graph(fn)


def _flatten_outputs(out: Any) -> tuple[list[torch.Tensor], bool]:
    if isinstance(out, torch.Tensor):
        return [out], True
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return list(out), False
    raise TypeError("CUDAGraphRunner: the function must return a Tensor or a tuple of Tensors whose "
                    f"first dim is the token count, got {type(out).__name__}")


def _is_compiled(fn: Any) -> bool:
    return hasattr(fn, "_torchdynamo_orig_callable") or hasattr(fn, "_orig_mod")


class CUDAGraphRunner:
    """Replays CUDA graphs of `fn_or_module` captured at every capture size.

    `fn_or_module(*tensors)` must take tensors whose first dim is the token count T (all the same
    T; e.g. `hidden_states [T, H]`, `router_logits [T, E]`) and return a tensor (or tuple of
    tensors) with first dim T, row i depending only on input row i (true of the MoE block).

        runner = CUDAGraphRunner(torch.compile(moe, backend="w4a8", fullgraph=True))
        y = runner(hidden_states, router_logits)

    The first call (or `capture(*example)`) captures every size, largest first, into one shared
    memory pool; inputs are copied into static buffers of `max_num_batched_tokens` rows (the rows
    past T zeroed), the graph of the next capture size up replays, and the first T output rows
    are returned. T above the max is split into chunks of at most the max (chunked prefill).

    All graphs write their result into one shared output buffer of max rows (the pool then holds
    one forward's workspace, not one output per size). copy_outputs=True (default) returns fresh
    tensors; False returns views of that buffer, valid only until the next call. On a device without CUDA graphs (CPU), or with
    use_cuda_graphs=False, the same padding and chunking runs the function directly.
    """

    def __init__(self, fn_or_module: Callable[..., Any], max_num_batched_tokens: int = 8192,
                 capture_sizes: Sequence[int] | None = None, *, use_cuda_graphs: bool | None = None,
                 copy_outputs: bool = True, warmup_iters: int = 1, progress: bool = True):
        if not callable(fn_or_module):
            raise TypeError(f"CUDAGraphRunner needs a callable or nn.Module, got {type(fn_or_module).__name__}")
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1 (kernels compile before capture), got {warmup_iters}")
        self.fn = fn_or_module
        self.max_num_batched_tokens = _check_max(max_num_batched_tokens)
        self.sizes = _capture_sizes(self.max_num_batched_tokens, capture_sizes)
        self.use_cuda_graphs = use_cuda_graphs
        self.copy_outputs = copy_outputs
        self.warmup_iters = warmup_iters
        self.progress = progress
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.static_inputs: list[torch.Tensor] | None = None
        self.static_output_buffers: list[torch.Tensor] | None = None
        self._out_template: list[tuple[tuple[int, ...], torch.dtype, torch.device]] | None = None
        self.pool = None
        self.report: dict[str, Any] | None = None
        self._single_output = True
        self._template: list[tuple[tuple[int, ...], torch.dtype, torch.device]] | None = None

    # ------------------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        return self._template is not None

    def padded_size(self, num_tokens: int) -> int:
        return padded_size(self.sizes, num_tokens)

    def _check_args(self, args: Sequence[Any]) -> int:
        if not args:
            raise TypeError("CUDAGraphRunner: call it with the tensors of one batch, e.g. "
                            "runner(hidden_states, router_logits)")
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"CUDAGraphRunner: argument {i} must be a Tensor (token-major), "
                                f"got {type(a).__name__}; bind other arguments with functools.partial")
            if a.dim() < 1:
                raise ValueError(f"CUDAGraphRunner: argument {i} is a scalar tensor; every argument "
                                 f"needs the token count as its first dim")
        T = args[0].shape[0]
        for i, a in enumerate(args[1:], 1):
            if a.shape[0] != T:
                raise ValueError(f"CUDAGraphRunner: argument {i} has {a.shape[0]} rows but argument 0 "
                                 f"has {T}; all arguments must share the token count (first dim)")
        if self._template is not None:
            if len(args) != len(self._template):
                raise TypeError(f"CUDAGraphRunner: captured with {len(self._template)} arguments, "
                                f"called with {len(args)}")
            for i, (a, (tail, dtype, device)) in enumerate(zip(args, self._template)):
                if tuple(a.shape[1:]) != tail or a.dtype != dtype or a.device != device:
                    raise ValueError(
                        f"CUDAGraphRunner: argument {i} is {a.dtype} {tuple(a.shape)} on {a.device}; "
                        f"the graphs were captured for {dtype} [T, {', '.join(map(str, tail))}] on "
                        f"{device}. Build a new runner for other shapes")
        return T

    def _graph_ops(self, device: torch.device) -> _CudaGraphOps | None:
        if isinstance(self.use_cuda_graphs, _CudaGraphOps):  # tests: a stand-in
            return self.use_cuda_graphs
        if self.use_cuda_graphs is None:
            return _CudaGraphOps(device) if device.type == "cuda" else None
        if self.use_cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDAGraphRunner: use_cuda_graphs=True needs CUDA tensors, got {device}")
        return _CudaGraphOps(device) if self.use_cuda_graphs else None

    def _views(self, size: int) -> list[torch.Tensor]:
        views = [buf[:size] for buf in self.static_inputs]
        if size >= 2 and _is_compiled(self.fn):
            # One dynamic graph for every size >= 2 from the first compile on (size 1 is
            # specialized by Dynamo: the one recompile). mark_dynamic, as callers are told to
            # use, not maybe_mark_dynamic: Dynamo guards on which kind of mark a tensor has.
            for v in views:
                torch._dynamo.mark_dynamic(v, 0)
        return views

    def _call(self, size: int) -> list[torch.Tensor]:
        outs, single = _flatten_outputs(self.fn(*self._views(size)))
        for o in outs:
            if o.dim() < 1 or o.shape[0] != size:
                raise ValueError(f"CUDAGraphRunner: the function returned shape {tuple(o.shape)} for "
                                 f"{size} tokens; outputs must have the token count as first dim")
        self._single_output = single
        return outs

    def _set_out_template(self, outs: list[torch.Tensor]) -> None:
        self._out_template = [(tuple(o.shape[1:]), o.dtype, o.device) for o in outs]

    def _check_out_template(self, outs: list[torch.Tensor]) -> None:
        if [(tuple(o.shape[1:]), o.dtype, o.device) for o in outs] != self._out_template:
            raise ValueError("CUDAGraphRunner: the function's outputs changed shape or dtype between "
                             "token counts; only the first dim may depend on the token count")

    # ------------------------------------------------------------------------------------
    def capture(self, *example_args: torch.Tensor) -> dict[str, Any]:
        """Capture (or, without CUDA graphs, just warm up) every size; returns the report.

        `example_args` give the trailing shapes, dtypes and device (any token count)."""
        if self._template is not None:
            raise RuntimeError("CUDAGraphRunner: already captured; build a new runner to capture again")
        self._check_args(example_args)
        device = example_args[0].device
        template = [(tuple(a.shape[1:]), a.dtype, a.device) for a in example_args]
        self.static_inputs = [torch.zeros((self.max_num_batched_tokens,) + tail, dtype=dtype, device=dev)
                              for tail, dtype, dev in template]
        ops = self._graph_ops(device)
        descending = sorted(self.sizes, reverse=True)
        t0 = time.perf_counter()
        warmup_s = 0.0
        if ops is None:
            progress = _Progress(len(descending), self.progress, "w4a8: warming up (no CUDA graphs)")
            try:
                for size in descending:
                    self._set_out_template(self._call(size))
                    progress.update(size)
            finally:
                progress.close()
            self._template = template
            self.report = {"num_graphs": 0, "sizes": list(self.sizes), "capture_s": 0.0,
                           "warmup_s": time.perf_counter() - t0, "pool_bytes": 0, "static_bytes": 0,
                           "device_bytes": 0}
            return self.report

        ops.synchronize()
        free0 = ops.free_bytes()
        self.pool = ops.new_pool()
        progress = _Progress(len(descending), self.progress)

        def warm(size: int) -> list[torch.Tensor]:
            outs = None
            for _ in range(self.warmup_iters):
                outs = self._call(size)
            return outs

        def captured_body(size: int) -> Callable[[], None]:
            def body():
                outs = self._call(size)
                self._check_out_template(outs)
                for buf, o in zip(self.static_output_buffers, outs):
                    buf[:size].copy_(o)
            return body

        try:
            for size in descending:
                # Warm up outside capture: compiles (torch.compile, Triton JIT, autotuning) happen
                # here, never inside the capture.
                tw = time.perf_counter()
                outs = ops.on_side_stream(lambda: warm(size))
                ops.synchronize()
                if self.static_output_buffers is None:
                    # One output buffer of max rows for all graphs, allocated outside the pool:
                    # each graph copies its result into it, so no graph's output holds pool
                    # memory after its capture and the pool stays the size of one forward.
                    self._set_out_template(outs)
                    self.static_output_buffers = [
                        torch.empty((self.max_num_batched_tokens,) + tail, dtype=dtype, device=dev)
                        for tail, dtype, dev in self._out_template]
                del outs
                warmup_s += time.perf_counter() - tw
                self.graphs[size] = ops.capture(captured_body(size), self.pool)
                progress.update(size)
        finally:
            progress.close()
        ops.synchronize()
        total_s = time.perf_counter() - t0
        self._template = template
        self.report = {
            "num_graphs": len(self.graphs),
            "sizes": list(self.sizes),
            "capture_s": total_s - warmup_s,
            "warmup_s": warmup_s,
            # bytes the caching allocator holds in the graphs' shared pool
            "pool_bytes": ops.pool_bytes(self.pool),
            # the static input and output buffers (max rows), outside the pool
            "static_bytes": sum(b.numel() * b.element_size() for b in
                                list(self.static_output_buffers or []) + list(self.static_inputs or [])),
            # bytes the device lost, graphs' own driver memory included
            "device_bytes": free0 - ops.free_bytes(),
        }
        log.info("w4a8: captured %d CUDA graphs (1..%d tokens) in %.1f s (+%.1f s warm-up), "
                 "pool %.1f MiB, device %.1f MiB", self.report["num_graphs"], self.max_num_batched_tokens,
                 self.report["capture_s"], warmup_s, self.report["pool_bytes"] / 2**20,
                 self.report["device_bytes"] / 2**20)
        if self.progress:
            print(f"w4a8: captured {self.report['num_graphs']} CUDA graphs (1..{self.max_num_batched_tokens} "
                  f"tokens) in {self.report['capture_s']:.1f} s (+{warmup_s:.1f} s warm-up), "
                  f"memory {self.report['pool_bytes'] / 2**20:.1f} MiB pool, "
                  f"{self.report['device_bytes'] / 2**20:.1f} MiB device", file=sys.stderr)
        return self.report

    # ------------------------------------------------------------------------------------
    def _run(self, args: Sequence[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
        """Rows lo:hi of args through the graph of the next size up -> views of its outputs."""
        n = hi - lo
        size = self.padded_size(n)
        for buf, a in zip(self.static_inputs, args):
            buf[:n].copy_(a[lo:hi])
            if size > n:
                buf[n:size].zero_()
        if size in self.graphs:
            self.graphs[size].replay()
            outs = self.static_output_buffers
        else:
            outs = self._call(size)
        return [o[:n] for o in outs]

    def __call__(self, *args: torch.Tensor) -> Any:
        T = self._check_args(args)
        if self._template is None:
            self.capture(*args)
        M = self.max_num_batched_tokens
        if 0 < T <= M and not self.copy_outputs:
            outs = self._run(args, 0, T)
        else:
            outs = [torch.empty((T,) + tail, dtype=dtype, device=dev) for tail, dtype, dev in self._out_template]
            for lo in range(0, T, M):
                hi = min(lo + M, T)
                for dst, src in zip(outs, self._run(args, lo, hi)):
                    dst[lo:hi].copy_(src)
        return outs[0] if self._single_output else tuple(outs)


__all__ = ["capture_sizes", "padded_size", "padding_waste", "CUDAGraphRunner", "MAX_CAPTURE_SIZES",
           "MAX_PADDING_WASTE"]
