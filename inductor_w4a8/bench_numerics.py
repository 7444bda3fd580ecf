"""Numerics of the grouped GEMM and its peers against the exact product of the checkpoint.

The checkpoint is what compressed-tensors stores: int4 q and bf16 group scales s
(`formats.quantize_w4` of random bf16 weights). Its exact product, in fp64, is
`(a * a_scale) @ (q * s)^T` per expert, a being the fp8 activations: the value the user's
checkpoint means for these activations. Every implementation's bf16 output is compared with it
normwise (`testing.rel_error`), beside the bf16 floor: the error of rounding that exact product to
bf16 once, the least any bf16 output can have.

Columns (one row per GEMM shape and token count):
  floor          rel error of the exact product rounded to bf16
  ours exact     scale_mode="exact" (the checkpoint's bf16 group scales) vs the exact product
  ours fp8 own   scale_mode="fp8" vs the exact product of ITS OWN inputs (fp8 group scale x fp32
                 channel scale, dequantized in fp64): the kernel's error alone; its floor is
                 "fp8 own floor"
  ours fp8       scale_mode="fp8" vs the checkpoint's exact product (adds the scale conversion)
  FBGEMM         f8i4bf16_shuffled_grouped vs the checkpoint's exact product; FBGEMM takes bf16
                 weights and re-quantizes them itself (quantize_int4_preshuffle), so it is given
                 the checkpoint's dequantized weights q * s (rounded to bf16, 2^-9 relative)
"""
from __future__ import annotations

import dataclasses

import torch

from . import formats, reference
from .testing import rel_error

COLUMNS = (  # (row key, table heading)
    ("floor", "bf16 floor"),
    ("ours_exact", "ours exact"),
    ("ours_fp8_own", "ours fp8 vs own inputs"),
    ("fp8_own_floor", "fp8 own floor"),
    ("ours_fp8", "ours fp8"),
    ("fbgemm", "FBGEMM f8i4"),
)


@dataclasses.dataclass
class CheckpointGemm:
    """One MoE GEMM's weights as a checkpoint holds them, and as each of our scale modes runs them."""
    q: torch.Tensor             # int8 [E, N, K], natural K order
    s_bf16: torch.Tensor        # bf16 [E, N, K // G]: the checkpoint's group scales
    w: torch.Tensor             # int32 [E, N, K // 8]: our GEMM layout of q
    s_fp8: torch.Tensor         # fp8 [E, N, K // G] (formats.convert_bf16_scales_to_fp8)
    chan: torch.Tensor          # fp32 [E, N, 1]
    group_size: int

    def dequantized_bf16(self) -> torch.Tensor:
        return formats.dequantize_w4(self.q, self.s_bf16, self.group_size).to(torch.bfloat16)


def checkpoint_gemm(E: int, N: int, K: int, group_size: int, device, generator=None) -> CheckpointGemm:
    """Random bf16 weights quantized as llm-compressor does (symmetric int4, group scales)."""
    w = (torch.randn(E, N, K, device=device, generator=generator) * 0.05).to(torch.bfloat16)
    packed, s = formats.quantize_w4(w, group_size)
    del w
    signed = formats.uint4b8_to_signed_int4(packed)
    q = formats.unpack_int4(packed, biased=True)
    w_gemm, _ = formats.encode_gemm_layout(signed)
    s8, chan = formats.convert_bf16_scales_to_fp8(s)
    return CheckpointGemm(q, s, w_gemm, s8, chan, group_size)


def fp8_activations(R: int, K: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 hidden states quantized per token, as the MoE block does before each GEMM."""
    x = torch.randn(R, K, device=device, generator=generator).to(torch.bfloat16)
    return formats.quantize_fp8_per_token(x)


def exact_products(a, a_scale, ckpt: CheckpointGemm, offsets) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 [R, N] exact products: of the checkpoint (q x bf16 s), and of the fp8 mode's own
    inputs (q x fp8 s x fp32 chan)."""
    G = ckpt.group_size
    return (reference.grouped_gemm(a, a_scale, ckpt.q, ckpt.s_bf16, None, offsets, G),
            reference.grouped_gemm(a, a_scale, ckpt.q, ckpt.s_fp8, ckpt.chan, offsets, G))


def bf16_floor(exact: torch.Tensor) -> float:
    """The normwise error of rounding the exact result to bf16 once."""
    return rel_error(exact.to(torch.bfloat16), exact)


def error_row(outputs: dict, exact: torch.Tensor, exact_fp8_own: torch.Tensor) -> dict:
    """{column: normwise error} for the outputs given ("ours_exact", "ours_fp8", "fbgemm")."""
    row = {"floor": bf16_floor(exact), "fp8_own_floor": bf16_floor(exact_fp8_own)}
    if "ours_exact" in outputs:
        row["ours_exact"] = rel_error(outputs["ours_exact"], exact)
    if "ours_fp8" in outputs:
        row["ours_fp8"] = rel_error(outputs["ours_fp8"], exact)
        row["ours_fp8_own"] = rel_error(outputs["ours_fp8"], exact_fp8_own)
    if "fbgemm" in outputs:
        row["fbgemm"] = rel_error(outputs["fbgemm"], exact)
    return row


def markdown_table(rows) -> str:
    """rows: dicts with "gemm", "N", "K", "M", "R" and any of the COLUMNS keys."""
    head = "| GEMM [N, K] | M | R | " + " | ".join(title for _, title in COLUMNS) + " | ours fp8 own / its floor |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['gemm']} [{r['N']}, {r['K']}]", str(r["M"]), str(r["R"])]
        cells += [f"{r[key]:.2e}" if key in r else "-" for key, _ in COLUMNS]
        ratio = r.get("ours_fp8_own", 0.0) / r["fp8_own_floor"] if "ours_fp8_own" in r and r["fp8_own_floor"] else None
        cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
