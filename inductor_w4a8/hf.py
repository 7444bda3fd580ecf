"""transformers integration: `patch_moe(model)` swaps sparse-MoE blocks for W4A8MoE.

Supported blocks (found by structure, not by class name), in transformers 4.x and 5.x:
    * softmax top-k routers: Mixtral (always renormalized), Qwen2-MoE / Qwen3-MoE (norm_topk_prob),
      Qwen2-MoE's gated shared expert kept in bf16;
    * sigmoid grouped routers with e_score_correction_bias (DeepSeek-V3, GLM-4-MoE): n_group,
      topk_group, norm_topk_prob and routed_scaling_factor taken from the router; shared experts
      kept in bf16.
Expert weights may be fused 3-D parameters (transformers 5.x: experts.gate_up_proj [E, 2I, H]
and experts.down_proj [E, H, I], also the transposed / interleaved variants) or per-expert
nn.Linear modules (4.x: gate_proj / up_proj / down_proj, or Mixtral's w1 / w3 / w2).

The replacement keeps the block's router module (so transformers' router-logit recording and
`output_router_logits` still see it), quantizes the experts (formats.quantize_w4, groups along
K) into a W4A8MoE (built by inductor_w4a8.moe_builder, the same builder the checkpoint loaders
use), and returns what the original block returned: the hidden states, or
(hidden_states, router_logits) for the 4.x blocks that return that pair. Only the routed experts
become W4A8; attention, router, shared experts and everything else stay as they are.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import torch
import torch.nn.functional as F
from torch import nn

from . import formats
from .moe_builder import build_w4a8_moe, process_group_rank, quantize_experts

__all__ = ["patch_moe", "W4A8SparseMoeBlock", "find_moe_blocks", "expert_weights", "moe_routing_of",
           "w4a8_block"]

_GATE_NAMES, _UP_NAMES, _DOWN_NAMES = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


# ------------------------------------------------------------------------------------------------
# Reading a block
# ------------------------------------------------------------------------------------------------
def _first_attr(obj, names):
    for n in names:
        if hasattr(obj, n):
            return getattr(obj, n)
    return None


def _is_silu(act) -> bool:
    x = torch.linspace(-6, 6, 49)
    try:
        return bool(torch.allclose(act(x), F.silu(x), atol=1e-6))
    except Exception:  # noqa: BLE001 - anything that is not a plain elementwise SiLU
        return False


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An experts container -> (w1 gate [E, I, H], w3 up [E, I, H], w2 down [E, H, I]), detached."""
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        w1, w3, w2 = [], [], []
        for i, mlp in enumerate(experts):
            lin = [_first_attr(mlp, names) for names in (_GATE_NAMES, _UP_NAMES, _DOWN_NAMES)]
            if any(not isinstance(m, nn.Linear) for m in lin):
                raise TypeError(f"expert {i} ({type(mlp).__name__}) has no gate_proj/up_proj/down_proj "
                                f"(or w1/w3/w2) nn.Linear layers")
            if any(m.bias is not None for m in lin):
                raise TypeError(f"expert {i} has biased projections; W4A8MoE has no expert biases")
            act = getattr(mlp, "act_fn", None)
            if act is not None and not _is_silu(act):
                raise TypeError(f"expert {i} activation {type(act).__name__} is not SiLU; W4A8MoE "
                                f"computes silu(gate) * up")
            w1.append(lin[0].weight.detach())
            w3.append(lin[1].weight.detach())
            w2.append(lin[2].weight.detach())
        return torch.stack(w1), torch.stack(w3), torch.stack(w2)
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise TypeError(f"{type(experts).__name__}: expected fused gate_up_proj / down_proj parameters "
                        f"or a ModuleList of expert MLPs")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise TypeError(f"{type(experts).__name__} has expert biases; W4A8MoE has none")
    act = getattr(experts, "act_fn", None)
    if act is not None and not _is_silu(act):
        raise TypeError(f"{type(experts).__name__} activation {type(act).__name__} is not SiLU")
    gate_up, down = gate_up.detach(), down.detach()
    if getattr(experts, "is_transposed", False):          # [E, H, 2I] and [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if getattr(experts, "is_concatenated", True):          # [gate; up]
        I = gate_up.shape[1] // 2
        w1, w3 = gate_up[:, :I], gate_up[:, I:]
    else:                                                  # [g0, u0, g1, u1, ...]
        w1, w3 = gate_up[:, 0::2], gate_up[:, 1::2]
    return w1.contiguous(), w3.contiguous(), down.contiguous()


