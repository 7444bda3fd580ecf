"""Launcher: in-place uint4b8 -> signed int4 conversion of int32-packed nibbles."""
from __future__ import annotations

import torch

from ..formats import NIBBLE_SIGN_FLIP
from ..kernels.int4_convert import uint4b8_to_signed_kernel
from ._common import cdiv, device_guard

BLOCK = 4096


def convert_uint4b8_to_signed_(packed: torch.Tensor) -> None:
    """Every nibble v of the int32 words becomes (v - 8) & 0xF, in place, on the current stream.

    Any rank; the words are processed as one flat contiguous array.
    """
    if packed.dtype != torch.int32 or not packed.is_contiguous():
        raise ValueError(f"convert_uint4b8_to_signed_: packed must be contiguous int32, got "
                         f"{packed.dtype} with strides {packed.stride()}")
    n = packed.numel()
    if n == 0:
        return
    with device_guard(packed):
        uint4b8_to_signed_kernel[(cdiv(n, BLOCK),)](packed, n, SIGN_FLIP=NIBBLE_SIGN_FLIP, BLOCK=BLOCK, num_warps=4)
