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


def free_size_symbols(*values) -> list:
    """The bare size symbols (as SymInts) that symbolic ints like 2*s0 are built from.

    A cond branch that uses 2*s0 needs s0 itself among the cond's operands: Inductor binds a
    subgraph's symbols from its operands, and it cannot solve 2*s0 for s0 (torch.cond under
    Dynamo lifts the free symbols the same way). make_fx finds the proxy of a bare symbol it
    already tracks (a graph input) by its expression."""
    out, seen = [], set()
    for v in values:
        if not isinstance(v, torch.SymInt):
            continue
        node = v.node
        for sym in sorted(node.expr.free_symbols, key=str):
            if sym in seen:
                continue
            seen.add(sym)
            env = node.shape_env
            values_of = getattr(env, "backed_var_to_val", None)  # 2.13; var_to_val in 2.11
            if values_of is None:
                values_of = env.var_to_val
            hint = values_of.get(sym)
            out.append(env.create_symintnode(sym, hint=None if hint is None else int(hint)))
    return out
