"""process_weights_after_loading on CPU and meta: both scale modes, the registered names, atomic
refusal of bad layers, and the error on a second call."""
import types

import pytest
import torch
from torch import nn

import inductor_w4a8 as w4a8
from inductor_w4a8 import W4A8InputError, formats
from inductor_w4a8.postprocess import CHECKPOINT_NAMES, process_weights_after_loading
from inductor_w4a8.testing import random_w4_weights

FP8 = torch.float8_e4m3fn


def make_layer(E=3, H=256, I=128, G=64, scale_mode="fp8", device="cpu", seed=0, cls=nn.Module):
    """A layer holding a compressed-tensors checkpoint: w13 [E, 2I, H], w2 [E, H, I]."""
    g = torch.Generator().manual_seed(seed)
    layer = cls()
    w13_packed, w13_scale, _ = random_w4_weights(E, 2 * I, H, G, generator=g)
    w2_packed, w2_scale, _ = random_w4_weights(E, H, I, G, generator=g)
    for name, t in zip(CHECKPOINT_NAMES, (w13_packed, w13_scale, w2_packed, w2_scale)):
        setattr(layer, name, nn.Parameter(t.to(device), requires_grad=False))
    layer.group_size = G
    if scale_mode is not None:
        layer.scale_mode = scale_mode
    return layer


def snapshot(layer):
    return {n: getattr(layer, n).detach().clone() for n in CHECKPOINT_NAMES}


def expected(ckpt, prefix, scale_mode):
    """The pipeline spelled out with formats (no ops): what the layer must end up holding."""
    signed = formats.uint4b8_to_signed_int4(ckpt[f"{prefix}_weight_packed"])
    weight, strides = formats.encode_gemm_layout(signed)
    scale = ckpt[f"{prefix}_weight_scale"]
    if scale_mode == "fp8":
        group_scale, chan_scale = formats.convert_bf16_scales_to_fp8(scale)
    else:
        group_scale, chan_scale = scale, None
    return weight, strides, group_scale, chan_scale


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)


@pytest.mark.parametrize("scale_mode", ["fp8", "exact"])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_cpu_both_modes(scale_mode, G):
    layer = make_layer(G=G, scale_mode=scale_mode)
    ckpt = snapshot(layer)
    assert process_weights_after_loading(layer) is None
    assert layer.weights_processed is True
    for name in CHECKPOINT_NAMES:
        assert not hasattr(layer, name)
    for prefix in ("w13", "w2"):
        weight, strides, group_scale, chan_scale = expected(ckpt, prefix, scale_mode)
        assert same(getattr(layer, f"{prefix}_weight"), weight)
        assert same(getattr(layer, f"{prefix}_weight_strides"), strides)
        assert same(getattr(layer, f"{prefix}_group_scale"), group_scale)
        assert same(getattr(layer, f"{prefix}_chan_scale"), chan_scale)
        # the layout decodes back to the checkpoint's int4 values
        q = formats.decode_gemm_layout(getattr(layer, f"{prefix}_weight"))
        assert torch.equal(q, formats.unpack_int4(ckpt[f"{prefix}_weight_packed"], biased=True))
    expect_names = {f"{p}{s}" for p in ("w13", "w2") for s in
                    ("_weight", "_weight_strides", "_group_scale", "_chan_scale")}
    if scale_mode == "exact":
        expect_names -= {"w13_chan_scale", "w2_chan_scale"}
        assert layer.w13_chan_scale is None and layer.w2_chan_scale is None
        assert layer.w13_group_scale.dtype == torch.bfloat16
    else:
        assert layer.w13_group_scale.dtype == FP8 and layer.w13_chan_scale.shape == (3, 256, 1)
    params = dict(layer.named_parameters())
    assert set(params) == expect_names and set(layer.state_dict()) == expect_names
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in params.values())


def test_default_scale_mode_when_missing():
    layer = make_layer(scale_mode=None)
    process_weights_after_loading(layer)
    mode = formats.DEFAULT_SCALE_MODE
    assert (layer.w13_chan_scale is None) == (mode == "exact")


def test_exported_from_package():
    assert w4a8.process_weights_after_loading is process_weights_after_loading


def test_plain_object_layer():
    layer = make_layer(cls=types.SimpleNamespace, scale_mode="fp8")
    ckpt = snapshot(layer)
    process_weights_after_loading(layer)
    assert same(layer.w2_weight, expected(ckpt, "w2", "fp8")[0])
    assert not hasattr(layer, "w13_weight_packed") and layer.weights_processed


def test_scales_that_require_grad():
    # a module that registered the bf16 scales as ordinary (trainable) parameters
    layer = make_layer(scale_mode="fp8")
    layer.w13_weight_scale.requires_grad_(True)
    process_weights_after_loading(layer)
    assert not layer.w13_group_scale.requires_grad


