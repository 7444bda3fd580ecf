"""Inductor lowerings for the w4a8:: ops (installed as `inductor_w4a8.lowerings`).

Private Inductor APIs live here and only here (`_compat` imports them, guarded by version).
`install()` (called by `inductor_w4a8.backend` on import) registers:

* `grouped_gemm`: a FunctionalTensorMode rule on `w4a8::grouped_gemm` that, while the "w4a8"
  backend compiles with `w4a8.grouped_gemm="triton"`, traces the op into its Triton kernel via
  `torch.library.wrap_triton` (the `torch.library.triton_op` mechanism), so Inductor emits the
  kernel into its generated code; tile regimes become `torch.cond` on the row count.
* `decompositions`: FunctionalTensorMode rules that, for the ops named in `w4a8.fuse`, trace
  their pure-torch definitions (quant / activation / combine; optionally routing and gather)
  so Inductor generates and fuses the code.

Everything is gated by `compiling(settings)`: outside a "w4a8" compile (eager, export, other
backends) the ops stay opaque custom ops.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable

from . import _compat, decompositions, grouped_gemm

GEMM_MODES = ("triton", "extern")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the "w4a8" backend does with our ops (from its `w4a8.*` options)."""
    # "triton": the GEMM kernel is traced into Inductor's generated code (CUDA);
    # "extern": Inductor calls the custom op (its launcher picks the tile per call).
    grouped_gemm: str = "triton"
    # ops replaced by their pure-torch definitions, for Inductor to fuse
    fuse: tuple[str, ...] = decompositions.DEFAULT_FUSED
    # devices the GEMM is traced into code on (Triton kernels: CUDA only)
    inline_devices: tuple[str, ...] = ("cuda",)
    # test hooks: stand-ins for the launcher and the tile function (see grouped_gemm.py)
    gemm_launch: Callable | None = None
    gemm_choose: Callable | None = None

    def __post_init__(self):
        if self.grouped_gemm not in GEMM_MODES:
            raise ValueError(f"w4a8.grouped_gemm={self.grouped_gemm!r}: use one of {GEMM_MODES}")
        decompositions.check_names(self.fuse)

    def cache_key(self) -> str:
        hooks = (getattr(self.gemm_launch, "__qualname__", None), getattr(self.gemm_choose, "__qualname__", None))
        return f"w4a8-lowerings-v1:{self.grouped_gemm}:{','.join(sorted(self.fuse))}:" \
               f"{','.join(self.inline_devices)}:{hooks}"


_state = threading.local()
_installed = False
_install_lock = threading.Lock()


def active_settings() -> Settings | None:
    """The settings of the "w4a8" compile running in this thread, else None."""
    return getattr(_state, "settings", None)


@contextlib.contextmanager
def compiling(settings: Settings):
    """Turn our compile-path rules on for this thread while Inductor (AOTAutograd) traces."""
    previous = active_settings()
    _state.settings = settings
    try:
        yield
    finally:
        _state.settings = previous


def install() -> None:
    """Register the compile-path rules on our ops (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _compat.check_torch_version()
        import torch
        import inductor_w4a8.ops  # noqa: F401  (defines the ops)

        mode = _compat.functional_tensor_mode()
        torch.library.register_torch_dispatch(
            "w4a8::grouped_gemm", mode, grouped_gemm.functional_rule(active_settings))
        for name in decompositions.DECOMPOSITIONS:
            torch.library.register_torch_dispatch(
                f"w4a8::{name}", mode, decompositions.functional_rule(name, active_settings))
        _installed = True


__all__ = ["Settings", "GEMM_MODES", "active_settings", "compiling", "install"]
