"""transformers integration: patch_moe on tiny random Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3 and
GLM-4-MoE models (logits and greedy tokens against the bf16 model, eager and compiled with the
w4a8 backend), on transformers-4.x-style blocks (per-expert nn.Linear, (hidden, router_logits)
outputs, routers returning only their top-k), on fused variants, and refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inductor_w4a8 as w4a8
from inductor_w4a8.hf import W4A8SparseMoeBlock, expert_weights, find_moe_blocks
from tiny_models import greedy as _greedy
from tiny_models import logits_metrics, prompts, tiny_moe_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


SIZES = {
    "qwen3_moe": dict(head_dim=16, moe_intermediate_size=32, intermediate_size=64, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(moe_intermediate_size=32, intermediate_size=64, shared_expert_intermediate_size=64,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5),
    "glm4_moe": dict(head_dim=16, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                     n_shared_experts=1, routed_scaling_factor=2.5),
}


def tiny(kind):
    return tiny_moe_model(kind, COMMON, SIZES)


def greedy(model, ids, new_tokens=12):
    return _greedy(model, ids, new_tokens)


@pytest.mark.parametrize("kind,n_moe", [("qwen3_moe", 2), ("qwen2_moe", 2), ("mixtral", 2), ("deepseek_v3", 1),
                                        ("glm4_moe", 1)])
def test_patched_model_matches_bf16(kind, n_moe):
    model = tiny(kind)
    ref = copy.deepcopy(model)
    names = w4a8.patch_moe(model)
    assert len(names) == n_moe and all(isinstance(model.get_submodule(n), W4A8SparseMoeBlock) for n in names)
    block = model.get_submodule(names[0])
    assert isinstance(block.experts, w4a8.W4A8MoE) and block.experts.weights_processed
    if kind in ("deepseek_v3", "glm4_moe"):
        assert (block.experts.scoring, block.experts.n_group, block.experts.routed_scaling_factor) == ("sigmoid", 2, 2.5)
        assert block.shared_experts is not None
        assert torch.equal(block.experts.e_score_correction_bias, block.gate.e_score_correction_bias.float())
    if kind == "qwen2_moe":
        assert block.shared_expert is not None and block.shared_expert_gate is not None
        assert block.experts.renormalize is False
    ids = prompts()
    with torch.no_grad():
        cos, top1 = logits_metrics(ref(ids).logits, model(ids).logits)
    same = (greedy(ref, ids[:, :6]) == greedy(model, ids[:, :6])).float().mean().item()
    print(f"{kind}: logits cosine {cos:.5f}, top-1 agreement {top1:.3f}, greedy tokens equal {same:.3f}")
    assert cos > 0.999
    assert top1 >= 0.85
    assert same >= 0.5


def test_compiled_patched_model_generates():
    """torch.compile(backend="w4a8") of the patched model: the MoE block compiles with
    fullgraph=True, and the compiled forward gives the eager patched model's logits and, through
    generate(), its greedy tokens."""
    model = tiny("qwen3_moe")
    w4a8.patch_moe(model)
    ids = prompts(n=2, length=10)
    with torch.no_grad():
        block = model.model.layers[0].mlp
        h = torch.randn(2, 5, 64).to(torch.bfloat16)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(block, backend="w4a8", fullgraph=True)(h), block(h))
        eager = model(ids).logits
    want = greedy(model, ids[:, :6], new_tokens=6)
    model.forward = torch.compile(model.forward, backend="w4a8", dynamic=True)
    with torch.no_grad():
        compiled = model(ids).logits
    cos, top1 = logits_metrics(eager, compiled)
    print(f"compiled vs eager (patched): logits cosine {cos:.6f}, top-1 {top1:.3f}")
    assert cos > 0.9999 and top1 >= 0.95
    got = greedy(model, ids[:, :6], new_tokens=6)
    print(f"compiled generate: tokens equal to eager {(got == want).float().mean().item():.3f}")
    assert (got == want).float().mean() >= 0.9


# ------------------------------------------------------------------------------------------------
# transformers-4.x-style blocks, written out here (pip gives 5.x): per-expert nn.Linear experts
# ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, H, I, names=("gate_proj", "up_proj", "down_proj"), act=nn.SiLU()):
        super().__init__()
        setattr(self, names[0], nn.Linear(H, I, bias=False))
        setattr(self, names[1], nn.Linear(H, I, bias=False))
        setattr(self, names[2], nn.Linear(I, H, bias=False))
        self.names, self.act_fn = names, act

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


def _experts_loop(experts, x, weights, ids):
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            out[t] += weights[t, j].float() * experts[int(ids[t, j])](x[t:t + 1])[0].float()
    return out.to(x.dtype)


def _softmax_topk(gate, x, top_k, renormalize):
    """The 4.x sparse blocks' routing: fp32 softmax of the gate's logits, top-k, optional renorm."""
    router_logits = gate(x)
    w, ids = torch.topk(F.softmax(router_logits, dim=1, dtype=torch.float), top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return router_logits, w, ids


class MixtralBlock4x(nn.Module):
    """transformers 4.x MixtralSparseMoeBlock: nn.Linear gate, w1/w3/w2 experts, returns a pair."""

    def __init__(self, H=64, I=48, E=4, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([MLP(H, I, ("w1", "w3", "w2")) for _ in range(E)])

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits, w, ids = _softmax_topk(self.gate, x, self.top_k, renormalize=True)
        return _experts_loop(self.experts, x, w.to(x.dtype), ids).reshape(b, s, h), router_logits


class Qwen2Block4x(nn.Module):
    """transformers 4.x Qwen2MoeSparseMoeBlock: no renormalization, gated shared expert, pair."""

    def __init__(self, H=64, I=40, E=6, k=2):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = E, k, False
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([MLP(H, I) for _ in range(E)])
        self.shared_expert = MLP(H, 64)
        self.shared_expert_gate = nn.Linear(H, 1, bias=False)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits, w, ids = _softmax_topk(self.gate, x, self.top_k, renormalize=self.norm_topk_prob)
        y = _experts_loop(self.experts, x, w.to(x.dtype), ids)
        y = y + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(b, s, h), router_logits


class DeepseekRouter4x(nn.Module):
    """transformers 4.x DeepseekV3TopkRouter: returns (topk_indices, topk_weights) only."""

    def __init__(self, H=64, E=8, k=2, n_group=4, topk_group=2, scale=2.5):
        super().__init__()
        self.top_k, self.n_routed_experts, self.routed_scaling_factor = k, E, scale
        self.n_group, self.topk_group, self.norm_topk_prob = n_group, topk_group, True
        self.weight = nn.Parameter(torch.randn(E, H) * 0.1)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)

    def forward(self, hidden_states):
        x = hidden_states.view(-1, self.weight.shape[1])
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        E, G = self.n_routed_experts, self.n_group
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1)
        keep = keep.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
        ids = choice.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1)[1]
        w = scores.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        return ids, w


class DeepseekBlock4x(nn.Module):
    def __init__(self, H=64, I=32, E=8):
        super().__init__()
        self.gate = DeepseekRouter4x(H, E)
        self.experts = nn.ModuleList([MLP(H, I) for _ in range(E)])
        self.shared_experts = MLP(H, 32)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        ids, w = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        return _experts_loop(self.experts, x, w, ids).view(*shape) + self.shared_experts(hidden_states)


class Holder(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block


@pytest.mark.parametrize("cls,pair", [(MixtralBlock4x, True), (Qwen2Block4x, True), (DeepseekBlock4x, False)])
def test_transformers_4x_style_blocks(cls, pair):
    torch.manual_seed(0)
    model = Holder(cls()).to(torch.bfloat16)
    ref = copy.deepcopy(model.mlp)
    assert w4a8.patch_moe(model) == ["mlp"]
    block = model.mlp
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    with torch.no_grad():
        want, got = ref(x), block(x)
    assert isinstance(got, tuple) == pair
    if pair:
        assert torch.equal(got[1], want[1])                     # the router logits, untouched
        want, got = want[0], got[0]
    assert got.shape == want.shape == x.shape and got.dtype == torch.bfloat16
    cos = F.cosine_similarity(got.float().flatten(), want.float().flatten(), dim=0).item()
    print(f"{cls.__name__}: cosine to the bf16 block {cos:.5f} (router mode {block.router_mode})")
    assert cos > 0.98
    assert block.router_mode == ("weight" if cls is DeepseekBlock4x else "linear")


def test_intermediate_not_a_multiple_of_the_group():
    """I = 40 with G = 32 (hidden 64): padded to 64 zero-filled channels, same result as the
    bf16 weights padded by hand."""
    torch.manual_seed(0)
    model = Holder(Qwen2Block4x(I=40)).to(torch.bfloat16)
    w1, w3, w2 = expert_weights(model.mlp.experts)
    w4a8.patch_moe(model, group_size=32)
    assert model.mlp.experts.intermediate_size == 64
    padded = w4a8.W4A8MoE.from_float(F.pad(w1, (0, 0, 0, 24)), F.pad(w3, (0, 0, 0, 24)), F.pad(w2, (0, 24)),
                                     top_k=2, group_size=32, renormalize=False, process_weights=True)
    x, logits = torch.randn(9, 64).to(torch.bfloat16), torch.randn(9, 6)
    assert torch.equal(model.mlp.experts(x, logits), padded(x, logits))


class FusedExperts(nn.Module):
    """5.x-style fused experts, transposed and interleaved (gpt-oss layout, without biases)."""

    def __init__(self, w1, w3, w2):
        super().__init__()
        E, I, H = w1.shape
        gate_up = torch.stack([w1, w3], dim=2).reshape(E, 2 * I, H)     # g0, u0, g1, u1, ...
        self.gate_up_proj = nn.Parameter(gate_up.transpose(1, 2).contiguous())   # [E, H, 2I]
        self.down_proj = nn.Parameter(w2.transpose(1, 2).contiguous())           # [E, I, H]
        self.is_transposed, self.is_concatenated, self.has_bias = True, False, False
        self.act_fn = nn.SiLU()


def test_fused_expert_layouts():
    w1, w3, w2 = torch.randn(3, 32, 64), torch.randn(3, 32, 64), torch.randn(3, 64, 32)
    got = expert_weights(FusedExperts(w1, w3, w2))
    assert all(torch.equal(a, b) for a, b in zip(got, (w1, w3, w2)))
    plain = nn.Module()
    plain.gate_up_proj, plain.down_proj = nn.Parameter(torch.cat([w1, w3], 1)), nn.Parameter(w2)
    assert all(torch.equal(a, b) for a, b in zip(expert_weights(plain), (w1, w3, w2)))


def test_refusals():
    gelu = Holder(Qwen2Block4x())
    for mlp in gelu.mlp.experts:
        mlp.act_fn = nn.GELU()
    with pytest.raises(TypeError, match="not SiLU"):
        w4a8.patch_moe(gelu)
    biased = Holder(MixtralBlock4x())
    biased.mlp.experts[0].w1 = nn.Linear(64, 48, bias=True)
    with pytest.raises(TypeError, match="biased"):
        w4a8.patch_moe(biased)
    with pytest.raises(ValueError, match="no sparse-MoE block"):
        w4a8.patch_moe(nn.Sequential(nn.Linear(4, 4)))
    patched = Holder(MixtralBlock4x())
    w4a8.patch_moe(patched)
    with pytest.raises(ValueError, match="already patched"):
        w4a8.patch_moe(patched)
    odd = Holder(MixtralBlock4x(H=40, I=32))
    with pytest.raises(ValueError, match="hidden_size=40"):
        w4a8.patch_moe(odd)
    assert find_moe_blocks(Holder(MixtralBlock4x())) and not find_moe_blocks(nn.Linear(2, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["qwen3_moe", "glm4_moe"])
def test_patched_model_on_gpu(kind):
    model = tiny(kind).cuda()
    ref = copy.deepcopy(model)
    w4a8.patch_moe(model)
    ids = prompts().cuda()
    with torch.no_grad():
        cos, top1 = logits_metrics(ref(ids).logits, model(ids).logits)
    want = greedy(model, ids[:, :6])
    same = (greedy(ref, ids[:, :6]) == want).float().mean().item()
    model.forward = torch.compile(model.forward, backend="w4a8", dynamic=True)
    compiled_same = (greedy(model, ids[:, :6]) == want).float().mean().item()
    print(f"{kind} on GPU: logits cosine {cos:.5f}, top-1 {top1:.3f}, greedy equal to bf16 {same:.3f}, "
          f"compiled greedy equal to eager {compiled_same:.3f}")
    assert cos > 0.999 and top1 >= 0.85 and same >= 0.5 and compiled_same >= 0.9
