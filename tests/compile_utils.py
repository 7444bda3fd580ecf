"""Shared by the compile / CUDA-graph / export tests: small and GLM-4.6-size MoE layers, a model of
several MoE layers, and a backend wrapper that records what torch.compile hands to "w4a8"."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import inductor_w4a8 as w4a8
from inductor_w4a8.backend import w4a8_backend
from inductor_w4a8.testing import random_checkpoint_

# GLM-4.6 MoE layer per GPU: E=160, hidden 5120, moe-intermediate 1536, top-8, sigmoid routing
# with the score-correction bias, grouped top-k, routed scaling 2.5.
GLM = dict(num_experts=160, top_k=8, hidden_size=5120, intermediate_size=1536, group_size=128,
           scoring="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.5)
SMALL = dict(num_experts=8, top_k=2, hidden_size=64, intermediate_size=64, group_size=32)


def make_moe(config=SMALL, device="cpu", seed=0, **overrides) -> w4a8.W4A8MoE:
    """A processed layer with random weights."""
    moe = w4a8.W4A8MoE(**{**config, **overrides}, device="cpu")
    random_checkpoint_(moe, seed)  # on CPU: the same layer on every device
    moe = moe.to(device)
    moe.process_weights_after_loading()
    return moe


def make_inputs(T: int, moe: w4a8.W4A8MoE, device=None, seed=None):
    g = torch.Generator().manual_seed(T if seed is None else seed)
    device = device or next(moe.parameters()).device
    x = (torch.randn(T, moe.hidden_size, generator=g)).to(torch.bfloat16).to(device)
    logits = torch.randn(T, moe.num_experts, generator=g).to(device)
    return x, logits


class MoEModel(nn.Module):
    """A small model of several MoE layers with residuals: x = x + moe_i(x, x @ router_i).

    No norm in between on purpose: Inductor's fused norms round differently from eager in the
    last bit, and fp8 activations turn that into visible noise; without them the compiled model
    is bitwise equal to eager on CPU, so tests can compare exactly.
    """

    def __init__(self, num_layers=3, config=SMALL, device="cpu"):
        super().__init__()
        self.layers = nn.ModuleList(make_moe(config, device, seed=i) for i in range(num_layers))
        H, E = config["hidden_size"], config["num_experts"]
        g = torch.Generator().manual_seed(123)
        self.routers = nn.ParameterList(
            nn.Parameter((torch.randn(H, E, generator=g) * H ** -0.5).to(device), requires_grad=False)
            for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for moe, router in zip(self.layers, self.routers):
            x = x + moe(x, x.float() @ router)
        return x


class RecordingBackend:
    """backend= for torch.compile: records each Dynamo graph handed over, then compiles it with
    the "w4a8" backend (same mode/options)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return w4a8_backend(gm, example_inputs, **self.kwargs)

    def w4a8_ops(self, index: int = -1) -> list[str]:
        """Names of the w4a8:: ops called in a recorded graph, in order."""
        names = []
        for node in self.graphs[index].graph.nodes:
            if node.op == "call_function":
                name = str(node.target)
                if name.startswith("w4a8.") or "w4a8" in getattr(node.target, "__module__", "") or \
                        name.startswith("torch.ops.w4a8"):
                    names.append(name.replace("torch.ops.", ""))
        return names


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each compile test starts and ends with a clean Dynamo cache and counters (autouse where
    imported)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
