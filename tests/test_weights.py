"""compressed-tensors W4A8 checkpoints: the writer's format, loading every key spelling into
W4A8MoE, padding of I to whole groups, tensor-parallel loading, and refusal of non-W4A8 configs."""
import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inductor_w4a8 import formats, reference
from inductor_w4a8.moe import W4A8MoE
from inductor_w4a8.testing import rel_error
from inductor_w4a8.weights import (W4A8CheckpointError, load_w4a8_checkpoint, moe_routing_from_config,
                                   parse_quantization_config, quantization_config_dict,
                                   save_w4a8_checkpoint)

LAYER = "model.layers.0.mlp"
QWEN = {"model_type": "qwen3_moe", "num_experts_per_tok": 2, "norm_topk_prob": True}
GLM = {"model_type": "glm4_moe", "num_experts_per_tok": 2, "norm_topk_prob": True, "n_group": 2,
       "topk_group": 1, "routed_scaling_factor": 2.5}


def bf16_experts(E=4, H=128, I=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, I, H, generator=g) * 0.05).to(torch.bfloat16)
    w3 = (torch.randn(E, I, H, generator=g) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * 0.05).to(torch.bfloat16)
    return w1, w3, w2


def expected_layer(w1, w3, w2, G, routing, bias=None):
    """The same weights through W4A8MoE.from_float: what loading must reproduce bit for bit."""
    moe = W4A8MoE.from_float(w1, w3, w2, group_size=G, e_score_correction_bias=bias, **routing)
    moe.process_weights_after_loading()
    return moe


def inputs(E, H, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, generator=g).to(torch.bfloat16), torch.randn(T, E, generator=g))


def dense_reference(x, logits, w1, w3, w2, routing, bias=None):
    """fp64 MoE of the given (dequantized or bf16) weights, exact activations."""
    w, ids = reference.select_experts(logits, bias, routing["top_k"], routing["scoring"],
                                      routing["renormalize"], routing["n_group"] or 0,
                                      routing["topk_group"] or 0, routing["routed_scaling_factor"])
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            xe = x[t].double()
            h = torch.nn.functional.silu(w1[e].double() @ xe) * (w3[e].double() @ xe)
            out[t] += float(w[t, j]) * (w2[e].double() @ h)
    return out


def dequant(w, G):
    packed, scale = formats.quantize_w4(w, G)
    return formats.dequantize_w4(formats.unpack_int4(packed, biased=True), scale, G)


