"""The "w4a8" torch.compile backend: Inductor with our lowerings installed.

    import inductor_w4a8                       # registers the backend
    compiled = torch.compile(moe, backend="w4a8", fullgraph=True, dynamic=True)
    compiled = torch.compile(moe, backend="w4a8", mode="max-autotune-no-cudagraphs")
    compiled = torch.compile(moe, backend="w4a8", options={
        "w4a8.mode": "max-autotune-no-cudagraphs", "w4a8.grouped_gemm": "extern",
        "epilogue_fusion": True})

`mode` and every Inductor option pass through exactly as with backend="inductor" (same
validation, same mode presets). Options named "w4a8.*" are ours:

    w4a8.grouped_gemm  "triton" (default): the grouped GEMM's Triton kernel is traced into
                       Inductor's generated code (one torch.cond over its tile regimes);
                       "extern": Inductor calls the w4a8::grouped_gemm op.
    w4a8.fuse          ops replaced by their pure-torch definitions so Inductor fuses them:
                       a list of op names, "default" (none: DEFAULT_FUSED, by
                       measurement), "all" or "none".
    w4a8.mode          an Inductor mode ("max-autotune", ...) given inside `options`:
                       torch.compile refuses `mode=` and `options=` together.

Dynamic shapes: pass dynamic=True (or torch._dynamo.mark_dynamic the token dim) to get one
graph for every token count >= 2; T = 1 is specialized by Dynamo (the one recompile).
See docs/compile.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Sequence

import torch

from .checks import value_checks
from .moe import EAGER_FRAMES

try:
    from . import lowerings
except ImportError:  # a source checkout that was not pip-installed: lowerings/ is beside us
    import importlib.util
    import os
    import sys

    _dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lowerings")
    _spec = importlib.util.spec_from_file_location(
        f"{__package__}.lowerings", os.path.join(_dir, "__init__.py"), submodule_search_locations=[_dir])
    lowerings = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = lowerings
    _spec.loader.exec_module(lowerings)
from .lowerings import _compat  # noqa: E402
from .lowerings import decompositions as _decompositions  # noqa: E402

log = logging.getLogger(__name__)

BACKEND_NAME = "w4a8"
OPTION_PREFIX = "w4a8."

# Inductor settings we default to (any can be overridden through `options`).
DEFAULT_INDUCTOR_OPTIONS: dict[str, Any] = {
    # kernel names that say what they compute, so profiles attribute time to our ops
    "triton.unique_kernel_names": True,
    # round to bf16 where the code says .to(bf16), as eager does, also inside fused kernels
    # (Inductor otherwise keeps fused intermediates in fp32): compiled == eager bit for bit on
    # CPU, and fp8 activation quantization never sees values eager would not produce
    "emulate_precision_casts": True,
}


def _parse_fuse(value) -> tuple[str, ...]:
    if value is None or value == "default":
        return _decompositions.DEFAULT_FUSED
    if value == "all":
        return tuple(_decompositions.DECOMPOSITIONS)
    if value in ("none", (), []):
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(value)


def split_options(options: dict[str, Any] | None) -> tuple[lowerings.Settings, dict[str, Any]]:
    """Our "w4a8.*" options -> Settings; the rest are Inductor's (defaults added).
    ("w4a8.mode" is left in the Inductor dict under "w4a8.mode" for the caller to pop.)"""
    ours: dict[str, Any] = {}
    inductor: dict[str, Any] = dict(DEFAULT_INDUCTOR_OPTIONS)
    for key, value in (options or {}).items():
        if key.startswith(OPTION_PREFIX):
            ours[key[len(OPTION_PREFIX):]] = value
        else:
            inductor[key] = value
    known = {"grouped_gemm", "fuse", "inline_devices", "gemm_launch", "gemm_choose", "mode"}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise ValueError(f"unknown w4a8 backend option(s) {[OPTION_PREFIX + k for k in unknown]}; "
                         f"known: {sorted(OPTION_PREFIX + k for k in known)}")
    if "fuse" in ours:
        ours["fuse"] = _parse_fuse(ours["fuse"])
    if "inline_devices" in ours:
        ours["inline_devices"] = tuple(ours["inline_devices"])
    if "mode" in ours:
        inductor[OPTION_PREFIX + "mode"] = ours.pop("mode")
    return lowerings.Settings(**ours), inductor


def _cache_pass(settings: lowerings.Settings):
    """A no-op post-grad pass whose uuid carries our settings and lowering code into Inductor's
    and AOTAutograd's cache keys (the Dynamo graph is the same for any backend settings)."""
    base = _compat.custom_graph_pass_base()
    digest = hashlib.sha256()
    for module in (lowerings, lowerings.grouped_gemm, _decompositions, _compat):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    key = f"{settings.cache_key()}:{torch.__version__}:{digest.hexdigest()[:16]}"

    class W4A8LoweringsKey(base):
        def __call__(self, graph):
            return None

        def uuid(self):
            return key

    return W4A8LoweringsKey()


