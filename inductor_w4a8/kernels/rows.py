"""Row indices read from memory (sorted positions, source tokens), made safe to address with."""
import triton
import triton.language as tl


@triton.jit
def clamped_row(i, n):
    """Index i clamped into [0, n), as int64: no value of i can address memory out of bounds,
    and row * stride cannot overflow int32."""
    return tl.minimum(tl.maximum(i, 0), n - 1).to(tl.int64)
