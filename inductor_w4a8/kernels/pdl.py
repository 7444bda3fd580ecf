"""Programmatic dependent launch (PDL, sm_90+): the forward's next kernel is launched while this
one runs, so a chain of small kernels does not pay a full launch latency between each pair.

A kernel that takes `PDL: tl.constexpr` calls `wait_for_prior_kernels(PDL)` before its first
global-memory access: `griddepcontrol.wait` returns once the previous kernel in the stream has
finished and its writes are visible (a kernel launched without the PDL attribute passes it at
once). Only then does it allow the next kernel to launch (`griddepcontrol.launch_dependents`), so
a kernel that starts early finds every kernel before its predecessor complete. No read of
anything, not even of data nothing in the forward writes, may come before the wait: the previous
kernel may be an in-place weight rewrite. launch/_common.fast_launch sets PDL and the launch
attribute together, on sm_90+ GPUs, for kernels that take PDL.
"""
import triton
import triton.language as tl

# One line each: Inductor copies these globals into its generated source as plain strings.
GRID_DEPENDENCY_WAIT = tl.constexpr("griddepcontrol.wait; // $0")
LAUNCH_DEPENDENTS = tl.constexpr("griddepcontrol.launch_dependents; // $0")


@triton.jit
def wait_for_prior_kernels(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream is done and its writes are
    visible, then let the next kernel launch. A kernel's first statement (see above)."""
    if PDL:
        tl.inline_asm_elementwise(GRID_DEPENDENCY_WAIT, "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)
        tl.inline_asm_elementwise(LAUNCH_DEPENDENTS, "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)