def inductor_config_patches(mode: str | None, inductor_options: dict[str, Any],
                            settings: lowerings.Settings) -> dict[str, Any]:
    """Config patches for compile_fx: the mode preset and options (validated as
    torch.compile(backend="inductor") validates them), plus our cache-key pass."""
    patches = dict(_compat.inductor_mode_wrapper(mode, inductor_options).config)
    config = _compat.inductor_config()
    if patches.get("post_grad_custom_pre_pass", config.post_grad_custom_pre_pass) is None:
        patches["post_grad_custom_pre_pass"] = _cache_pass(settings)
    else:  # the user's own pass holds the slot: keep stale artifacts out by not caching
        patches["fx_graph_cache"] = False
    return patches


def w4a8_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                 options: dict[str, Any] | None = None):
    """torch.compile backend: Inductor's compile_fx with our compile-path rules active."""
    lowerings.install()
    settings, inductor_options = split_options(options)
    option_mode = inductor_options.pop(OPTION_PREFIX + "mode", None)
    if mode is not None and option_mode is not None and mode != option_mode:
        raise ValueError(f"mode={mode!r} and options['w4a8.mode']={option_mode!r} disagree; give one")
    mode = mode or option_mode
    patches = inductor_config_patches(mode, inductor_options, settings)
    # no cache key of ours in the patches -> no AOTAutograd cache either
    autograd_cache = {"enable_autograd_cache": False} if patches.get("fx_graph_cache") is False else {}
    try:
        with lowerings.compiling(settings), _compat.autograd_cache_config().patch(autograd_cache):
            return _without_value_checks(_compat.compile_fx()(gm, example_inputs, config_patches=patches))
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, _compat.dynamo_restart_exceptions()):
            raise   # Dynamo restarting its analysis, not a failure of the traced GEMM
        if settings.grouped_gemm != "triton" or settings.gemm_launch is not None or \
                not _calls_gemm(gm) or not _on_devices(example_inputs, settings.inline_devices):
            raise
        # The traced GEMM is the newest part of the path: if Inductor fails on it, compile
        # with the op called instead (same kernel, chosen per call) rather than fail the model.
        log.warning("w4a8 backend: compiling with the grouped GEMM traced into Inductor's code "
                    "failed (%s: %s); compiling again with w4a8.grouped_gemm='extern'",
                    type(exc).__name__, exc)
        settings = dataclasses.replace(settings, grouped_gemm="extern")
        patches = inductor_config_patches(mode, inductor_options, settings)
        with lowerings.compiling(settings), _compat.autograd_cache_config().patch(autograd_cache):
            return _without_value_checks(_compat.compile_fx()(gm, example_inputs, config_patches=patches))


def _without_value_checks(compiled_fn):
    """Compiled code runs the ops with their value checks off: those checks synchronize the
    device (DESIGN: value checks run in eager mode only); shape, dtype and device checks ran when
    the graph was traced. Keeps the boxed calling convention of what compile_fx returned."""
    def run(*args):
        with value_checks(False):
            return compiled_fn(*args)

    if getattr(compiled_fn, "_boxed_call", False):
        run._boxed_call = True
    return run


def _on_devices(example_inputs, devices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type in devices for t in example_inputs)


def _calls_gemm(gm) -> bool:
    return any(n.op == "call_function" and "grouped_gemm" in str(n.target) for n in gm.graph.nodes)


def register() -> None:
    """Register the backend under "w4a8" (idempotent; done on `import inductor_w4a8`)."""
    lowerings.install()
    # W4A8MoE's input checks run before Dynamo traces a compiled call, so a bad input raises
    # W4A8InputError with our message (any backend; docs/compile.md "Errors under compile")
    _compat.run_frames_as_python(*EAGER_FRAMES)
    if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(w4a8_backend, name=BACKEND_NAME)


register()

__all__ = ["BACKEND_NAME", "DEFAULT_INDUCTOR_OPTIONS", "split_options", "w4a8_backend", "register"]
