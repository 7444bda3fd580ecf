"""The grouped GEMM in Inductor's generated code: `w4a8::grouped_gemm` traced into its Triton kernel.

How: the op is a `torch.library.custom_op` (opaque: eager, export and other backends see one
node). While the "w4a8" backend compiles, a rule registered for `FunctionalTensorMode` (the mode
AOTAutograd traces under; this is exactly how `torch.library.triton_op` works) replaces the op
by its launcher, with the kernel called through `torch.library.wrap_triton`. Inductor then emits
the kernel into the generated code as a user-defined Triton kernel launched from the wrapper.

Tile choice under dynamic shapes: the launcher picks a tile from the row count R
(`launch.gemm_tiles.choose_tile`); under torch.compile R is symbolic, and a Python branch on it
would guard and recompile at every tile boundary. Instead the tile regimes (R ranges with one
tile each, found by evaluating `choose_tile` itself) become nested `torch.cond`s on R, which
Inductor turns into host-side `if` on the size symbol in the wrapper: one compiled graph for
every token count, the same tile as eager at every R, one kernel launch per GEMM.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import _compat

# Never more regimes than this (a non-monotone tile table would otherwise make many).
MAX_REGIMES = 8
R_LIMIT = 2**31 - 1


def tile_regimes(choose: Callable[[int], object], r_limit: int = R_LIMIT) -> list[tuple[int, object]]:
    """[(last R of the regime, tile)] for R = 1..r_limit, from the tile function `choose(R)`.

    Assumes the tile changes a few times as R grows (a step function); each regime ends at the
    largest R with the same tile as its first R.
    """
    regimes: list[tuple[int, object]] = []
    r = 1
    while r <= r_limit:
        tile = choose(r)
        lo, step = r, 1
        while lo + step <= r_limit and choose(lo + step) == tile:
            lo += step
            step *= 2
        hi = min(lo + step, r_limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if choose(mid) == tile:
                lo = mid
            else:
                hi = mid
        regimes.append((lo, tile))
        r = lo + 1
        if len(regimes) == MAX_REGIMES - 1 and r <= r_limit:
            regimes.append((r_limit, choose(r)))
            break
    return regimes


def _default_launch(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, tile):
    from inductor_w4a8.launch import grouped_gemm as launcher
    return launcher.grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size,
                                 tile=tile, wrap=_compat.wrap_triton())


def _default_choose(a, w, group_size) -> Callable[[int], object]:
    from inductor_w4a8.launch import gemm_tiles
    K = a.shape[1]
    E, N, _ = w.shape
    return functools.partial(lambda R: gemm_tiles.choose_tile(R, N, K, E, group_size))


def traced_grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, *,
                        launch=None, choose=None):
    """The grouped GEMM as traceable code: nested torch.cond over the tile regimes of R.

    `launch(a, a_scale, w, w_scale, w_chan_scale, offsets, group_size, tile)` and `choose(R)`
    default to the real launcher (through wrap_triton) and tile table; tests pass stand-ins.
    """
    launch = launch or _default_launch
    choose = choose or _default_choose(a, w, group_size)
    has_chan = w_chan_scale is not None

    def branch(tile):
        def run(a, a_scale, w, w_scale, offsets, *chan):
            return launch(a, a_scale, w, w_scale, chan[0] if chan else None, offsets, group_size, tile)
        return run

    regimes = tile_regimes(choose)
    operands = (a, a_scale, w, w_scale, expert_offsets) + ((w_chan_scale,) if has_chan else ())

    def dispatch(i: int):
        last, tile = regimes[i]
        if i == len(regimes) - 1:
            return branch(tile)
        rest = dispatch(i + 1)

        def run(*ops):
            pred = ops[0].shape[0] <= last
            if isinstance(pred, bool):  # static R: pick the branch now
                return (branch(tile) if pred else rest)(*ops)
            return torch.cond(pred, branch(tile), rest, ops)
        return run

    return dispatch(0)(*operands)


def functional_rule(settings_fn):
    """The FunctionalTensorMode rule for w4a8::grouped_gemm; `settings_fn()` gives the active
    backend settings (None outside a "w4a8" compile)."""
    known = _compat.functional_tensor_types()

    def rule(mode, op, types, args, kwargs):
        settings = settings_fn()
        inline = (settings is not None and settings.grouped_gemm == "triton"
                  and all(issubclass(t, known) for t in types))
        if inline:
            a = args[0] if args else kwargs["a"]
            inline = a.device.type in settings.inline_devices
        if not inline:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return traced_grouped_gemm(*args, **kwargs, launch=settings.gemm_launch,
                                       choose=settings.gemm_choose)
    return rule
