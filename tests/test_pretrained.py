"""from_pretrained on checkpoints written by llm-compressor (oneshot W4AFP8, both formats, attention
quantized and not) for Qwen3-MoE, Mixtral, Qwen2-MoE, DeepSeek-V3 and GLM-4-MoE: logits and greedy
tokens against the model of the checkpoint dequantized by compressed-tensors, each W4A8 layer
against an fp64 oracle, compiled generate(), several config groups, refusals of bad files and
schemes, tensor parallel in 2 gloo processes, and (GPU) eager, compiled and CUDA-graph runs of a
checkpoint written by our own writer."""
import json
import sys
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import inductor_w4a8 as w4a8
from inductor_w4a8 import formats, reference
from inductor_w4a8.hf import W4A8SparseMoeBlock
from inductor_w4a8.model_writer import save_w4a8_model
from inductor_w4a8.testing import rel_error
from inductor_w4a8.weights import W4A8CheckpointError, load_w4a8_checkpoint

transformers = pytest.importorskip("transformers")
from pretrained_utils import (dequantized_reference, greedy, llm_compressor_checkpoint,  # noqa: E402
                              logits_metrics, prompts, tiny_model)

CASES = [("qwen3_moe", "pack-quantized", True), ("qwen3_moe", "int-quantized", True),
         ("qwen3_moe", "pack-quantized", False), ("qwen3_moe", "int-quantized", False),
         ("mixtral", "int-quantized", True), ("mixtral", "pack-quantized", False),
         ("qwen2_moe", "pack-quantized", True), ("deepseek_v3", "int-quantized", True),
         ("glm4_moe", "pack-quantized", True)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(kind, format, attention quantized) -> directory written by llm-compressor, made on first use."""
    pytest.importorskip("llmcompressor")
    made = {}

    def get(kind, fmt, attention):
        key = (kind, fmt, attention)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{kind}-{fmt}-{int(attention)}")
            made[key] = llm_compressor_checkpoint(tiny_model(kind), path, fmt, attention)
        return made[key]
    return get


@pytest.mark.parametrize("kind,fmt,attention", CASES)
def test_llm_compressor_checkpoint_matches_the_dequantized_model(checkpoints, kind, fmt, attention):
    path = checkpoints(kind, fmt, attention)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == fmt
    model = w4a8.from_pretrained(path)
    ref = dequantized_reference(path)
    blocks = [m for m in model.modules() if isinstance(m, W4A8SparseMoeBlock)]
    linears = [m for m in model.modules() if isinstance(m, w4a8.W4A8Linear)]
    assert blocks and all(b.experts.weights_processed for b in blocks)
    assert bool(linears) == attention
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    ids = prompts()
    with torch.no_grad():
        cos, top1 = logits_metrics(ref(ids).logits, model(ids).logits)
    same = (greedy(ref, ids[:, :6]) == greedy(model, ids[:, :6])).float().mean().item()
    print(f"{kind} {fmt} attention={'W4A8' if attention else 'bf16'}: logits cosine {cos:.5f}, "
          f"top-1 {top1:.3f}, greedy tokens equal {same:.3f}")
    assert cos > 0.995
    assert top1 >= 0.85
    assert same >= 0.5


@pytest.mark.parametrize("kind,fmt", [("qwen3_moe", "pack-quantized"), ("deepseek_v3", "int-quantized")])
def test_every_w4a8_layer_against_an_fp64_oracle(checkpoints, kind, fmt, seed):
    """Each MoE block and W4A8 linear, fed random tokens, against fp64 math (fp8 activations in the
    oracle too): on the int4 and bf16 scales the layer holds (the kernels' own error), and on the
    weights compressed-tensors dequantizes from the same file with its fp32 scales."""
    path = checkpoints(kind, fmt, True)
    model = w4a8.from_pretrained(path)
    ref = dequantized_reference(path, torch.float64)
    ref_modules = dict(ref.named_modules())
    held = load_w4a8_checkpoint(path, process=False).moe_layers
    g = torch.Generator().manual_seed(seed)
    worst = {"moe": 0.0, "moe vs ct": 0.0, "weights vs ct": 0.0, "linear": 0.0}
    for name, m in model.named_modules():
        if isinstance(m, W4A8SparseMoeBlock):
            moe, experts, ckpt = m.experts, ref_modules[name].experts, held[name]
            G = moe.group_size
            x = torch.randn(9, moe.hidden_size, generator=g).to(torch.bfloat16)
            logits = torch.randn(9, moe.num_experts, generator=g)
            routing = dict(top_k=moe.top_k, group_size=G, scoring=moe.scoring, renormalize=moe.renormalize,
                           n_group=moe.n_group or 0, topk_group=moe.topk_group or 0,
                           routed_scaling_factor=moe.routed_scaling_factor,
                           correction_bias=moe.e_score_correction_bias)
            q13 = formats.unpack_int4(ckpt.w13_weight_packed, biased=True)
            q2 = formats.unpack_int4(ckpt.w2_weight_packed, biased=True)
            y = moe(x, logits)
            own = reference.moe_forward(x, logits, q13, ckpt.w13_weight_scale, q2, ckpt.w2_weight_scale, **routing)
            w13, w2 = experts.gate_up_proj, experts.down_proj

            def ones(w):
                return torch.ones(*w.shape[:2], w.shape[2] // G, dtype=torch.float64)
            ct = reference.moe_forward(x, logits, w13, ones(w13), w2, ones(w2), **routing)
            held13 = formats.dequantize_w4(q13, ckpt.w13_weight_scale, G, torch.float64)
            worst["weights vs ct"] = max(worst["weights vs ct"], rel_error(held13, w13))
            worst["moe"] = max(worst["moe"], rel_error(y, own))
            worst["moe vs ct"] = max(worst["moe vs ct"], rel_error(y, ct))
        elif isinstance(m, w4a8.W4A8Linear):
            x = torch.randn(7, m.in_features, generator=g).to(torch.bfloat16)
            xq, xs = formats.quantize_fp8_per_token(x)
            oracle = (xq.double() * xs.double()) @ ref_modules[name].weight.double().T
            if m.bias is not None:
                oracle = oracle + m.bias.double()
            worst["linear"] = max(worst["linear"], rel_error(m(x), oracle))
    print(f"{kind} {fmt}: worst normwise error vs fp64: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert 0 < worst["moe"] < 5e-3              # bf16 rounding of the GEMM outputs, summation order
    assert 0 < worst["linear"] < 5e-3           # bf16 output rounding
    # llm-compressor stores fp32 expert scales; the GEMM reads bf16 ones (one rounding, <= 2^-9) ...
    assert worst["weights vs ct"] < 2 ** -9
    # ... which moves a few fp8 roundings of the intermediate activations by one step
    assert worst["moe vs ct"] < 5e-2


def test_compiled_generate_matches_eager(checkpoints):
    path = checkpoints("qwen3_moe", "pack-quantized", True)
    model = w4a8.from_pretrained(path)
    ids = prompts(n=2, length=10)
    with torch.no_grad():
        eager = model(ids).logits
    want = greedy(model, ids[:, :6], new_tokens=6)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="w4a8", dynamic=True)
    with torch.no_grad():
        compiled = model(ids).logits
    cos, top1 = logits_metrics(eager, compiled)
    got = greedy(model, ids[:, :6], new_tokens=6)
    print(f"compiled vs eager: logits cosine {cos:.6f}, top-1 {top1:.3f}, greedy equal "
          f"{(got == want).float().mean().item():.3f}")
    assert cos > 0.9999 and top1 >= 0.95
    assert (got == want).float().mean() >= 0.9


# ------------------------------------------------------------------------------------------------
# Our writer: several config groups, sharded files, refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pack-quantized", "int-quantized"])
def test_several_config_groups_each_module_read_by_its_own(tmp_path, fmt):
    """Experts in group_0 (G = 128), attention in group_1 (G = 64): every module gets its group's
    group size; the logits follow the model of the dequantized checkpoint."""
    pytest.importorskip("compressed_tensors")
    bf16 = tiny_model("qwen3_moe")
    path = save_w4a8_model(bf16, tmp_path, group_size=128, attention_group_size=64, format=fmt,
                           max_shard_bytes=300_000)
    assert (path / "model.safetensors.index.json").exists()
    model = w4a8.from_pretrained(path)
    sizes = {type(m).__name__ + ":" + str(m.group_size) for m in model.modules()
             if isinstance(m, (w4a8.W4A8Linear, w4a8.W4A8MoE))}
    assert sizes == {"W4A8Linear:64", "W4A8MoE:128"}
    ids = prompts()
    with torch.no_grad():
        cos, top1 = logits_metrics(dequantized_reference(path)(ids).logits, model(ids).logits)
    print(f"our writer ({fmt}, 2 groups) vs the dequantized model: cosine {cos:.5f}, top-1 {top1:.3f}")
    assert cos > 0.995 and top1 >= 0.85


def _with_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_an_unsupported_scheme_is_refused_with_what_was_found(tmp_path, monkeypatch):
    """Refused from the config, before any layer is read or post-processed (kernels launched)."""
    path = save_w4a8_model(tiny_model("qwen3_moe"), tmp_path, attention_group_size=64)
    from inductor_w4a8 import pretrained

    def no_layer(*args, **kwargs):
        raise AssertionError("an MoE layer was built before the bad config group was refused")
    monkeypatch.setattr(pretrained, "build_w4a8_moe", no_layer)

    def int8_attention(cfg):
        group = cfg["quantization_config"]["config_groups"]["group_1"]
        group["weights"]["num_bits"] = 8
        group["input_activations"]["type"] = "int"
    _with_config(path, int8_attention)
    with pytest.raises(W4A8CheckpointError) as err:
        w4a8.from_pretrained(path)
    msg = str(err.value)
    assert "group_1" in msg and "self_attn" in msg and "weights.num_bits=8" in msg
    assert "input_activations.type='int'" in msg


def test_bad_files_name_the_file(tmp_path):
    good = save_w4a8_model(tiny_model("qwen3_moe"), tmp_path / "good", max_shard_bytes=300_000)
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]

    def copy(name):
        import shutil
        return Path(shutil.copytree(good, tmp_path / name))

    from pathlib import Path
    bad_json = copy("json")
    (bad_json / "config.json").write_text("{not json")
    no_map = copy("nomap")
    (no_map / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    missing = copy("missing")
    (missing / shard).unlink()
    truncated = copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:len(data) // 2])
    for d, file, what in ((bad_json, "config.json", "not valid JSON"),
                          (no_map, "model.safetensors.index.json", "weight_map"),
                          (missing, "model.safetensors.index.json", shard),
                          (truncated, shard, "safetensors")):
        with pytest.raises(W4A8CheckpointError) as err:
            w4a8.from_pretrained(d)
        assert str(d / file) in str(err.value) and what in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# Tensor parallel: 2 gloo processes
# ------------------------------------------------------------------------------------------------
def _tp_worker(rank, world, init_file, out_dir, path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = w4a8.from_pretrained(path, process_group=dist.group.WORLD)
        with torch.no_grad():
            logits = model(prompts(n=2, length=12)).logits
        local = model.model.layers[0].mlp.experts.local.intermediate_size
        torch.save({"logits": logits, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_from_pretrained_in_two_processes(tmp_path):
    path = save_w4a8_model(tiny_model("qwen3_moe"), tmp_path / "ckpt", group_size=64, attention_group_size=128)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        os.makedirs(out)
        mp.spawn(_tp_worker, args=(2, os.path.join(d, "init"), out, path), nprocs=2, join=True)
        results = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    with torch.no_grad():
        tp1 = w4a8.from_pretrained(path)(prompts(n=2, length=12)).logits
    assert [r["local"] for r in results] == [64, 64]
    assert torch.equal(results[0]["logits"], results[1]["logits"])
    cos, top1 = logits_metrics(tp1, results[0]["logits"])
    print(f"from_pretrained TP2 (gloo) vs TP1: logits cosine {cos:.6f}, top-1 {top1:.3f}")
    assert cos > 0.999 and top1 >= 0.9


# ------------------------------------------------------------------------------------------------
# GPU: a checkpoint written by our writer (no llm-compressor there)
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["qwen3_moe", "glm4_moe"])
def test_from_pretrained_generates_on_the_gpu_eager_compiled_and_graphed(tmp_path, kind):
    bf16 = tiny_model(kind)
    path = save_w4a8_model(bf16, tmp_path, attention_group_size=128)
    model = w4a8.from_pretrained(path, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    ids = prompts().cuda()
    with torch.no_grad():
        cos, top1 = logits_metrics(dequantized_reference(path).cuda()(ids).logits, model(ids).logits)
        eager = model(ids).logits
    # against the model of the dequantized checkpoint (the bf16 model also holds int4 rounding)
    print(f"GPU {kind}: vs the dequantized model cosine {cos:.5f}, top-1 {top1:.3f}")
    assert cos > 0.995 and top1 >= 0.85
    want = greedy(model, ids[:, :6], new_tokens=6)
    torch._dynamo.reset()
    forward = model.forward
    model.forward = torch.compile(forward, backend="w4a8", dynamic=True)
    with torch.no_grad():
        compiled = model(ids).logits
    got = greedy(model, ids[:, :6], new_tokens=6)
    ccos, _ = logits_metrics(eager, compiled)
    print(f"GPU {kind}: compiled vs eager cosine {ccos:.6f}, greedy equal {(got == want).float().mean().item():.3f}")
    assert ccos > 0.9999 and (got == want).float().mean() >= 0.9
    model.forward = forward
    block = next(m for m in model.modules() if isinstance(m, W4A8SparseMoeBlock))
    runner = w4a8.CUDAGraphRunner(block.experts, max_num_batched_tokens=64, progress=False)
    H, E = block.experts.hidden_size, block.experts.num_experts
    for T in (1, 7, 64, 100):
        x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        logits = torch.randn(T, E, device="cuda")
        with torch.no_grad():
            # padded to a capture size, the GEMM may pick another tile: equal up to summation order
            assert rel_error(runner(x, logits), block.experts(x, logits)) < 1e-2, T


@pytest.mark.parametrize("fmt", ["pack-quantized", "int-quantized"])
def test_dequantized_reference_without_compressed_tensors_is_the_same(tmp_path, fmt, monkeypatch):
    """The GPU machine has no compressed-tensors: the reference's fallback (formats' unpacking)
    gives bit for bit the model compressed-tensors' compressors give."""
    pytest.importorskip("compressed_tensors")
    path = save_w4a8_model(tiny_model("qwen3_moe"), tmp_path, attention_group_size=64, format=fmt)
    theirs = dequantized_reference(path).state_dict()
    for name in ("compressed_tensors", "compressed_tensors.compressors", "compressed_tensors.quantization"):
        monkeypatch.setitem(sys.modules, name, None)   # import now raises ImportError
    ours = dequantized_reference(path).state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("kwargs,match", [
    ({"scale_mode": "bogus"}, "scale_mode='bogus' is not supported"),
    ({"device": "foo"}, "device='foo' is not a device"),
    ({"device": "meta"}, "only cpu and cuda"),
    ({"process_group": object()}, "torch.distributed is not initialised"),
] + ([] if torch.cuda.is_available() else [({"device": "cuda"}, "sees no CUDA GPU")]))
def test_bad_arguments_refused_before_any_file_is_read(tmp_path, kwargs, match):
    """The path does not even exist: an argument error must come first, naming the argument."""
    with pytest.raises((w4a8.W4A8InputError, RuntimeError), match=match):
        w4a8.from_pretrained(tmp_path / "missing", **kwargs)


def test_writer_lists_attention_it_could_not_group_in_ignore(tmp_path):
    """o_proj's K (4 heads x 16 = 64) is not a multiple of the attention group size 128: it is
    written bf16 and named in the config's ignore, so from_pretrained reads the file as written."""
    from pretrained_utils import COMMON, SIZES
    from tiny_models import tiny_moe_model
    model = tiny_moe_model("qwen3_moe", COMMON, {"qwen3_moe": {**SIZES["qwen3_moe"], "head_dim": 16}})
    path = save_w4a8_model(model, tmp_path, attention_group_size=128)
    ignore = json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.self_attn.o_proj" in ignore and "model.layers.0.self_attn.q_proj" not in ignore
    loaded = w4a8.from_pretrained(path)
    attn = loaded.model.layers[0].self_attn
    assert isinstance(attn.q_proj, w4a8.W4A8Linear) and type(attn.o_proj) is torch.nn.Linear
    assert torch.equal(attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight)


def test_writer_refuses_a_model_that_is_already_w4a8(tmp_path):
    model = tiny_model("qwen3_moe")
    w4a8.patch_moe(model)
    with pytest.raises(ValueError, match="already W4A8.*pass the bf16 model"):
        save_w4a8_model(model, tmp_path)
    assert not any(tmp_path.iterdir())                       # nothing written


def test_an_fp32_checkpoint_loads_as_a_bf16_model(tmp_path):
    """Norms and embeddings stored fp32 are cast to the model's bf16 (as transformers does), so
    the W4A8 linears get bf16 activations; the experts' scales are bf16 by the writer."""
    model = tiny_model("qwen3_moe").float()
    path = save_w4a8_model(model, tmp_path, attention_group_size=64)
    loaded = w4a8.from_pretrained(path)
    assert {p.dtype for n, p in loaded.named_parameters() if p.is_floating_point() and "norm" in n} == {torch.bfloat16}
    ids = prompts()[:1, :6]
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
