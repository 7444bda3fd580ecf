"""Every private torch API the lowerings use, imported in one place and guarded by version.

Supported: torch >= 2.11 (GPU machines: 2.11, CI: 2.13). Each name below exists with the same
meaning on both; when a later torch moves one, the fallback goes here and nowhere else.
"""
from __future__ import annotations

import re

import torch

MIN_TORCH = (2, 11)


def torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


TORCH_VERSION = torch_version()


def check_torch_version() -> None:
    if TORCH_VERSION < MIN_TORCH:
        raise ImportError(f"inductor_w4a8.lowerings needs torch >= {'.'.join(map(str, MIN_TORCH))}, "
                          f"found {torch.__version__}")


def functional_tensor_mode():
    """The mode AOTAutograd functionalizes under; triton_op decomposes its ops under it too."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    return FunctionalTensorMode


def functional_tensor_types() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return (torch.Tensor, FunctionalTensor, FakeTensor)


def compile_fx():
    from torch._inductor.compile_fx import compile_fx as fn
    return fn


def inductor_mode_wrapper(mode, options):
    """What `torch.compile(backend="inductor", mode=..., options=...)` builds: it validates the
    options against Inductor's config and turns the mode into config patches (`.config`)."""
    return torch._TorchCompileInductorWrapper(mode, options, None)


def inductor_config():
    from torch._inductor import config
    return config


def custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return CustomGraphPass


def autograd_cache_config():
    """torch._functorch.config (holds enable_autograd_cache)."""
    import torch._functorch.config as cfg
    return cfg


def cond_op():
    """The cond higher-order op itself. `torch.cond` called outside Dynamo (as in a dispatch rule
    that runs while AOTAutograd traces) compiles its branches with Dynamo first; the HOP traces
    them with make_fx under the modes already active, which is what a rule needs."""
    from torch._higher_order_ops.cond import cond_op as op
    return op


def wrap_triton():
    return torch.library.wrap_triton


def num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(idx).multi_processor_count


def size_factor(value) -> int | None:
    """c when the symbolic int `value` is c * s for one size symbol s (1 for a bare symbol or a
    plain int); None for any other expression."""
    import sympy

    if not isinstance(value, torch.SymInt):
        return 1
    expr = value.node.expr
    if isinstance(expr, sympy.Symbol):
        return 1
    coeff, rest = expr.as_coeff_Mul()
    if isinstance(rest, sympy.Symbol) and coeff.is_Integer and int(coeff) > 0:
        return int(coeff)
    return None


def run_frames_as_python(*functions) -> bool:
    """Have Dynamo run each function's own frame as plain Python whenever it is entered from
    Python that Dynamo is not tracing (the top frame of a compiled call); frames it calls are
    still compiled, and when traced code calls it, it is inlined and traced as usual.
    Returns False (nothing done) where this torch has no such switch."""
    from torch._dynamo import eval_frame
    skip_code = getattr(eval_frame, "skip_code", None)
    if skip_code is None:
        return False
    for fn in functions:
        skip_code(getattr(fn, "__code__"))
    return True


def dispatch_observed() -> bool:
    """True when something watches the dispatcher in this thread: a TorchDispatchMode or a
    TorchFunctionMode on the stack (tracers, FakeTensorMode, `with torch.device(...)`,
    recorders) or the autograd profiler. Unknown (names missing): True, the safe answer."""
    C = torch._C
    try:
        return bool(C._len_torch_dispatch_stack() or C._len_torch_function_stack()
                    or C._autograd._profiler_enabled())
    except AttributeError:
        return True


def dynamo_restart_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions Dynamo raises through a backend to restart its own analysis (e.g. when it
    tensorifies a float scalar): control flow, not failures, so a backend must let them pass."""
    from torch._dynamo import exc
    return tuple(t for t in (getattr(exc, "RestartAnalysis", None),) if t is not None)