@pytest.mark.parametrize("scale_mode", ["fp8", "exact"])
def test_meta(scale_mode):
    layer = _meta_layer(scale_mode)  # a full GLM-4.6 layer, shapes only
    process_weights_after_loading(layer)
    assert layer.w13_weight.device.type == "meta"
    assert tuple(layer.w13_weight.shape) == formats.gemm_layout_shape(160, 3072, 5120)
    assert tuple(layer.w2_weight.shape) == formats.gemm_layout_shape(160, 5120, 1536)
    assert layer.w13_weight_strides.shape == (160, 3) and layer.w2_weight_strides.dtype == torch.int64
    assert layer.w13_group_scale.shape == (160, 3072, 40) and layer.w2_group_scale.shape == (160, 5120, 12)
    if scale_mode == "fp8":
        assert layer.w13_group_scale.dtype == FP8 and layer.w2_chan_scale.shape == (160, 5120, 1)
    else:
        assert layer.w13_group_scale.dtype == torch.bfloat16 and layer.w2_chan_scale is None


def _meta_layer(scale_mode, E=160, H=5120, I=1536, G=128):
    layer = nn.Module()
    shapes = {"w13_weight_packed": ((E, 2 * I, H // 8), torch.int32),
              "w13_weight_scale": ((E, 2 * I, H // G), torch.bfloat16),
              "w2_weight_packed": ((E, H, I // 8), torch.int32),
              "w2_weight_scale": ((E, H, I // G), torch.bfloat16)}
    for name, (shape, dtype) in shapes.items():
        setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False))
    layer.group_size, layer.scale_mode = G, scale_mode
    return layer


def test_twice_raises():
    layer = make_layer()
    process_weights_after_loading(layer)
    with pytest.raises(RuntimeError, match="already processed"):
        process_weights_after_loading(layer)


# ------------------------------------------------------------------------------------------
# atomic refusal: a bad layer raises before any tensor is written or attribute changed
# ------------------------------------------------------------------------------------------
def _bad_w2_dtype(layer):
    layer.w2_weight_packed = nn.Parameter(layer.w2_weight_packed.long(), requires_grad=False)


def _bad_w2_scale_shape(layer):
    s = layer.w2_weight_scale.detach()
    layer.w2_weight_scale = nn.Parameter(torch.cat([s, s], dim=-1), requires_grad=False)


def _bad_w2_noncontiguous(layer):
    t = layer.w2_weight_packed.detach()
    layer.w2_weight_packed = nn.Parameter(t.transpose(1, 2).contiguous().transpose(1, 2), requires_grad=False)


def _bad_w2_rank(layer):
    layer.w2_weight_packed = nn.Parameter(layer.w2_weight_packed.detach().flatten(0, 1), requires_grad=False)


def _bad_w2_experts(layer):
    layer.w2_weight_packed = nn.Parameter(layer.w2_weight_packed.detach()[:2].contiguous(), requires_grad=False)


def _bad_w2_device(layer):
    layer.w2_weight_scale = nn.Parameter(layer.w2_weight_scale.detach().to("meta"), requires_grad=False)


def _bad_scale_dtype(layer):
    layer.w2_weight_scale = nn.Parameter(layer.w2_weight_scale.detach().half(), requires_grad=False)


def _bad_group_size(layer):
    layer.group_size = 256


def _group_not_dividing_i(layer):
    layer.group_size = 128  # I = 64 is not a multiple of 128


def _bad_group_type(layer):
    layer.group_size = 64.0


def _bad_mode(layer):
    layer.scale_mode = "int8"


def _missing_w2(layer):
    del layer.w2_weight_scale


def _odd_w13_rows(layer):
    t = layer.w13_weight_packed.detach()
    layer.w13_weight_packed = nn.Parameter(t[:, :-1].contiguous(), requires_grad=False)


def _name_taken(layer):
    layer.register_buffer("w2_weight", torch.zeros(1))


@pytest.mark.parametrize("corrupt,match", [
    (_bad_w2_dtype, "w2_weight_packed must have dtype torch.int32"),
    (_bad_w2_scale_shape, "w2_weight_scale must have shape"),
    (_bad_w2_noncontiguous, "w2_weight_packed must be contiguous"),
    (_bad_w2_rank, "w2_weight_packed must have rank 3"),
    (_bad_w2_experts, "w2_weight_packed must have shape"),
    (_bad_w2_device, "w2_weight_scale is on meta"),
    (_bad_scale_dtype, "w2_weight_scale must have dtype torch.bfloat16"),
    (_bad_group_size, "group_size=256 is not supported"),
    (_group_not_dividing_i, "intermediate size I=64 is not a multiple of group_size=128"),
    (_bad_group_type, "group_size must be an int"),
    (_bad_mode, "scale_mode='int8' is not supported"),
    (_missing_w2, "layer has no w2_weight_scale"),
    (_odd_w13_rows, "must be even"),
    (_name_taken, "w2_weight already exists"),
])
def test_refusal_is_atomic(corrupt, match):
    layer = make_layer(E=3, H=256, I=64, G=64)
    corrupt(layer)
    before = {n: t.detach().clone() for n, t in vars(layer).items() if isinstance(t, torch.Tensor)}
    before.update({n: p.detach().clone() for n, p in layer.named_parameters()})
    before_buffers = {n: b.clone() for n, b in layer.named_buffers()}
    with pytest.raises(W4A8InputError, match=match):
        process_weights_after_loading(layer)
    assert not getattr(layer, "weights_processed", False)
    params = dict(layer.named_parameters())
    assert set(params) == set(before)
    for name, t in before.items():  # w13 included: nothing was converted
        p = params[name]
        assert p.device == t.device and (p.device.type == "meta" or torch.equal(p, t)), name
    for name, b in layer.named_buffers():
        assert torch.equal(b, before_buffers[name])
    for name in ("w13_weight", "w13_group_scale", "w13_chan_scale", "w13_weight_strides"):
        assert name not in params


def test_refusal_then_fix_then_success():
    layer = make_layer(E=2, H=256, I=128, G=64)
    ckpt = snapshot(layer)
    layer.scale_mode = "bogus"
    with pytest.raises(W4A8InputError):
        process_weights_after_loading(layer)
    layer.scale_mode = "fp8"
    process_weights_after_loading(layer)
    assert same(layer.w13_weight, expected(ckpt, "w13", "fp8")[0])


def test_op_level_refusal_is_atomic_too(monkeypatch):
    # whatever an op refuses beyond our own checks (here: a stand-in for a layout constraint of
    # the encode op) is caught by the meta dry run before w13 is converted
    import inductor_w4a8.ops as ops_module

    def refuse(packed):
        if packed.shape[2] == 16:  # w2 only (I // 8 = 16 words; w13 has H // 8 = 32)
            raise W4A8InputError("w4a8::encode_and_reorder_int4b_grouped: test refusal")
    monkeypatch.setattr(ops_module, "_check_reorder", refuse)
    layer = make_layer(E=2, H=256, I=128, G=64)
    ckpt = snapshot(layer)
    with pytest.raises(W4A8InputError, match="test refusal"):
        process_weights_after_loading(layer)
    for name in CHECKPOINT_NAMES:
        assert torch.equal(getattr(layer, name), ckpt[name])
    assert not hasattr(layer, "w13_weight")


def test_placeholders_holding_none_are_replaced():
    # a module may declare the processed names up front as None (attribute, buffer or parameter)
    layer = make_layer(scale_mode="fp8")
    layer.w13_weight = None
    layer.register_buffer("w2_weight", None)
    layer.register_parameter("w13_chan_scale", None)
    process_weights_after_loading(layer)
    assert isinstance(layer.w13_weight, nn.Parameter) and isinstance(layer.w2_weight, nn.Parameter)
    assert layer.w13_chan_scale.dtype == torch.float32
    assert "w2_weight" not in dict(layer.named_buffers())


# ------------------------------------------------------------------------------------------
# value checks: an unloaded layer and corrupt scales are refused before anything is written
# ------------------------------------------------------------------------------------------
def _assert_untouched(layer, before):
    assert not getattr(layer, "weights_processed", False)
    assert not hasattr(layer, "w13_weight") or getattr(layer, "w13_weight") is None
    for name, t in before.items():  # bitwise: a NaN must still be the same NaN
        now = getattr(layer, name).detach()
        assert torch.equal(now.view(torch.int16) if now.dtype == torch.bfloat16 else now,
                           t.view(torch.int16) if t.dtype == torch.bfloat16 else t), name


def test_unloaded_moe_is_refused():
    # W4A8MoE starts as q = 0 words (0x88888888) and zero scales: processing it gave zero outputs
    moe = w4a8.W4A8MoE(4, 2, 128, 128, group_size=64)
    before = snapshot(moe)
    with pytest.raises(W4A8InputError, match="every value of w13_weight_scale is 0.*nothing was loaded"):
        moe.process_weights_after_loading()
    _assert_untouched(moe, before)


@pytest.mark.parametrize("fill", [formats.UINT4B8_ZERO_WORD, 0], ids=["constructor-fill", "zeroed"])
@pytest.mark.parametrize("prefix", ["w13", "w2"])
def test_words_never_loaded_are_refused(prefix, fill, seed):
    layer = make_layer(seed=seed)
    getattr(layer, f"{prefix}_weight_packed").data.fill_(fill)
    before = snapshot(layer)
    with pytest.raises(W4A8InputError, match=f"every word of {prefix}_weight_packed is "
                                              f"{fill & 0xFFFFFFFF:#010x}"):
        process_weights_after_loading(layer)
    _assert_untouched(layer, before)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                        (float("-inf"), "NaN or infinite"), (-0.01, "negative")])
@pytest.mark.parametrize("prefix", ["w13", "w2"])
@pytest.mark.parametrize("scale_mode", ["fp8", "exact"])
def test_bad_scales_are_refused(prefix, value, what, scale_mode, seed):
    layer = make_layer(scale_mode=scale_mode, seed=seed)
    scale = getattr(layer, f"{prefix}_weight_scale")
    g = torch.Generator().manual_seed(seed)
    idx = [int(torch.randint(n, (1,), generator=g)) for n in scale.shape]
    scale.data[tuple(idx)] = value
    before = snapshot(layer)
    with pytest.raises(W4A8InputError, match=rf"{prefix}_weight_scale holds 1 {what} group scale\(s\), "
                                              rf"the first at \[expert, row, group\] = \{list(idx)}"):
        process_weights_after_loading(layer)
    _assert_untouched(layer, before)


def test_single_zero_scales_are_valid():
    # an all-zero group quantizes to scale 0 (and tensor-parallel padding is zero groups)
    layer = make_layer(scale_mode="fp8")
    layer.w2_weight_scale.data[0, :5] = 0
    layer.w13_weight_scale.data[1] = 0
    ckpt = snapshot(layer)
    process_weights_after_loading(layer)
    assert same(layer.w2_group_scale, expected(ckpt, "w2", "fp8")[2])


def test_value_checks_can_be_skipped():
    for skip in (lambda layer: process_weights_after_loading(layer, check_values=False),
                 lambda layer: _process_with_value_checks_off(layer)):
        layer = make_layer(scale_mode="exact")
        layer.w2_weight_scale.data[0, 0, 0] = float("nan")
        skip(layer)
        assert layer.weights_processed and torch.isnan(layer.w2_group_scale[0, 0, 0])


def _process_with_value_checks_off(layer):
    with w4a8.value_checks(False):
        process_weights_after_loading(layer)


def test_check_checkpoint_values_takes_the_callers_error_type():
    from inductor_w4a8.postprocess import check_checkpoint_values

    class LoaderError(ValueError):
        pass
    packed, scale, _ = random_w4_weights(2, 64, 128, 64)
    check_checkpoint_values("w2", packed, scale, error=LoaderError)     # a good projection passes
    scale[1, 2, 0] = float("nan")
    with pytest.raises(LoaderError, match=r"w2_weight_scale holds 1 NaN .* = \[1, 2, 0\]"):
        check_checkpoint_values("w2", packed, scale, error=LoaderError)


def test_meta_layer_skips_value_checks():
    layer = _meta_layer("exact", E=4, H=256, I=128, G=64)
    process_weights_after_loading(layer, check_values=True)   # nothing to read on meta
    assert layer.weights_processed


def test_nan_scale_in_a_checkpoint_is_refused_at_load(tmp_path, seed):
    # the loader post-processes each layer, so a corrupt scale fails the load, not the outputs
    from inductor_w4a8.weights import load_w4a8_checkpoint, save_w4a8_checkpoint
    g = torch.Generator().manual_seed(seed)
    E, H, I = 2, 128, 128
    experts = {"model.layers.0.mlp": tuple((torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)
                                           for s in ((E, I, H), (E, I, H), (E, H, I)))}
    path = save_w4a8_checkpoint(tmp_path / "ckpt", experts, group_size=64,
                                config={"num_experts_per_tok": 1, "n_routed_experts": E})
    from safetensors.torch import load_file, save_file
    file = next(path.glob("*.safetensors"))
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if k.endswith("down_proj.weight_scale"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    # refused while reading the file (on the host, whatever the target device), naming its key
    with pytest.raises(ValueError, match=r"experts\.0\.down_proj.weight_scale holds 1 NaN or infinite"):
        load_w4a8_checkpoint(path)


@pytest.mark.cuda
def test_value_checks_on_cuda_only_when_asked():
    # on CUDA the default skips them (reading values would make the host wait for the loading
    # stream); check_values=True runs them there too, still before anything is written
    layer = make_layer(scale_mode="fp8", device="cuda")
    layer.w13_weight_scale.data[0, 1, 0] = float("inf")
    before = snapshot(layer)
    with pytest.raises(W4A8InputError, match=r"w13_weight_scale holds 1 NaN or infinite .* = \[0, 1, 0\]"):
        process_weights_after_loading(layer, check_values=True)
    _assert_untouched(layer, before)
    process_weights_after_loading(layer)
    assert layer.weights_processed
