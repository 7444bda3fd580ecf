"""A transformers MoE model with its sparse-MoE blocks replaced by W4A8MoE, eager and compiled.

    python examples/transformers_moe.py [--model qwen3_moe|glm4_moe] [--device cuda|cpu]

Builds a tiny random-initialised model (no download), keeps a bf16 copy, calls
`inductor_w4a8.patch_moe`, and prints logits cosine / top-1 agreement against bf16 and the greedy
tokens of both, eager and under torch.compile(backend="w4a8").
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
import transformers

import inductor_w4a8 as w4a8
from inductor_w4a8.cli import device_or_exit

COMMON = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, head_dim=32)


def build(kind: str):
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**COMMON, moe_intermediate_size=128, intermediate_size=256,
                                          num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.Glm4MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=128,
                                     n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                     first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)
    return transformers.Glm4MoeForCausalLM(cfg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="transformers_moe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("qwen3_moe", "glm4_moe"), default="qwen3_moe",
                   help="which transformers MoE architecture to build (tiny, random weights)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    device = device_or_exit(p.prog, args.device)
    torch.manual_seed(0)
    ref = build(args.model).to(torch.bfloat16).to(device).eval()
    model = copy.deepcopy(ref)
    replaced = w4a8.patch_moe(model)
    print(f"{args.model}: replaced {len(replaced)} MoE blocks: {replaced}", flush=True)
    ids = torch.randint(0, COMMON["vocab_size"], (4, 24), device=device)
    with torch.no_grad():
        want = ref(ids).logits
        for name, m in (("eager", model), ("compiled", torch.compile(model, backend="w4a8"))):
            if name == "compiled":
                print("compiling with torch.compile(backend='w4a8') ...", flush=True)
            got = m(ids).logits
            cos = F.cosine_similarity(want.float().flatten(), got.float().flatten(), dim=0).item()
            top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
            print(f"{name:9s} logits cosine vs bf16 {cos:.5f}, top-1 agreement {top1:.3f}", flush=True)
        print("greedy generation of 8 tokens, bf16 and W4A8 ...", flush=True)
        gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
        a = ref.generate(ids, **gen)[:, ids.shape[1]:]
        b = model.generate(ids, **gen)[:, ids.shape[1]:]
        print(f"greedy tokens equal to bf16: {(a == b).float().mean().item():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
