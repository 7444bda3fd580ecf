"""Diagnostic: compiled (Inductor-fused) fp8 per-token quantization vs the op, per row."""
import sys
import torch
sys.path.insert(0, "tests")
import inductor_w4a8 as w4a8  # noqa

fn = lambda t: torch.ops.w4a8.quantize_fp8_per_token(t)  # noqa: E731
torch._dynamo.reset()
c = torch.compile(fn, backend="w4a8", fullgraph=True, options={"w4a8.fuse": "quantize_fp8_per_token"})
for T in (2, 3, 4, 5, 17):
    x = torch.randn(T, 64, dtype=torch.bfloat16, device="cuda")
    q1, s1 = c(x); q0, s0 = fn(x)
    print(T, "bytes differ:", (q1.view(torch.uint8) != q0.view(torch.uint8)).sum().item(),
          "scale rel diff per row:", ((s1 - s0) / s0).flatten().tolist()[:6], "strides", s1.stride(), s0.stride())
from compile_utils import make_moe, make_inputs
from inductor_w4a8.testing import rel_error
moe = make_moe(device="cuda")
for order in [(2, 3, 17, 3), (5, 3, 2)]:
    torch._dynamo.reset()
    cm = torch.compile(moe, backend="w4a8", fullgraph=True, options={"w4a8.fuse": "quantize_fp8_per_token"})
    res = []
    for T in order:
        xx, lg = make_inputs(T, moe)
        res.append((T, round(rel_error(cm(xx, lg), moe(xx, lg)), 5)))
    print("block", res)
xx, lg = make_inputs(3, moe)
w, ids = torch.ops.w4a8.select_experts(lg, moe.e_score_correction_bias if moe.scoring == "sigmoid" else None, moe.top_k, moe.scoring, moe.renormalize, moe.n_group or 0, moe.topk_group or 0, moe.routed_scaling_factor)
print("T=3 ids", ids.tolist(), "weights", w.tolist())
