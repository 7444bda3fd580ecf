"""Time GPU post-processing of one full GLM-4.6 MoE layer (E=160, H=5120, I=1536, group 128).

    python examples/time_postprocess.py [--repeats 5] [--experts 160]      (GPU only)

Times `process_weights_after_loading` end to end in both scale modes with CUDA events on the
current stream (the first, untimed run compiles the kernels), then each op alone, and prints
milliseconds (median of the repeats) and the effective bandwidth of the weight ops.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import inductor_w4a8  # noqa: F401  (registers the ops)
from inductor_w4a8.cli import positive_int, require_cuda
from inductor_w4a8.postprocess import process_weights_after_loading

ops = torch.ops.w4a8


def make_layer(E, H, I, G, scale_mode):
    layer = nn.Module()
    words = lambda *s: torch.randint(-2**31, 2**31 - 1, s, dtype=torch.int32, device="cuda")
    scales = lambda *s: (torch.rand(s, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
    for name, t in (("w13_weight_packed", words(E, 2 * I, H // 8)), ("w13_weight_scale", scales(E, 2 * I, H // G)),
                    ("w2_weight_packed", words(E, H, I // 8)), ("w2_weight_scale", scales(E, H, I // G))):
        setattr(layer, name, nn.Parameter(t, requires_grad=False))
    layer.group_size, layer.scale_mode = G, scale_mode
    return layer


def time_ms(fn, repeats, setup=lambda: None):
    times = []
    for _ in range(repeats):
        arg = setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        del arg
    return statistics.median(times), min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="time_postprocess.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per measurement (median, min)")
    parser.add_argument("--experts", type=positive_int, default=160, help="experts in the layer (GLM-4.6: 160)")
    args = parser.parse_args(argv)
    require_cuda(parser.prog, "timing GPU post-processing")
    E, H, I, G = args.experts, 5120, 1536, 128
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"layer: E={E} H={H} I={I} group={G}  (median / min of {args.repeats} runs, ms)")

    for mode in ("fp8", "exact"):
        process_weights_after_loading(make_layer(E, H, I, G, mode))  # compile, untimed
        med, best = time_ms(process_weights_after_loading, args.repeats, lambda: make_layer(E, H, I, G, mode))
        print(f"process_weights_after_loading  scale_mode={mode:5s}  {med:9.3f}  {best:9.3f}")

    for name, shape in (("w13", (E, 2 * I, H // 8)), ("w2", (E, H, I // 8))):
        nbytes = torch.Size(shape).numel() * 4
        words = lambda: torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device="cuda")
        conv = ops.convert_packed_uint4b8_to_signed_int4_
        conv(words())
        med, best = time_ms(conv, args.repeats, words)
        print(f"  {name} convert_packed_uint4b8_to_signed_int4_  {med:9.3f}  {best:9.3f}  "
              f"({2 * nbytes / best / 1e6:.0f} GB/s)")
        enc = ops.encode_and_reorder_int4b_grouped
        enc(words())
        med, best = time_ms(enc, args.repeats, words)
        print(f"  {name} encode_and_reorder_int4b_grouped        {med:9.3f}  {best:9.3f}  "
              f"({2 * nbytes / best / 1e6:.0f} GB/s)")
        gshape = shape[:2] + (shape[2] * 8 // G,)
        sc = lambda: (torch.rand(gshape, device="cuda") * 0.02 + 1e-4).to(torch.bfloat16)
        ops.convert_bf16_scales_to_fp8(sc())
        med, best = time_ms(ops.convert_bf16_scales_to_fp8, args.repeats, sc)
        print(f"  {name} convert_bf16_scales_to_fp8               {med:9.3f}  {best:9.3f}")


if __name__ == "__main__":
    main()