def _config_value(sources, names, default=None):
    for src in sources:
        if src is None:
            continue
        for n in names:
            v = getattr(src, n, None)
            if v is not None:
                return v
    return default


def moe_routing_of(block: nn.Module, config=None) -> dict:
    """The W4A8MoE routing arguments that reproduce the block's router."""
    gate = block.gate
    sources = (gate, block, config)
    top_k = _config_value(sources, ("top_k", "num_experts_per_tok"))
    if top_k is None:
        raise TypeError(f"{type(block).__name__}: cannot find the router's top_k")
    if getattr(gate, "e_score_correction_bias", None) is not None:
        n_group = _config_value(sources, ("n_group", "num_group"))
        topk_group = _config_value(sources, ("topk_group",))
        grouped = n_group is not None and n_group > 1
        return {"top_k": int(top_k), "scoring": "sigmoid",
                "renormalize": bool(_config_value(sources, ("norm_topk_prob",), True)),
                "n_group": int(n_group) if grouped else None,
                "topk_group": int(topk_group) if grouped else None,
                "routed_scaling_factor": float(_config_value(sources, ("routed_scaling_factor",), 1.0))}
    renormalize = _config_value(sources, ("norm_topk_prob",))
    if renormalize is None:
        if "mixtral" not in type(block).__name__.lower():
            raise TypeError(f"{type(block).__name__}: cannot tell whether the router renormalizes "
                            f"its top-k weights (no norm_topk_prob)")
        renormalize = True                                 # Mixtral always does
    return {"top_k": int(top_k), "scoring": "softmax", "renormalize": bool(renormalize),
            "n_group": None, "topk_group": None, "routed_scaling_factor": 1.0}


