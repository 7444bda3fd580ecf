"""`process_weights_after_loading`: compressed-tensors W4A8 MoE weights -> what the GEMM reads.

Reads from the layer (names and shapes as in DESIGN.md; E experts, hidden H, intermediate I):
    w13_weight_packed  int32 [E, 2I, H // 8]  uint4b8     w13_weight_scale  bf16 [E, 2I, H // G]
    w2_weight_packed   int32 [E, H,  I // 8]  uint4b8     w2_weight_scale   bf16 [E, H,  I // G]
    group_size         int (G in formats.SUPPORTED_GROUP_SIZES)
    scale_mode         "fp8" or "exact" (formats.DEFAULT_SCALE_MODE when the attribute is missing)

Registers, for p in (w13, w2), as non-trainable parameters:
    {p}_weight          GEMM layout (`w4a8::encode_and_reorder_int4b_grouped`)
    {p}_weight_strides  int64 [E, 3] per-expert strides of that layout
    {p}_group_scale     bf16 [E, N, K // G] (exact mode, the checkpoint's scales as loaded) or
                        fp8 [E, N, K // G] (fp8 mode, `w4a8::convert_bf16_scales_to_fp8`)
    {p}_chan_scale      fp32 [E, N, 1] in fp8 mode; None in exact mode
then deletes the four checkpoint tensors and sets `layer.weights_processed = True`.

Every step is a `torch.ops.w4a8` op, so this runs unchanged on CPU, CUDA and meta tensors. On CUDA
every kernel is enqueued on the caller's current stream and nothing synchronizes: a caller that
loaded the weights on stream s and calls this with s current gets exact results however far s lags.
All inputs are validated before anything is written, so a refused layer is left untouched.

Value checks (`check_checkpoint_values`), so that a bad load fails here and not as all-zero or NaN
outputs later: a scale tensor that is entirely zero or packed words that all still hold the
constructor's fill (nothing was loaded: W4A8MoE starts as q = 0 weights with zero scales), and
NaN, infinite or negative group scales (the symmetric rule makes every scale amax / 7.5 >= 0; a
single zero scale is valid, it is an all-zero group or tensor-parallel padding). Reading values
makes the host wait for the device, which would break the stream contract above on CUDA, so by
default they run where the tensors are host memory (CPU) and are skipped on CUDA and meta;
`check_values=True` forces them (on CUDA: one synchronization), `False` skips them, and
`value_checks(False)` turns the default off as it does for the ops. The checkpoint loader checks
the tensors it reads on the host before they reach the device.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from . import formats
from .checks import W4A8InputError, value_checks_setting

_OP = "process_weights_after_loading"
CHECKPOINT_NAMES = ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale")
PROCESSED_SUFFIXES = ("_weight", "_weight_strides", "_group_scale", "_chan_scale")


def _fail(message: str) -> None:
    raise W4A8InputError(f"{_OP}: {message}")


def _tensor(layer, name: str) -> torch.Tensor:
    t = getattr(layer, name, None)
    if t is None:
        _fail(f"layer has no {name}; it must hold the compressed-tensors checkpoint tensors "
              f"{', '.join(CHECKPOINT_NAMES)} (load the checkpoint first)")
    if not isinstance(t, torch.Tensor):
        _fail(f"layer.{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.detach()


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple, layout: str) -> None:
    if t.dtype != dtype:
        _fail(f"layer.{name} must have dtype {dtype} ({layout}), got {t.dtype}")
    if t.dim() != 3:
        _fail(f"layer.{name} must have rank 3 ({layout}), got shape {tuple(t.shape)}")
    if tuple(t.shape) != shape:
        _fail(f"layer.{name} must have shape {shape} ({layout}), got {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(f"layer.{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
              f"make it contiguous before processing")


def _validate(layer) -> tuple[dict[str, torch.Tensor], int, str]:
    if getattr(layer, "weights_processed", False):
        raise RuntimeError(f"{_OP}: this layer's weights were already processed (weights_processed "
                           f"is True and the checkpoint tensors are gone); call it once per load")
    t = {name: _tensor(layer, name) for name in CHECKPOINT_NAMES}
    scale_mode = getattr(layer, "scale_mode", None) or formats.DEFAULT_SCALE_MODE
    if scale_mode not in formats.SCALE_MODES:
        _fail(f"layer.scale_mode={scale_mode!r} is not supported; use one of {formats.SCALE_MODES}")
    group_size = getattr(layer, "group_size", None)
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool):
        _fail(f"layer.group_size must be an int (one of {formats.SUPPORTED_GROUP_SIZES}), "
              f"got {group_size!r}")
    group_size = int(group_size)
    if group_size not in formats.SUPPORTED_GROUP_SIZES:
        _fail(f"layer.group_size={group_size} is not supported; use one of "
              f"{formats.SUPPORTED_GROUP_SIZES}")

    w13, w2 = t["w13_weight_packed"], t["w2_weight_packed"]
    for name in ("w13_weight_packed", "w2_weight_packed"):
        if t[name].dim() != 3:
            _fail(f"layer.{name} must have rank 3 ([E, N, K // 8] int32), got shape "
                  f"{tuple(t[name].shape)}")
    E, two_i, h_words = w13.shape
    H = h_words * formats.NIBBLES_PER_WORD
    if two_i % 2:
        _fail(f"layer.w13_weight_packed.shape[1]={two_i} must be even (gate and up stacked: 2I)")
    I = two_i // 2
    for what, K in (("hidden size H", H), ("intermediate size I", I)):
        if K % group_size:
            _fail(f"{what}={K} is not a multiple of group_size={group_size}; the checkpoint's "
                  f"group size and the layer's group_size must agree")
    # (every supported group size is a multiple of 8, so I // 8 words hold I nibbles exactly)
    _check("w13_weight_packed", w13, torch.int32, (E, 2 * I, H // 8), "[E, 2I, H // 8] uint4b8 words")
    _check("w13_weight_scale", t["w13_weight_scale"], torch.bfloat16, (E, 2 * I, H // group_size),
           "[E, 2I, H // group_size] bf16 group scales")
    _check("w2_weight_packed", w2, torch.int32, (E, H, I // 8), "[E, H, I // 8] uint4b8 words")
    _check("w2_weight_scale", t["w2_weight_scale"], torch.bfloat16, (E, H, I // group_size),
           "[E, H, I // group_size] bf16 group scales")
    device = w13.device
    for name, x in t.items():
        if x.device != device:
            _fail(f"layer.{name} is on {x.device} but w13_weight_packed is on {device}; move the "
                  f"whole layer to one device first")
    for prefix in ("w13", "w2"):
        for suffix in PROCESSED_SUFFIXES:
            name = prefix + suffix
            if getattr(layer, name, None) is not None and not (
                    isinstance(layer, nn.Module) and name in layer._parameters):
                _fail(f"layer.{name} already exists and is not a parameter this function may "
                      f"replace; rename it")
    # dry run of every op on meta tensors of the same shapes: whatever else an op refuses
    # (its own checks run in its fake kernel) is refused here, before anything is written
    with torch.no_grad():
        for prefix in ("w13", "w2"):
            packed = torch.empty_like(t[f"{prefix}_weight_packed"], device="meta")
            torch.ops.w4a8.convert_packed_uint4b8_to_signed_int4_(packed)
            torch.ops.w4a8.encode_and_reorder_int4b_grouped(packed)
            if scale_mode == "fp8":
                torch.ops.w4a8.convert_bf16_scales_to_fp8(
                    torch.empty_like(t[f"{prefix}_weight_scale"], device="meta"))
    return t, group_size, scale_mode


# the first words are read before the whole tensor, so a loaded layer costs a few kilobytes
_PROBE_WORDS = 4096


def _all_equal(t: torch.Tensor, value: int) -> bool:
    flat = t.reshape(-1)
    if flat.numel() == 0 or bool((flat[:_PROBE_WORDS] != value).any()):
        return False
    return bool((flat == value).all())


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    flat = int(mask.reshape(-1).to(torch.uint8).argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape))


def check_checkpoint_values(prefix: str, packed: torch.Tensor, scale: torch.Tensor,
                            error: type[Exception] = W4A8InputError, sep: str = "_",
                            refuse_unloaded: bool = True) -> None:
    """Refuse the values of one projection's checkpoint tensors (`{prefix}{sep}weight_packed`,
    `{prefix}{sep}weight_scale`) that can only come from a failed or corrupt load (module docstring).
    Reads every scale and, unless its first words differ from the constructor's fill, every word;
    call it on host tensors (a CUDA tensor costs a synchronization). Raises `error`; the tensors
    are named `{prefix}{sep}weight_packed` / `{prefix}{sep}weight_scale`."""
    packed, scale = packed.detach(), scale.detach()
    unloaded = "; nothing was loaded into this layer (load the checkpoint with load_state_dict or " \
               "inductor_w4a8.load_w4a8_checkpoint before processing)"
    if refuse_unloaded and scale.numel() and not bool(scale.any()):
        raise error(f"{_OP}: every value of {prefix}{sep}weight_scale is 0{unloaded}")
    for fill in (formats.UINT4B8_ZERO_WORD, 0) if refuse_unloaded else ():
        if _all_equal(packed, fill):
            raise error(f"{_OP}: every word of {prefix}{sep}weight_packed is {fill & 0xFFFFFFFF:#010x} "
                        f"(the constructor's fill or zeroed memory){unloaded}")
    for what, bad in (("NaN or infinite", ~torch.isfinite(scale)), ("negative", scale < 0)):
        count = int(bad.sum())
        if count:
            where = ", ".join(("expert", "row", "group")[-bad.dim():])
            raise error(f"{_OP}: {prefix}{sep}weight_scale holds {count} {what} group scale(s), the first "
                        f"at [{where}] = {list(_first_index(bad))}; symmetric int4 scales are "
                        f"finite and >= 0 (amax / 7.5): the checkpoint is corrupt or was not written "
                        f"by a compressed-tensors quantizer")


def wants_value_checks(check_values: bool | None, t: torch.Tensor) -> bool:
    if t.device.type == "meta":
        return False
    if check_values is not None:
        return bool(check_values)
    if value_checks_setting() is False:   # value_checks(False) skips them here too
        return False
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _set_param(layer, name: str, value: torch.Tensor | None) -> None:
    param = None if value is None else nn.Parameter(value, requires_grad=False)
    if isinstance(layer, nn.Module):
        if hasattr(layer, name) and name not in layer._parameters:
            delattr(layer, name)  # a plain attribute or buffer holding None (checked in _validate)
        layer.register_parameter(name, param)
    else:
        setattr(layer, name, param)


def _release(layer, name: str, t: torch.Tensor) -> None:
    """Drop a checkpoint tensor. On CUDA, first tell the caching allocator that the current
    stream uses it, so its memory is not handed out again (to its allocation stream) before the
    kernels we enqueued on this stream have read it."""
    if t.device.type == "cuda":
        t.record_stream(torch.cuda.current_stream(t.device))
    delattr(layer, name)


def process_weights_after_loading(layer, *, check_values: bool | None = None) -> None:
    """Convert a loaded W4A8 MoE layer in place; see the module docstring for the contract.
    check_values: None (default) checks the checkpoint's values on CPU only, True everywhere
    but meta (a synchronization on CUDA), False never."""
    t, _, scale_mode = _validate(layer)
    if wants_value_checks(check_values, t["w13_weight_packed"]):
        for prefix in ("w13", "w2"):
            check_checkpoint_values(prefix, t[f"{prefix}_weight_packed"], t[f"{prefix}_weight_scale"])
    with torch.no_grad():
        for prefix in ("w13", "w2"):
            packed, scale = t[f"{prefix}_weight_packed"], t[f"{prefix}_weight_scale"]
            torch.ops.w4a8.convert_packed_uint4b8_to_signed_int4_(packed)
            weight, strides = torch.ops.w4a8.encode_and_reorder_int4b_grouped(packed)
            if scale_mode == "fp8":
                group_scale, chan_scale = torch.ops.w4a8.convert_bf16_scales_to_fp8(scale)
            else:
                group_scale, chan_scale = scale, None
            _set_param(layer, f"{prefix}_weight", weight)
            _set_param(layer, f"{prefix}_weight_strides", strides)
            _set_param(layer, f"{prefix}_group_scale", group_scale)
            _set_param(layer, f"{prefix}_chan_scale", chan_scale)
            # free this weight's checkpoint tensors before converting the next (peak memory)
            _release(layer, f"{prefix}_weight_packed", packed)
            _release(layer, f"{prefix}_weight_scale", scale)
    layer.weights_processed = True