# ------------------------------------------------------------------------------------------------
# The written format
# ------------------------------------------------------------------------------------------------
def test_writer_writes_llm_compressor_keys_and_config(tmp_path, seed):
    w1, w3, w2 = bf16_experts(E=3, H=128, I=64, seed=seed)
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    grp = qc["config_groups"]["group_0"]
    assert {k: grp["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    assert {k: grp["input_activations"][k] for k in ("num_bits", "type", "dynamic", "strategy")} == \
        {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}
    assert cfg["num_experts_per_tok"] == 2
    tensors = load_file(str(path / "model.safetensors"))
    assert len(tensors) == 3 * 3 * 3
    for e in range(3):
        for proj, w, (N, K) in (("gate_proj", w1, (64, 128)), ("up_proj", w3, (64, 128)),
                                ("down_proj", w2, (128, 64))):
            base = f"{LAYER}.experts.{e}.{proj}"
            packed, scale = tensors[f"{base}.weight_packed"], tensors[f"{base}.weight_scale"]
            assert packed.dtype == torch.int32 and tuple(packed.shape) == (N, K // 8)
            assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (N, K // 64)
            assert tensors[f"{base}.weight_shape"].tolist() == [N, K]
            # the stored int4 is exactly formats.quantize_w4 of the expert (uint4b8, low nibble first)
            ref_packed, ref_scale = formats.quantize_w4(w[e], 64)
            assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("layout,shard", [("per_expert", None), ("stacked", None), ("per_expert", 40_000)])
@pytest.mark.parametrize("scale_mode", ["exact", "fp8"])
def test_load_equals_from_float(tmp_path, layout, shard, scale_mode, seed):
    w1, w3, w2 = bf16_experts(E=4, H=128, I=96, seed=seed)
    extra = {f"{LAYER}.gate.weight": torch.randn(4, 128).to(torch.bfloat16)}
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=32, config=QWEN,
                                tensors=extra, layout=layout, max_shard_bytes=shard)
    if shard:
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    ckpt = load_w4a8_checkpoint(path, scale_mode=scale_mode)
    assert ckpt.quant.group_size == 32
    assert list(ckpt.moe_layers) == [LAYER]
    assert torch.equal(ckpt.tensors[f"{LAYER}.gate.weight"], extra[f"{LAYER}.gate.weight"])
    moe = ckpt.moe_layers[LAYER]
    routing = moe_routing_from_config(QWEN)
    assert (moe.top_k, moe.scoring, moe.renormalize, moe.scale_mode) == (2, "softmax", True, scale_mode)
    ref = expected_layer(w1, w3, w2, 32, {**routing, "scale_mode": scale_mode})
    for name, t in ref.state_dict().items():
        assert torch.equal(moe.state_dict()[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else moe.state_dict()[name], t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn
                           else t), name
    x, logits = inputs(4, 128, seed=seed + 1)
    y = moe(x, logits)
    assert torch.equal(y, ref(x, logits))
    # and the layer computes the MoE of the checkpoint's weights, up to the fp8 activations (and,
    # in fp8 mode, the fp8 group scales): ~4.5% and ~6% normwise on these shapes
    exact = dense_reference(x, logits, dequant(w1, 32), dequant(w3, 32), dequant(w2, 32), routing)
    assert rel_error(y, exact) < (0.07 if scale_mode == "exact" else 0.1)


def test_spellings_mixtral_names_and_stacked_projections(tmp_path, seed):
    """Mixtral's w1/w3/w2 per-expert names and per-projection stacked keys load the same layer."""
    w1, w3, w2 = bf16_experts(E=4, H=128, I=64, seed=seed)
    base = save_w4a8_checkpoint(tmp_path / "base", {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN)
    tensors = load_file(str(base / "model.safetensors"))
    cfg = json.loads((base / "config.json").read_text())
    ref = load_w4a8_checkpoint(base).moe_layers[LAYER]
    x, logits = inputs(4, 128)
    y_ref = ref(x, logits)

    renamed = {k.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2"): v
               for k, v in tensors.items()}
    stacked = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for field in ("weight_packed", "weight_scale"):
            stacked[f"{LAYER}.experts.{proj}.{field}"] = torch.stack(
                [tensors[f"{LAYER}.experts.{e}.{proj}.{field}"] for e in range(4)])
    fused = {k: v for k, v in stacked.items() if "down_proj" in k}
    for field in ("weight_packed", "weight_scale"):
        fused[f"{LAYER}.experts.gate_up_proj.{field}"] = torch.cat(
            [stacked[f"{LAYER}.experts.gate_proj.{field}"], stacked[f"{LAYER}.experts.up_proj.{field}"]], 1)
    for name, state in (("mixtral", renamed), ("stacked", stacked), ("fused", fused)):
        d = tmp_path / name
        d.mkdir()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg))
        assert torch.equal(load_w4a8_checkpoint(d).moe_layers[LAYER](x, logits), y_ref), name


def test_sigmoid_routing_and_bias_from_config(tmp_path, seed):
    w1, w3, w2 = bf16_experts(E=4, H=128, I=128, seed=seed)
    bias = torch.randn(4) * 0.1
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=128, config=GLM,
                                tensors={f"{LAYER}.gate.e_score_correction_bias": bias})
    ckpt = load_w4a8_checkpoint(path)
    moe = ckpt.moe_layers[LAYER]
    assert (moe.scoring, moe.n_group, moe.topk_group, moe.routed_scaling_factor) == ("sigmoid", 2, 1, 2.5)
    assert torch.equal(moe.e_score_correction_bias, bias)
    assert f"{LAYER}.gate.e_score_correction_bias" not in ckpt.tensors      # consumed by the layer
    routing = moe_routing_from_config(GLM)
    x, logits = inputs(4, 128)
    assert torch.equal(moe(x, logits), expected_layer(w1, w3, w2, 128, routing, bias)(x, logits))


def test_routing_from_hf_configs():
    assert moe_routing_from_config({"model_type": "mixtral", "num_experts_per_tok": 2}) == {
        "top_k": 2, "scoring": "softmax", "renormalize": True, "n_group": None, "topk_group": None,
        "routed_scaling_factor": 1.0}
    assert moe_routing_from_config({"model_type": "qwen3_moe", "num_experts_per_tok": 8})["renormalize"] is False
    ds = moe_routing_from_config({"model_type": "deepseek_v3", "num_experts_per_tok": 8, "n_group": 8,
                                  "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid"})
    assert (ds["scoring"], ds["n_group"], ds["topk_group"], ds["renormalize"]) == ("sigmoid", 8, 4, True)
    # GLM-4.6: n_group = 1 is no grouping
    glm = moe_routing_from_config({"model_type": "glm4_moe", "num_experts_per_tok": 8, "n_group": 1,
                                   "topk_group": 1, "routed_scaling_factor": 2.5})
    assert (glm["scoring"], glm["n_group"]) == ("sigmoid", None)
    with pytest.raises(W4A8CheckpointError, match="num_experts_per_tok"):
        moe_routing_from_config({"model_type": "llama"})


def test_intermediate_not_a_multiple_of_the_group_is_padded(tmp_path, seed):
    """I = 48 with G = 32 (compressed-tensors stores ceil(48 / 32) = 2 groups): the layer pads I
    to 64 with zero channels and computes exactly the layer of the zero-padded weights."""
    E, H, I, G = 3, 64, 48, 32
    w1, w3, w2 = bf16_experts(E=E, H=H, I=I, seed=seed)
    pad = 64 - I
    p1, p3 = torch.nn.functional.pad(w1, (0, 0, 0, pad)), torch.nn.functional.pad(w3, (0, 0, 0, pad))
    p2 = torch.nn.functional.pad(w2, (0, pad))
    full = save_w4a8_checkpoint(tmp_path / "padded", {LAYER: (p1, p3, p2)}, group_size=G, config=QWEN)
    t = load_file(str(full / "model.safetensors"))
    # cut the padded checkpoint back to I = 48 (what a writer of the unpadded layer stores)
    cut = {}
    for k, v in t.items():
        if ".gate_proj." in k or ".up_proj." in k:
            cut[k] = v[:I] if not k.endswith("weight_shape") else torch.tensor([I, H])
        elif k.endswith("down_proj.weight_packed"):
            cut[k] = v[:, :I // 8].contiguous()
        elif k.endswith("down_proj.weight_shape"):
            cut[k] = torch.tensor([H, I])
        else:
            cut[k] = v
    d = tmp_path / "cut"
    d.mkdir()
    save_file(cut, str(d / "model.safetensors"))
    (d / "config.json").write_text((full / "config.json").read_text())
    moe = load_w4a8_checkpoint(d).moe_layers[LAYER]
    assert moe.intermediate_size == 64 and moe.tp_shard.tail == 16
    x, logits = inputs(E, H)
    ref = expected_layer(p1, p3, p2, G, moe_routing_from_config(QWEN))
    assert torch.equal(moe(x, logits), ref(x, logits))


def test_tensor_parallel_shards_sum_to_the_layer(tmp_path, seed):
    """Loading rank r of TP=world in one process: the shards' outputs sum to the TP=1 output
    (up to the per-rank fp8 quantization of the intermediate activations)."""
    E, H, I, G = 4, 128, 192, 64
    w1, w3, w2 = bf16_experts(E=E, H=H, I=I, seed=seed)
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=G, config=QWEN)
    x, logits = inputs(E, H, T=16, seed=seed + 1)
    y1 = load_w4a8_checkpoint(path).moe_layers[LAYER](x, logits).double()
    exact = dense_reference(x, logits, dequant(w1, G), dequant(w3, G), dequant(w2, G),
                            moe_routing_from_config(QWEN))
    for world in (2, 4, 5):
        shards = [load_w4a8_checkpoint(path, tp_rank=r, tp_size=world).moe_layers[LAYER] for r in range(world)]
        assert sum(s.tp_shard.end - s.tp_shard.start for s in shards) == I
        y = sum(s(x, logits).double() for s in shards)
        assert rel_error(y, y1) < 0.05, world
        assert rel_error(y, exact) < 1.2 * rel_error(y1, exact) + 0.01, world


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------
def _config(**changes):
    cfg = {"quantization_config": quantization_config_dict(128)}
    grp = cfg["quantization_config"]["config_groups"]["group_0"]
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            grp[section][key] = value
        elif section in ("format", "quant_method", "quantization_status"):
            cfg["quantization_config"][section] = value
        else:
            grp[section] = value
    return cfg


@pytest.mark.parametrize("changes,found", [
    ({"weights__num_bits": 8}, "weights.num_bits=8"),
    ({"weights__symmetric": False}, "weights.symmetric=False"),
    ({"weights__strategy": "channel"}, "weights.strategy='channel'"),
    ({"weights__type": "float"}, "weights.type='float'"),
    ({"weights__group_size": 16}, "weights.group_size=16"),
    ({"weights__actorder": "group"}, "weights.actorder='group'"),
    ({"input_activations__dynamic": False}, "input_activations.dynamic=False"),
    ({"input_activations__strategy": "tensor"}, "input_activations.strategy='tensor'"),
    ({"input_activations__type": "int"}, "input_activations.type='int'"),
    ({"input_activations__num_bits": 4}, "input_activations.num_bits=4"),
    ({"input_activations": None}, "input_activations=None"),
    ({"format": "float-quantized"}, "format='float-quantized'"),
    ({"quant_method": "fp8"}, "quant_method='fp8'"),
    ({"quantization_status": "frozen"}, "quantization_status='frozen'"),
])
def test_non_w4a8_configs_are_refused_with_what_was_found(changes, found):
    with pytest.raises(W4A8CheckpointError) as err:
        parse_quantization_config(_config(**changes), [f"{LAYER}.experts.0.gate_proj"])
    assert found in str(err.value)


def test_config_group_selection_by_target():
    cfg = _config()
    groups = cfg["quantization_config"]["config_groups"]
    groups["group_0"]["targets"] = ["re:.*experts.*"]
    groups["group_1"] = copy.deepcopy(groups["group_0"])
    groups["group_1"]["targets"] = ["re:.*self_attn.*"]
    groups["group_1"]["weights"]["num_bits"] = 8            # attention in another scheme: fine
    assert parse_quantization_config(cfg, [f"{LAYER}.experts.0.gate_proj"]).group_size == 128
    with pytest.raises(W4A8CheckpointError, match="group_1"):
        parse_quantization_config(cfg)                     # without module names every group counts
    cfg["quantization_config"]["ignore"] = ["re:.*experts.*"]
    with pytest.raises(W4A8CheckpointError, match="ignore"):
        parse_quantization_config(cfg, [f"{LAYER}.experts.0.gate_proj"])
    with pytest.raises(W4A8CheckpointError, match="no quantization_config"):
        parse_quantization_config({"model_type": "qwen3_moe"})


def test_bad_checkpoints_are_refused(tmp_path):
    w1, w3, w2 = bf16_experts(E=3, H=128, I=64)
    base = save_w4a8_checkpoint(tmp_path / "base", {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN)
    tensors = load_file(str(base / "model.safetensors"))
    cfg = (base / "config.json").read_text()

    def write(name, state, config=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(config)
        return d

    missing = {k: v for k, v in tensors.items() if ".experts.1." not in k}
    with pytest.raises(W4A8CheckpointError, match=r"experts \[1\] are missing"):
        load_w4a8_checkpoint(write("missing", missing))
    bad_shape = dict(tensors)
    bad_shape[f"{LAYER}.experts.0.gate_proj.weight_shape"] = torch.tensor([64, 256])
    with pytest.raises(W4A8CheckpointError, match="weight_shape"):
        load_w4a8_checkpoint(write("shape", bad_shape))
    zp = dict(tensors)
    zp[f"{LAYER}.experts.0.gate_proj.weight_zero_point"] = torch.zeros(64, 2, dtype=torch.int8)
    with pytest.raises(W4A8CheckpointError, match="asymmetric"):
        load_w4a8_checkpoint(write("zp", zp))
    wrong_group = json.loads(cfg)
    wrong_group["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    with pytest.raises(W4A8CheckpointError, match="weight_scale has shape"):
        load_w4a8_checkpoint(write("group", tensors, json.dumps(wrong_group)))
    with pytest.raises(W4A8CheckpointError, match="no expert tensors"):
        load_w4a8_checkpoint(write("none", {"lm_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(W4A8CheckpointError, match="config.json"):
        load_w4a8_checkpoint(tmp_path / "nowhere")
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:      # the base still loads
        assert f.get_tensor(f"{LAYER}.experts.0.gate_proj.weight_packed").dtype == torch.int32


# ------------------------------------------------------------------------------------------------
# int-quantized, file errors, key spellings in messages
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["per_expert", "stacked_projections"])
def test_int_quantized_loads_the_same_layer_as_pack_quantized(tmp_path, layout, seed):
    """llm-compressor's default W4AFP8 format stores each q in [-8, 7] in an int8 `weight`; it
    loads into the same int4 words as pack-quantized, bit for bit."""
    w1, w3, w2 = bf16_experts(E=3, H=128, I=96, seed=seed)
    packed = save_w4a8_checkpoint(tmp_path / "pack", {LAYER: (w1, w3, w2)}, group_size=32, config=QWEN)
    ints = save_w4a8_checkpoint(tmp_path / "int", {LAYER: (w1, w3, w2)}, group_size=32, config=QWEN,
                                format="int-quantized")
    t = load_file(str(ints / "model.safetensors"))
    q = t[f"{LAYER}.experts.1.down_proj.weight"]
    assert q.dtype == torch.int8 and tuple(q.shape) == (128, 96) and q.min() >= -8 and q.max() <= 7
    assert json.loads((ints / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    if layout == "stacked_projections":
        stacked = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for f in ("weight", "weight_scale"):
                stacked[f"{LAYER}.experts.{proj}.{f}"] = torch.stack([t[f"{LAYER}.experts.{e}.{proj}.{f}"]
                                                                      for e in range(3)])
        save_file(stacked, str(ints / "model.safetensors"))
    a, b = load_w4a8_checkpoint(packed).moe_layers[LAYER], load_w4a8_checkpoint(ints).moe_layers[LAYER]
    for name, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], v), name
    bad = dict(t)
    bad[f"{LAYER}.experts.0.gate_proj.weight"] = bad[f"{LAYER}.experts.0.gate_proj.weight"] * 2
    save_file(bad, str(ints / "model.safetensors"))
    with pytest.raises(W4A8CheckpointError, match=r"experts.0.gate_proj.weight holds values in \[-16"):
        load_w4a8_checkpoint(ints)


def test_errors_name_keys_in_the_files_own_spelling(tmp_path):
    w1, w3, w2 = bf16_experts(E=2, H=128, I=64)
    base = save_w4a8_checkpoint(tmp_path / "base", {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN)
    t = load_file(str(base / "model.safetensors"))
    mixtral = {k.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2"): v
               for k, v in t.items() if "experts.1.gate_proj.weight_packed" not in k}
    d = tmp_path / "mixtral"
    d.mkdir()
    save_file(mixtral, str(d / "model.safetensors"))
    (d / "config.json").write_text((base / "config.json").read_text())
    with pytest.raises(W4A8CheckpointError) as err:
        load_w4a8_checkpoint(d)
    assert f"{LAYER}.experts.1.w1.weight_packed" in str(err.value) and ".gate." not in str(err.value)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    w1, w3, w2 = bf16_experts(E=2, H=128, I=64)
    good = save_w4a8_checkpoint(tmp_path / "good", {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN,
                                max_shard_bytes=20_000)
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    import shutil

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d
    cases = [
        (variant("json", lambda d: (d / "config.json").write_text('{"model_type": ')), "config.json", "JSON"),
        (variant("list", lambda d: (d / "config.json").write_text("[1]")), "config.json", "object"),
        (variant("nomap", lambda d: (d / "model.safetensors.index.json").write_text("{}")),
         "model.safetensors.index.json", "weight_map"),
        (variant("shard", lambda d: (d / shard).unlink()), "model.safetensors.index.json", shard),
        (variant("cut", lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:-100])), shard, "safetensors"),
    ]
    for d, file, what in cases:
        with pytest.raises(W4A8CheckpointError) as err:
            load_w4a8_checkpoint(d)
        assert str(d / file) in str(err.value) and what in str(err.value), (d.name, str(err.value))


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_an_all_zero_expert_in_the_file_loads(tmp_path, layout, seed):
    """A pruned (all-zero) expert is a value the file holds, not an unloaded layer: it loads, and
    the layer equals from_float of the same weights."""
    w1, w3, w2 = bf16_experts(E=4, H=128, I=64, seed=seed)
    for w in (w1, w3, w2):
        w[1] = 0
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN, layout=layout)
    moe = load_w4a8_checkpoint(path).moe_layers[LAYER]
    ref = expected_layer(w1, w3, w2, 64, moe_routing_from_config(QWEN))
    x, logits = inputs(4, 128, seed=seed + 1)
    assert torch.equal(moe(x, logits), ref(x, logits))


def test_stacked_keys_are_named_in_their_own_spelling(tmp_path):
    w1, w3, w2 = bf16_experts(E=2, H=128, I=64)
    path = save_w4a8_checkpoint(tmp_path, {LAYER: (w1, w3, w2)}, group_size=64, config=QWEN, layout="stacked")
    t = load_file(str(path / "model.safetensors"))
    key = f"{LAYER}.experts.w2_weight_scale"
    t[key][1, 3, 0] = float("nan")
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(W4A8CheckpointError, match=rf"{re.escape(key)} holds 1 NaN or infinite group "
                                                  rf"scale\(s\), the first at \[expert, row, group\] = \[1, 3, 0\]"):
        load_w4a8_checkpoint(path)


def test_rewriting_a_checkpoint_folder_replaces_its_weight_files(tmp_path, seed):
    """Shards then a single file into the same folder (and back): only the newest checkpoint is read."""
    old = bf16_experts(E=2, H=128, I=64, seed=seed)
    new = bf16_experts(E=2, H=128, I=64, seed=seed + 1)
    save_w4a8_checkpoint(tmp_path, {LAYER: old}, group_size=64, config=QWEN, max_shard_bytes=40_000)
    save_w4a8_checkpoint(tmp_path, {LAYER: new}, group_size=64, config=QWEN)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    x, logits = inputs(2, 128, seed=seed)
    ref = expected_layer(*new, 64, moe_routing_from_config(QWEN))
    assert torch.equal(load_w4a8_checkpoint(tmp_path).moe_layers[LAYER](x, logits), ref(x, logits))
    save_w4a8_checkpoint(tmp_path, {LAYER: old}, group_size=64, config=QWEN, max_shard_bytes=40_000)
    assert not (tmp_path / "model.safetensors").exists()
    ref = expected_layer(*old, 64, moe_routing_from_config(QWEN))
    assert torch.equal(load_w4a8_checkpoint(tmp_path).moe_layers[LAYER](x, logits), ref(x, logits))
