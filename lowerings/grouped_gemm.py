"""The grouped GEMM in Inductor's generated code: `w4a8::grouped_gemm` traced into its Triton kernel.

How: the op is a `torch.library.custom_op` (opaque: eager, export and other backends see one
node). While the "w4a8" backend compiles, a rule registered for `FunctionalTensorMode` (the mode
AOTAutograd traces under; this is exactly how `torch.library.triton_op` works) replaces the op
by its launcher, with the kernel called through `torch.library.wrap_triton`. Inductor then emits
the kernel into the generated code as a user-defined Triton kernel launched from the wrapper.

Tile choice under dynamic shapes: the launcher picks a tile from the row count R
(`launch.gemm_tiles.choose_tile`); under torch.compile R is symbolic, and a Python branch on it
would guard and recompile at every tile boundary. Instead the tile regimes (R ranges with one
tile each, found by evaluating `choose_tile` itself) become nested conds (the `torch.cond`
higher-order op) on R, which Inductor turns into host-side `if` on the size symbol in the
wrapper: one compiled graph for every token count, the same Triton tile as eager at every R
(eager runs the Gluon kernel above gemm_tiles.WGMMA_ROWS rows per expert, bit for bit the same
output; traced launches take @triton.jit kernels only), one kernel launch per GEMM.

Under max-autotune each regime's kernel is a triton.autotune over num_warps / num_stages around
the regime's tile, which Inductor benchmarks like any user-defined autotuned Triton kernel.
"""
from __future__ import annotations

import logging
from typing import Callable

from . import _compat

log = logging.getLogger(__name__)

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


# The kernel's tile parameters that max-autotune's configs carry (the launcher's own values for
# them are dropped then); everything else the launcher passes is the same for every candidate.
TUNED_KERNEL_ARGS = ("BLOCK_M", "BLOCK_N", "GROUPS_PER_STEP")


def tile_config_kwargs(tile) -> dict:
    return {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "GROUPS_PER_STEP": tile.groups_per_step}


def autotune_tiles(tile, group_size: int) -> list:
    """The configs' tiles for a regime whose tile is `tile` (default first): the candidates that
    are valid for any N, K; `prune_invalid_configs` drops the rest once the kernel's N, K are seen."""
    from inductor_w4a8.launch import gemm_tiles
    return gemm_tiles.candidate_tiles(tile, None, None, group_size)


def prune_invalid_configs(regime_tile):
    """triton.autotune's early_config_prune: drops configs whose tile cannot run on this problem
    (gemm_tiles.tile_problems), the regime's own tile always kept. Inductor runs it while tracing,
    with the kernel's positional arguments (N, K) and keyword arguments (GROUP)."""
    import dataclasses

    from inductor_w4a8.launch import gemm_tiles

    def prune(configs, named_args, **kwargs):
        N, K, G = named_args.get("N"), named_args.get("K"), kwargs.get("GROUP")
        if not all(isinstance(v, int) for v in (N, K, G)):
            return configs     # symbolic N / K: nothing to decide on
        kept = []
        for config in configs:
            tile = dataclasses.replace(
                regime_tile, block_m=config.kwargs["BLOCK_M"], block_n=config.kwargs["BLOCK_N"],
                groups_per_step=config.kwargs["GROUPS_PER_STEP"], num_warps=config.num_warps,
                num_stages=config.num_stages)
            if tile == regime_tile or not gemm_tiles.tile_problems(tile, N, K, G):
                kept.append(config)
        return kept
    return prune


class _Autotuned:
    """`wrap` for the launcher under max-autotune: one triton.autotune over the regime's candidate
    tiles (block sizes, groups per K step, num_warps, num_stages; `autotune_tiles`), invalid ones
    pruned early, which Inductor benchmarks on the first run of each regime (the CUDA-graph
    runner's warm-up, never inside a capture). The persistent grid becomes a function of each
    config's block sizes; the launcher's own tile arguments are dropped: the configs carry them."""

    def __init__(self, tile, group_size: int):
        self.tile = tile
        self.tiles = autotune_tiles(tile, group_size)

    def configs(self) -> list:
        import triton
        return [triton.Config(tile_config_kwargs(t), num_warps=t.num_warps, num_stages=t.num_stages)
                for t in self.tiles]

    def __call__(self, kernel):
        import triton
        tuned = triton.autotune(configs=self.configs(), key=[],
                                prune_configs_by={"early_config_prune": prune_invalid_configs(self.tile)})
        return _TunedLaunch(_compat.wrap_triton()(tuned(kernel)), self.tile, kernel.arg_names)


