"""Tensor parallel W4A8 MoE: the shard math (groups cut by rank boundaries, zero padding to whole
groups), 2 gloo processes on CPU equal to TP=1 (eager, compiled, and a transformers model through
patch_moe), GLM-4.6 TP8 per-rank sizes (I per rank = 192) in 8 processes, and NCCL on 2 GPUs."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from inductor_w4a8 import formats, reference
from inductor_w4a8.moe import W4A8MoE
from inductor_w4a8.testing import rel_error
from inductor_w4a8.moe_builder import shard_w4a8_moe, tensor_parallel_moe
from inductor_w4a8.tp import TensorParallelW4A8MoE, intermediate_shard, shard_expert_weights
from inductor_w4a8.weights import load_w4a8_checkpoint, save_w4a8_checkpoint

LAYER = "model.layers.0.mlp"
# GLM-4.6 routing and intermediate size; E and H cut down so that 8 CPU processes stay quick
GLM_SMALL = dict(E=16, top_k=4, H=256, I=1536, G=128, scoring="sigmoid", n_group=4, topk_group=2,
                 routed_scaling_factor=2.5)
GLM_CONFIG = {"model_type": "glm4_moe", "num_experts_per_tok": 4, "norm_topk_prob": True, "n_group": 4,
              "topk_group": 2, "routed_scaling_factor": 2.5}


def bf16_experts(E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)
                 for shape in ((E, I, H), (E, I, H), (E, H, I)))


def checkpoint_layer(E=4, top_k=2, H=128, I=192, G=64, seed=0, **routing) -> W4A8MoE:
    w1, w3, w2 = bf16_experts(E, H, I, seed)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(seed + 1)) * 0.1 \
        if routing.get("scoring") == "sigmoid" else None
    return W4A8MoE.from_float(w1, w3, w2, top_k=top_k, group_size=G, e_score_correction_bias=bias, **routing)


def processed_copy(layer: W4A8MoE) -> W4A8MoE:
    return shard_w4a8_moe(layer, 0, 1, process=True)


def inputs(E, H, T=16, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, generator=g).to(torch.bfloat16).to(device),
            torch.randn(T, E, generator=g).to(device))


def dense(x, logits, w13, w2, layer):
    """fp64 MoE of dequantized weights w13 [E, 2I, H], w2 [E, H, I] with exact activations."""
    w, ids = reference.select_experts(logits, layer.e_score_correction_bias, layer.top_k, layer.scoring,
                                      layer.renormalize, layer.n_group or 0, layer.topk_group or 0,
                                      layer.routed_scaling_factor)
    I = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            out[t] += float(w[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def dequant(packed, scale, G):
    return formats.dequantize_w4(formats.unpack_int4(packed, biased=True), scale, G)


# ------------------------------------------------------------------------------------------------
# Shard math (one process)
# ------------------------------------------------------------------------------------------------
def test_glm46_shard_table():
    """GLM-4.6 (I = 1536, G = 128): TP2/TP4 split on group boundaries; TP8 (192 per rank) pads
    every rank to 256 = 2 whole groups, with the shared group's scale on both sides."""
    assert [intermediate_shard(1536, 128, r, 4).local_size for r in range(4)] == [384] * 4
    assert not any(intermediate_shard(1536, 128, r, 4).padded for r in range(4))
    tp8 = [intermediate_shard(1536, 128, r, 8) for r in range(8)]
    assert [(s.start, s.end) for s in tp8] == [(192 * r, 192 * (r + 1)) for r in range(8)]
    assert [s.local_size for s in tp8] == [256] * 8
    assert [(s.lead, s.tail) for s in tp8] == [(0, 64), (64, 0)] * 4
    assert [s.local_start // 128 for s in tp8] == [0, 1, 3, 4, 6, 7, 9, 10]
    with pytest.raises(ValueError, match="no channel"):
        intermediate_shard(4, 32, 0, 8)
    with pytest.raises(ValueError, match="group_size"):
        intermediate_shard(1536, 96, 0, 2)


@pytest.mark.parametrize("I,G,world", [(192, 64, 2), (192, 64, 3), (1536, 128, 8), (96, 32, 5), (200, 32, 3)])
def test_shards_hold_exactly_their_channels(I, G, world, seed):
    """Each rank's dequantized w13 rows / w2 columns are the global ones for its channels and zero
    elsewhere; its w2 scales are the global group scales; the fp64 MoE of the shards sums to the
    fp64 MoE of the whole layer."""
    E, H = 2, 128
    w1, w3, w2 = bf16_experts(E, H, -(-I // 8) * 8, seed=seed)
    w1, w3, w2 = w1[:, :I], w3[:, :I], w2[:, :, :I]
    Ip = -(-I // G) * G                                        # quantize as a padded writer would
    pad = torch.nn.functional.pad
    w13p, w13s = formats.quantize_w4(torch.cat([w1, w3], 1), G)
    w2p_full, w2s = formats.quantize_w4(pad(w2, (0, Ip - I)), G)
    w2p = w2p_full[..., :-(-I // 8)].contiguous()                  # ceil(I / 8) words, ceil(I / G) groups
    W13, W2 = dequant(w13p, w13s, G), dequant(w2p_full, w2s, G)[..., :I]
    layer = checkpoint_layer(E=E, top_k=1, H=H, I=Ip, G=G)
    x, logits = inputs(E, H, T=5, seed=seed + 1)
    total = torch.zeros(5, H, dtype=torch.float64)
    for r in range(world):
        s = intermediate_shard(I, G, r, world)
        p13, s13, p2, s2 = shard_expert_weights(w13p, w13s, w2p, w2s, s)
        assert p13.shape == (E, 2 * s.local_size, H // 8) and s13.shape == (E, 2 * s.local_size, H // G)
        assert p2.shape == (E, H, s.local_size // 8) and s2.shape == (E, H, s.local_size // G)
        L13, L2 = dequant(p13, s13, G), dequant(p2, s2, G)
        own = slice(s.lead, s.lead + s.end - s.start)
        for half in range(2):
            rows = L13[:, half * s.local_size:(half + 1) * s.local_size]
            assert torch.equal(rows[:, own], W13[:, half * I + s.start:half * I + s.end])
            assert not rows[:, :s.lead].any() and not rows[:, s.lead + s.end - s.start:].any()
        assert torch.equal(L2[..., own], W2[..., s.start:s.end])
        assert not L2[..., :s.lead].any() and not L2[..., s.lead + s.end - s.start:].any()
        g0, g1 = s.local_start // G, s.local_end // G
        assert torch.equal(s2[..., :min(g1, w2s.shape[-1]) - g0], w2s[..., g0:g1])   # global scales
        total += dense(x, logits, L13, L2, layer)
    whole = dense(x, logits, W13, W2, layer)
    assert torch.allclose(total, whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("world", [2, 8])
def test_sharded_layers_sum_to_tp1(world, seed):
    """In one process: the W4A8 shards (post-processed, real ops) sum to the TP=1 layer up to the
    per-rank fp8 activation scales, and are no less accurate against the exact fp64 MoE."""
    cfg = GLM_SMALL if world == 8 else dict(E=4, top_k=2, H=128, I=192, G=64, scoring="softmax",
                                            n_group=None, topk_group=None, routed_scaling_factor=1.0)
    layer = checkpoint_layer(**{k: v for k, v in cfg.items() if k not in ("E", "H", "I", "G", "top_k")},
                             E=cfg["E"], top_k=cfg["top_k"], H=cfg["H"], I=cfg["I"], G=cfg["G"], seed=seed)
    x, logits = inputs(cfg["E"], cfg["H"], T=24, seed=seed + 2)
    exact = dense(x, logits, dequant(layer.w13_weight_packed, layer.w13_weight_scale, cfg["G"]),
                  dequant(layer.w2_weight_packed, layer.w2_weight_scale, cfg["G"]), layer)
    y1 = processed_copy(layer)(x, logits).double()
    shards = [shard_w4a8_moe(layer, r, world, process=True) for r in range(world)]
    if world == 8:
        assert {s.intermediate_size for s in shards} == {256}
    y = sum(s(x, logits).double() for s in shards)
    print(f"TP{world} vs TP1 rel {rel_error(y, y1):.4f}; vs exact: TP{world} {rel_error(y, exact):.4f}, "
          f"TP1 {rel_error(y1, exact):.4f}")
    assert rel_error(y, y1) < 0.05
    assert rel_error(y, exact) < 1.2 * rel_error(y1, exact) + 0.005


def test_shard_refuses_processed_layers():
    layer = processed_copy(checkpoint_layer())
    with pytest.raises(ValueError, match="before process_weights_after_loading"):
        shard_w4a8_moe(layer, 0, 2)


# ------------------------------------------------------------------------------------------------
# Several processes (gloo on CPU, NCCL on GPUs)
# ------------------------------------------------------------------------------------------------
def _init(rank, world, init_file, backend="gloo"):
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)


def _worker_tp2(rank, world, init_file, out_dir):
    torch.manual_seed(0)
    _init(rank, world, init_file)
    try:
        layer = checkpoint_layer(E=4, top_k=2, H=128, I=192, G=64)
        tp = tensor_parallel_moe(layer)
        x, logits = inputs(4, 128, T=16)
        with torch.no_grad():
            y = tp(x, logits)
            compiled = torch.compile(tp, backend="w4a8", fullgraph=True)(x, logits)
        result = {"y": y, "compiled": compiled, "local_size": tp.local.intermediate_size}
        try:
            import transformers  # noqa: F401
            result["hf"] = _hf_logits(dist.group.WORLD)
        except ImportError:
            pass
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _tiny_qwen3():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, moe_intermediate_size=96,
                                      intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True, max_position_embeddings=64)
    return transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()


def _hf_logits(group):
    from inductor_w4a8 import patch_moe
    model = _tiny_qwen3()
    patch_moe(model, group_size=32, process_group=group)
    with torch.no_grad():
        return model(torch.arange(12).reshape(1, 12)).logits


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        out = os.path.join(d, "out")
        os.makedirs(out)
        mp.spawn(fn, args=(world, init_file, out) + args, nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def test_gloo_tp2_equals_tp1():
    results = _spawn(_worker_tp2, 2)
    layer = checkpoint_layer(E=4, top_k=2, H=128, I=192, G=64)
    x, logits = inputs(4, 128, T=16)
    y1 = processed_copy(layer)(x, logits)
    local = sum(shard_w4a8_moe(layer, r, 2, process=True)(x, logits).float() for r in range(2))
    for r, res in enumerate(results):
        assert res["local_size"] == 128                          # 96 channels + 32 zeros (G = 64)
        assert torch.equal(res["y"], results[0]["y"])            # every rank holds the full sum
        assert torch.allclose(res["y"].float(), local, rtol=0, atol=1e-2 * local.abs().max().item())
        assert torch.equal(res["compiled"], res["y"])
    print(f"gloo TP2 vs TP1 rel {rel_error(results[0]['y'], y1):.4f}")
    assert rel_error(results[0]["y"], y1) < 0.05
    if "hf" in results[0]:
        from inductor_w4a8 import patch_moe
        model = _tiny_qwen3()
        patch_moe(model, group_size=32)
        with torch.no_grad():
            ref = model(torch.arange(12).reshape(1, 12)).logits
        cos = torch.nn.functional.cosine_similarity(results[0]["hf"].float().flatten(), ref.float().flatten(), dim=0)
        print(f"transformers Qwen3-MoE patched at TP2 vs TP1: logits cosine {cos.item():.6f}")
        assert cos > 0.9999 and torch.equal(results[0]["hf"], results[1]["hf"])
        assert (results[0]["hf"].argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def _worker_glm_tp8(rank, world, init_file, out_dir, ckpt):
    _init(rank, world, init_file)
    try:
        moe = load_w4a8_checkpoint(ckpt, tp_rank=rank, tp_size=world).moe_layers[LAYER]
        tp = TensorParallelW4A8MoE(moe)
        x, logits = inputs(GLM_SMALL["E"], GLM_SMALL["H"], T=24)
        with torch.no_grad():
            y = tp(x, logits)
        s = moe.tp_shard
        torch.save({"y": y, "shard": (s.start, s.end, s.local_start, s.local_end, moe.intermediate_size)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_glm46_tp8_sizes(tmp_path):
    """GLM-4.6's TP8 split (I per rank = 192, G = 128) in 8 processes, loaded from a checkpoint
    rank by rank: every rank runs I_local = 256 (192 + 64 zero channels) and the all-reduced
    output equals TP=1."""
    c = GLM_SMALL
    w1, w3, w2 = bf16_experts(c["E"], c["H"], c["I"])
    bias = torch.randn(c["E"], generator=torch.Generator().manual_seed(5)) * 0.1
    ckpt = save_w4a8_checkpoint(tmp_path / "ckpt", {LAYER: (w1, w3, w2)}, group_size=c["G"], config=GLM_CONFIG,
                                tensors={f"{LAYER}.gate.e_score_correction_bias": bias})
    results = _spawn(_worker_glm_tp8, 8, str(ckpt))
    assert [r["shard"] for r in results] == [
        (192 * r, 192 * (r + 1), 192 * r // 128 * 128, -(-192 * (r + 1) // 128) * 128, 256) for r in range(8)]
    tp1 = load_w4a8_checkpoint(ckpt).moe_layers[LAYER]
    x, logits = inputs(c["E"], c["H"], T=24)
    y1 = tp1(x, logits)
    print(f"gloo GLM-4.6-sized TP8 vs TP1 rel {rel_error(results[0]['y'], y1):.4f}")
    assert rel_error(results[0]["y"], y1) < 0.05
    assert all(torch.equal(r["y"], results[0]["y"]) for r in results)


GLM46_TOKENS = (1, 513, 8192)


def _worker_glm46_cuda(rank, world, init_file, out_dir, backend):
    """The full GLM-4.6 layer sharded over `world` ranks on the GPU(s), one process per rank.
    With more ranks than GPUs the all-reduce must be gloo's (of CUDA tensors): NCCL refuses two
    ranks on one GPU. The GEMMs are our kernels on each rank's GPU either way."""
    torch.cuda.set_device(rank % torch.cuda.device_count())
    _init(rank, world, init_file, backend=backend)
    try:
        from compile_utils import GLM, random_checkpoint_
        layer = random_checkpoint_(W4A8MoE(**GLM, device="cpu"), seed=0)
        tp = tensor_parallel_moe(layer, device="cuda")
        shard = tp.local.tp_shard
        res = {"local_size": tp.local.intermediate_size, "shard": (shard.start, shard.end)}
        for T in GLM46_TOKENS:
            x, logits = inputs(GLM["num_experts"], GLM["hidden_size"], T=T, device="cuda")
            with torch.no_grad():
                res[T] = tp(x, logits).cpu()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _glm46_shards_on_cuda(world):
    """The same GLM-4.6 layer's rank shards, post-processed, in this process."""
    from compile_utils import GLM, random_checkpoint_
    layer = random_checkpoint_(W4A8MoE(**GLM, device="cpu"), seed=0)
    return [shard_w4a8_moe(layer, r, world, device="cuda", process=True) for r in range(world)]


def _glm46_inputs(T):
    from compile_utils import GLM
    return inputs(GLM["num_experts"], GLM["hidden_size"], T=T, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_nccl_tp2_glm46_equals_tp1():
    results = _spawn(_worker_glm46_cuda, 2, "nccl")
    assert [r["local_size"] for r in results] == [768, 768]
    (tp1,), tp8 = _glm46_shards_on_cuda(1), _glm46_shards_on_cuda(8)
    assert {s.intermediate_size for s in tp8} == {256}
    for T in GLM46_TOKENS:
        x, logits = _glm46_inputs(T)
        with torch.no_grad():
            y1 = tp1(x, logits).cpu()
            y8 = sum(s(x, logits).float() for s in tp8).cpu()
        assert torch.equal(results[0][T], results[1][T])
        print(f"NCCL TP2 vs TP1 at T={T}: rel {rel_error(results[0][T], y1):.4f}; "
              f"TP8 shards vs TP1 {rel_error(y8, y1):.4f}")
        assert rel_error(results[0][T], y1) < 0.05
        assert rel_error(y8, y1) < 0.05


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_glm46_tp8_one_process_per_rank():
    """GLM-4.6 at TP8 (I per rank = 192, G = 128: the size the system we replace refuses), one
    process per rank on the GPU(s): every rank runs I_local = 256 (192 + 64 zero channels), all
    ranks hold the same sum, and it equals TP=1."""
    results = _spawn(_worker_glm46_cuda, 8, "gloo")
    assert [r["local_size"] for r in results] == [256] * 8
    assert [r["shard"] for r in results] == [(192 * r, 192 * (r + 1)) for r in range(8)]
    (tp1,) = _glm46_shards_on_cuda(1)
    for T in GLM46_TOKENS:
        x, logits = _glm46_inputs(T)
        with torch.no_grad():
            y1 = tp1(x, logits).cpu()
        assert all(torch.equal(r[T], results[0][T]) for r in results)
        print(f"GLM-4.6 TP8 ({torch.cuda.device_count()} GPU(s), gloo all-reduce) vs TP1 at T={T}: "
              f"rel {rel_error(results[0][T], y1):.4f}")
        assert rel_error(results[0][T], y1) < 0.05