def _returns_pair(block: nn.Module) -> bool:
    """Does the block's forward return (hidden_states, router_logits)? (transformers 4.x Mixtral,
    Qwen2/3-MoE.) Read from the source, so no forward has to run."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(block).forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    returns = [n for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    return any(isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2 for r in returns)


def _router_mode(gate: nn.Module, hidden_size: int, num_experts: int) -> str:
    """How to get router logits: 'linear' (gate(x) is the logits, 4.x nn.Linear), 'tuple'
    (gate(x)[0] is the logits, 5.x routers), or 'weight' (compute x @ gate.weight.T in fp32, for
    routers that return only their top-k, like 4.x DeepSeek-V3)."""
    w = gate.weight
    with torch.no_grad():
        out = gate(torch.zeros(1, hidden_size, dtype=w.dtype, device=w.device))
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape[-1] == num_experts:
        return "linear"
    if (isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor)
            and out[0].is_floating_point() and out[0].shape[-1] == num_experts):
        return "tuple"
    return "weight"


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every sparse-MoE block: a module with a `gate` router holding a [E, H]
    weight and an `experts` container (fused parameters or a list of expert MLPs)."""
    found = []
    for name, m in model.named_modules():
        if not name or isinstance(m, W4A8SparseMoeBlock):     # the root cannot be replaced in place
            continue
        gate, experts = getattr(m, "gate", None), getattr(m, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(getattr(gate, "weight", None), torch.Tensor):
            continue
        if isinstance(experts, nn.ModuleList) or isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            found.append((name, m))
    return found


# ------------------------------------------------------------------------------------------------
# The replacement block
# ------------------------------------------------------------------------------------------------
class W4A8SparseMoeBlock(nn.Module):
    """A transformers sparse-MoE block with its routed experts in W4A8.

    gate: the block's own router (bf16); experts: W4A8MoE (or its tensor-parallel wrapper);
    shared_experts / shared_expert + shared_expert_gate: the block's own bf16 modules.
    """

    def __init__(self, gate: nn.Module, experts: nn.Module, *, router_mode: str, returns_pair: bool,
                 router_fp32: bool, shared_experts: nn.Module | None = None,
                 shared_expert: nn.Module | None = None, shared_expert_gate: nn.Module | None = None,
                 source: str = ""):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.router_mode = router_mode
        self.returns_pair = returns_pair
        self.router_fp32 = router_fp32
        self.source = source

    def extra_repr(self) -> str:
        return f"source={self.source}, router_mode={self.router_mode}, returns_pair={self.returns_pair}"

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_mode == "linear":
            return self.gate(x)
        if self.router_mode == "tuple":
            return self.gate(x)[0]
        if self.router_fp32:
            return F.linear(x.float(), self.gate.weight.float())
        return F.linear(x, self.gate.weight)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router_logits(x)
        y = self.experts(x.to(torch.bfloat16).contiguous(), logits).to(hidden_states.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        y = y.reshape(shape)
        return (y, logits) if self.returns_pair else y


def _pick_group_size(H: int, group_size: int | None) -> int:
    if group_size is not None:
        formats.check_group_size(H, group_size, "hidden_size")
        return group_size
    for g in sorted(formats.SUPPORTED_GROUP_SIZES, reverse=True):
        if H % g == 0:
            return g
    raise ValueError(f"hidden_size={H} is not a multiple of any supported group size "
                     f"{formats.SUPPORTED_GROUP_SIZES}")


def w4a8_block(name: str, block: nn.Module, experts: nn.Module) -> W4A8SparseMoeBlock:
    """The W4A8 replacement of a transformers sparse-MoE block around built W4A8 `experts`
    (a W4A8MoE or its tensor-parallel wrapper): the block's own router and shared experts."""
    E = block.gate.weight.shape[0]
    H = block.gate.weight.shape[1]
    scoring = "sigmoid" if getattr(block.gate, "e_score_correction_bias", None) is not None else "softmax"
    shared_experts = getattr(block, "shared_experts", None)
    shared_expert = getattr(block, "shared_expert", None)
    return W4A8SparseMoeBlock(
        block.gate, experts, router_mode=_router_mode(block.gate, H, E), returns_pair=_returns_pair(block),
        router_fp32=scoring == "sigmoid",
        shared_experts=shared_experts if isinstance(shared_experts, nn.Module) else None,
        shared_expert=shared_expert if isinstance(shared_expert, nn.Module) else None,
        shared_expert_gate=getattr(block, "shared_expert_gate", None), source=type(block).__name__)


def _convert_block(name: str, block: nn.Module, config, *, group_size, scale_mode, process_group,
                   process: bool) -> W4A8SparseMoeBlock:
    w1, w3, w2 = expert_weights(block.experts)
    E, I, H = w1.shape
    if tuple(block.gate.weight.shape) != (E, H):
        raise TypeError(f"{name}: router weight {tuple(block.gate.weight.shape)} does not match "
                        f"{E} experts of hidden size {H}")
    routing = moe_routing_of(block, config)
    G = _pick_group_size(H, group_size)
    bias = getattr(block.gate, "e_score_correction_bias", None)
    packed = quantize_experts(w1.to(torch.bfloat16), w3.to(torch.bfloat16), w2.to(torch.bfloat16), G)
    rank, world = process_group_rank(process_group)
    moe = build_w4a8_moe(*packed, group_size=G, routing=routing,
                         e_score_correction_bias=None if bias is None else bias.detach(),
                         scale_mode=scale_mode, tp_rank=rank, tp_size=world, process_group=process_group,
                         process=process)
    return w4a8_block(name, block, moe)


def patch_moe(model: nn.Module, *, group_size: int | None = None, scale_mode: str | None = None,
              process_group=None, process: bool = True) -> list[str]:
    """Replace every sparse-MoE block of a transformers model by a W4A8 one, in place.

    group_size: 32, 64 or 128 (default: the largest dividing the hidden size). scale_mode: the
    W4A8MoE scale mode (default: the package default). process_group: shard the experts over a
    torch.distributed group (tensor parallel, see inductor_w4a8.tp); the model must be replicated
    on every rank. Returns the names of the replaced modules; raises if there is none.
    """
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    blocks = find_moe_blocks(model)
    if not blocks and any(isinstance(m, W4A8SparseMoeBlock) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already patched: its sparse-MoE blocks are "
                         f"W4A8SparseMoeBlock (patch_moe replaces bf16 blocks once)")
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse-MoE block (a module with a `gate` "
                         f"router and `experts`) to replace")
    with torch.no_grad():
        for name, block in blocks:
            new = _convert_block(name, block, config, group_size=group_size, scale_mode=scale_mode,
                                 process_group=process_group, process=process)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
    return [name for name, _ in blocks]