class _TunedLaunch:
    """kernel[grid](*args, **kwargs) as the launcher writes it, for an autotuned kernel: the grid is
    recomputed per config from its block sizes (same rule as the launcher's: gemm_tiles.grid_size,
    the regime's programs_per_sm), and the tile keyword arguments are left to the configs."""

    def __init__(self, wrapped, regime_tile, arg_names):
        self.wrapped = wrapped
        self.regime_tile = regime_tile
        self.arg_names = list(arg_names)

    def __getitem__(self, _launcher_grid):
        import dataclasses

        from inductor_w4a8.launch import gemm_tiles

        def call(*args, num_warps=None, num_stages=None, **kwargs):
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            R, N, E, device = named["R"], named["N"], named["E"], args[0].device
            for name in TUNED_KERNEL_ARGS:
                kwargs.pop(name, None)

            def grid(meta):
                tile = dataclasses.replace(self.regime_tile, block_m=meta["BLOCK_M"], block_n=meta["BLOCK_N"])
                return (gemm_tiles.grid_size(tile, R, N, E, device),)
            return self.wrapped[grid](*args, **kwargs)
        return call


def _default_launch(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, tile):
    from inductor_w4a8.launch import grouped_gemm as launcher
    config = _compat.inductor_config()
    if config.max_autotune or config.max_autotune_gemm:
        wrap = _Autotuned(tile, group_size)
    else:
        wrap = _compat.wrap_triton()
    return launcher.grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size,
                                 tile=tile, wrap=wrap)


def _default_choose(a, w, group_size) -> Callable[[int], object]:
    from inductor_w4a8.launch import gemm_tiles
    K = a.shape[1]
    E, N, _ = w.shape
    return lambda R: gemm_tiles.choose_tile(R, N, K, E, group_size)


def traced_grouped_gemm(a, a_scale, w, w_scale, w_chan_scale, expert_offsets, group_size, *,
                        launch=None, choose=None):
    """The grouped GEMM as traceable code: nested torch.cond over the tile regimes of R.

    `launch(a, a_scale, w, w_scale, w_chan_scale, offsets, group_size, tile)` and `choose(R)`
    default to the real launcher (through wrap_triton) and tile table; tests pass stand-ins.
    """
    launch = launch or _default_launch
    choose = choose or _default_choose(a, w, group_size)
    has_chan = w_chan_scale is not None

    # Inductor binds a cond subgraph's size symbols from its operands' sizes and cannot solve
    # R = T * top_k for T, so the row-indexed operands enter the conds viewed as [c, R / c, ...]
    # (R = c * T): their dim 1 is the bare symbol. Branches flatten them back.
    R, K = a.shape
    c = _compat.size_factor(R)
    if c is None:
        raise NotImplementedError(f"grouped GEMM rows R={R}: not a constant times one size symbol")
    if c > 1:
        a, a_scale = a.view(c, R // c, K), a_scale.view(c, R // c, 1)

    # Branches return 1-tuples: the cond op's outputs are a sequence (Inductor's lowering of
    # it pairs outputs with the node's fake values one by one).
    def branch(tile):
        def run(a, a_scale, w, w_scale, offsets, *chan):
            if a.dim() == 3:
                a, a_scale = a.flatten(0, 1), a_scale.flatten(0, 1)
            return (launch(a, a_scale, w, w_scale, chan[0] if chan else None, offsets, group_size, tile),)
        return run

    regimes = tile_regimes(choose)
    operands = (a, a_scale, w, w_scale, expert_offsets) + ((w_chan_scale,) if has_chan else ())

    def dispatch(i: int):
        last, tile = regimes[i]
        if i == len(regimes) - 1:
            return branch(tile)
        rest = dispatch(i + 1)

        def run(*ops):
            rows = ops[0].shape[0] * ops[0].shape[1] if ops[0].dim() == 3 else ops[0].shape[0]
            pred = rows <= last
            if isinstance(pred, bool):  # static R: pick the branch now
                return (branch(tile) if pred else rest)(*ops)
            return tuple(_compat.cond_op()(pred, branch(tile), rest, ops))
        return run

    return dispatch(0)(*operands)[0]


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
        try:
            with mode:
                return traced_grouped_gemm(*args, **kwargs, launch=settings.gemm_launch,
                                           choose=settings.gemm_choose)
        except Exception as exc:  # noqa: BLE001  (a tracing failure must not fail the compile)
            if settings.gemm_launch is not None:
                raise
            log.warning("w4a8: tracing the grouped GEMM's Triton kernel into Inductor's code failed "
                        "(%s: %s); this compile calls the w4a8::grouped_gemm op instead "
                        "(w4a8.grouped_gemm='extern')", type(exc).__name__, exc)
            return mode.__torch_dispatch__(op, types, args, kwargs)
    return rule
