"""Input validation shared by every op: clear errors that name the argument and the fix.

Shape, dtype and device checks run always (also under fake tensors), before any launch or
write. Value checks (offsets monotone, expert ids in range) read device values, which
synchronizes the host with the device, so they are a debug switch, off by default:
`with value_checks(True): ...` or the environment variable W4A8_VALUE_CHECKS=1 turns them on,
and even then they run only in eager mode, outside CUDA-graph capture and torch.compile tracing
(`value_checks_enabled`). With them off, memory safety stays in the kernels: offsets are clamped
and expert ids masked on the device, so no value can make a kernel read or write out of bounds.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading

import torch


class W4A8InputError(ValueError):
    """Raised for an input the W4A8 ops refuse; the message names the argument and the fix."""


class W4A8CheckpointError(ValueError):
    """A checkpoint that is not W4A8 compressed-tensors, or whose tensors do not fit together."""


def fail(op: str, message: str) -> None:
    raise W4A8InputError(f"w4a8::{op}: {message}")


_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32)


def _holds_bits(have: torch.dtype, want: torch.dtype) -> bool:
    """True when `have` can only be a bit container of `want`: packed int4 words (int32) kept as
    floats or unsigned ints, or fp8 bytes kept as uint8 / int8. Then `.to` would change the values
    and destroy the packed nibbles or fp8 codes; the fix is `.view`."""
    if want == torch.int32:
        return have.is_floating_point or have in _UNSIGNED
    if want in (torch.float8_e4m3fn, torch.float8_e5m2):
        return have in (torch.uint8, torch.int8)
    return False


def _dtype_fix(t: torch.Tensor, want: torch.dtype) -> str:
    if not _holds_bits(t.dtype, want):
        return f"convert it with .to({want})"
    have, size = t.dtype.itemsize, want.itemsize
    last = t.shape[-1] if t.dim() else 1
    if have == size:
        shape = "same shape"
    elif (last * have) % size == 0:
        shape = f"last dim {last} -> {last * have // size}"
    else:
        shape = f"its last dim {last} x {have} bytes must be a multiple of {size}"
    what = "packed int4 words" if want == torch.int32 else "fp8 codes"
    return (f"if it holds the bits of {what}, reinterpret them "
            f"with .view({want}) ({shape}); .to({want}) would convert the values instead")


def check_dtype(op: str, name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        fail(op, f"{name} must have dtype {want}, got {t.dtype}; {_dtype_fix(t, dtypes[0])}")


def check_rank(op: str, name: str, t: torch.Tensor, rank: int | tuple[int, ...], layout: str) -> None:
    ranks = (rank,) if isinstance(rank, int) else rank
    if t.dim() not in ranks:
        fail(op, f"{name} must have rank {' or '.join(map(str, ranks))} ({layout}), got shape {tuple(t.shape)}")


def check_min_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() < rank:
        fail(op, f"{name} must have rank >= {rank} ({layout}), got shape {tuple(t.shape)}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        fail(op, f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
                 f"call .contiguous() on it first")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            fail(op, f"{name} is on {t.device} but {first_name} is on {first.device}; "
                     f"move all inputs to one device")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        fail(op, f"{name} must have shape {tuple(expected)} ({layout}), got {tuple(t.shape)}")


VALUE_CHECKS_ENV = "W4A8_VALUE_CHECKS"


def _env_default() -> bool:
    return os.environ.get(VALUE_CHECKS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# read once at import: the default forward must not pay for an environment lookup per op
_DEFAULT = _env_default()
_state = threading.local()


@contextlib.contextmanager
def value_checks(enabled: bool = True):
    """Debug switch for the value checks that read device values (and so synchronize the host
    with the device), in this thread: off by default (W4A8_VALUE_CHECKS=1 flips the default).
    With it on, a bad offsets / expert-ids tensor is refused with a W4A8InputError naming it."""
    previous = getattr(_state, "enabled", None)   # None: never set in this thread
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        if previous is None:
            del _state.enabled
        else:
            _state.enabled = previous


def value_checks_enabled(t: torch.Tensor) -> bool:
    """True when a value check is switched on and may synchronize: eager, real tensors, not
    capturing, not compiling."""
    if not getattr(_state, "enabled", _DEFAULT):
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def value_checks_setting() -> bool | None:
    """The switch as set by `value_checks(...)` in this thread, or None where it was never set
    (post-processing, which is off the forward path, has its own default: check on the host)."""
    return getattr(_state, "enabled", None)


def positive_int(name: str, value, fail) -> int:
    """`value` as an int when it is a positive integer (not a bool); else `fail(message)`, the
    caller's own error (it names the module the argument belongs to)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        fail(f"{name} must be a positive int, got {value!r}")
    return int(value)
