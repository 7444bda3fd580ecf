"""Shared launcher plumbing: device guard and block-size helpers."""
from __future__ import annotations

import contextlib
import os

import torch


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for the launch, so that Triton uses that device and its
    current stream (not the current stream of whatever device happened to be current)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")


def use_hw_fp8(t: torch.Tensor) -> bool:
    """Hardware fp8 converts when compiled for a GPU; the integer-exact path under
    TRITON_INTERPRET=1, whose own fp8 cast does not round to nearest even."""
    return t.device.type == "cuda" and not interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
