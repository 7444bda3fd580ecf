"""fp32 -> bf16 for Triton kernels, bit exact against torch's `.to(torch.bfloat16)`.

HW=True is the hardware convert (cvt.rn.bf16.f32, round to nearest even). Triton's interpreter
(TRITON_INTERPRET=1, the CPU tests) truncates instead (255.5 -> 255, torch gives 256), so HW=False
rounds with integer ops, as c10's round_to_nearest_even does. Launchers pass HW =
`_common.use_hw_fp8(t)` (true exactly when the kernel runs compiled on a GPU).
"""
import triton
import triton.language as tl


@triton.jit
def fp32_to_bf16(x, HW: tl.constexpr):
    """fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10)."""
    if HW:
        return x.to(tl.bfloat16)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
