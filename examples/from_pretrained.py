"""A W4A8 checkpoint directory -> a transformers model that generates, in one call.

    python examples/from_pretrained.py [CHECKPOINT_DIR] [--device cpu|cuda] [--compile]

Without CHECKPOINT_DIR it writes a tiny random Qwen3-MoE checkpoint first (llm-compressor's
oneshot W4AFP8 when llmcompressor is installed, else inductor_w4a8.model_writer) to a temporary
directory, then loads it with inductor_w4a8.from_pretrained and generates.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from inductor_w4a8 import cli


def tiny_checkpoint(out: Path) -> Path:
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=160, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=128,
                                      intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                                      norm_topk_prob=True, max_position_embeddings=128)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    try:
        import copy

        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
    except ImportError:
        from inductor_w4a8.model_writer import save_w4a8_model
        print("writing the checkpoint with inductor_w4a8.model_writer (llmcompressor not installed)")
        return save_w4a8_model(model, out, attention_group_size=128)
    src = out.parent / "bf16"
    copy.deepcopy(model).save_pretrained(src)
    model.config._name_or_path = model.name_or_path = str(src)
    print("writing the checkpoint with llm-compressor: oneshot(W4AFP8, targets='Linear')")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4AFP8",
                                                     ignore=["lm_head", "re:.*mlp\\.gate$"]))
    model.save_pretrained(out, save_compressed=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="from_pretrained.py", description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", help="checkpoint directory (default: write a tiny one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile(model.forward, backend='w4a8')")
    args = p.parse_args(argv)
    device = cli.device_or_exit(p.prog, args.device)
    if args.path is not None and not Path(args.path).is_dir():
        cli.exit_usage(p.prog, f"{args.path} is not a checkpoint directory (a folder with config.json "
                               f"and safetensors); omit it to write a tiny one")
    import inductor_w4a8 as w4a8
    from inductor_w4a8.moe_builder import W4A8CheckpointError
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.path) if args.path else tiny_checkpoint(Path(tmp) / "w4a8")
        t0 = time.perf_counter()
        try:
            model = w4a8.from_pretrained(path, device=device)
        except W4A8CheckpointError as exc:  # a checkpoint we cannot run: say why in one line
            cli.exit_usage(p.prog, str(exc).splitlines()[0])
        kinds = {}
        for m in model.modules():
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
        print(f"from_pretrained({path.name}): {type(model).__name__} in {time.perf_counter() - t0:.1f} s; "
              f"{kinds.get('W4A8SparseMoeBlock', 0)} W4A8 MoE blocks, {kinds.get('W4A8Linear', 0)} W4A8Linear, "
              f"{kinds.get('Linear', 0)} bf16 Linear")
        if args.compile:
            model.forward = torch.compile(model.forward, backend="w4a8", dynamic=True)
        ids = torch.arange(1, 9, device=device).reshape(1, 8)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8, pad_token_id=0)
        print(f"generate: {out[0, 8:].tolist()} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
