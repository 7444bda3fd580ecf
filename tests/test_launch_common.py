"""launch/_common.py's fast_launch (CPU, CI): the binding logic against a stand-in JIT kernel
and Triton runtime (no GPU here), the plan of a real @triton.jit kernel, and every fallback to
the normal kernel[grid](...) launch. The GPU run of the real thing is in test_moe.py /
test_moe_ops.py (`-m cuda`), which launch every MoE kernel through fast_launch."""
from __future__ import annotations

import inspect

import pytest
import torch
import triton
import triton.language as tl

from inductor_w4a8.launch import _common


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Compiled:
    """Stands in for triton's CompiledKernel: records direct launches."""

    def __init__(self):
        self.function, self.packed_metadata, self.direct = object(), object(), []

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        assert function is self.function and packed is self.packed_metadata
        self.direct.append(((g0, g1, g2), stream, args))


class _Jit:
    """Stands in for a JITFunction of `def k(x_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = True)`."""

    def __init__(self, returns_compiled=True):
        def k(x_ptr, n, scale, BLOCK, FLAG=True):
            pass
        self.signature = inspect.signature(k)
        self.params = [_Param("x_ptr", False), _Param("n", False), _Param("scale", False),
                       _Param("BLOCK", True), _Param("FLAG", True)]
        self.arg_names = [p.name for p in self.params]
        self.normal, self.returns_compiled, self.compiled = [], returns_compiled, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.normal.append((grid, args, kwargs))
            if not self.returns_compiled:
                return None
            self.compiled.append(_Compiled())
            return self.compiled[-1]
        return launch


class _Hook:
    def __init__(self, calls=()):
        self.calls = list(calls)


class _Knobs:
    def __init__(self, hooked=False):
        self.launch_enter_hook = _Hook([print] if hooked else [])
        self.launch_exit_hook = _Hook()


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 1234


@pytest.fixture
def runtime(monkeypatch):
    """A fake triton runtime, no interpreter, an empty cache; restored afterwards."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_common, "FAST_LAUNCH", True)
    _common.clear_fast_launch_cache()
    monkeypatch.setattr(_common, "_triton_runtime", lambda: (_Knobs(), _Driver()))
    yield monkeypatch
    _common.clear_fast_launch_cache()


def test_second_launch_is_direct_with_every_argument_in_kernel_order(runtime):
    k = _Jit()
    x = torch.empty(64, dtype=torch.float32)
    first = _common.fast_launch(k, (3,), x, 16, 0.5, BLOCK=128, num_warps=4)
    second = _common.fast_launch(k, (3,), x, 16, 0.25, BLOCK=128, num_warps=4)
    assert len(k.normal) == 1 and second is first
    # the default of the trailing constexpr is filled in, grid padded to 3 dims, current stream
    assert first.direct == [((3, 1, 1), 1234, (x, 16, 0.25, 128, True))]


@pytest.mark.parametrize("change", ["dtype", "misaligned", "int width", "int divisibility",
                                    "int is 1", "constexpr", "option", "bool flag"])
def test_any_specialization_change_goes_through_the_jit_again(runtime, change):
    k = _Jit()
    base = torch.empty(64, dtype=torch.float32)
    args, kwargs = [base, 32, 1.0], dict(BLOCK=64, num_warps=4)
    _common.fast_launch(k, (1,), *args, **kwargs)
    if change == "dtype":
        args[0] = torch.empty(64, dtype=torch.bfloat16)
    elif change == "misaligned":
        args[0] = base[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int width":
        args[1] = 2**31 + 32
    elif change == "int divisibility":
        args[1] = 33
    elif change == "int is 1":
        args[1] = 1
    elif change == "constexpr":
        kwargs["BLOCK"] = 128
    elif change == "option":
        kwargs["num_warps"] = 8
    else:
        kwargs["FLAG"] = False
    _common.fast_launch(k, (1,), *args, **kwargs)
    assert len(k.normal) == 2, change
    assert all(not c.direct for c in k.compiled)


@pytest.mark.parametrize("reason", ["interpreter", "switch off", "launch hook", "no compiled kernel",
                                    "no triton runtime", "not a JIT function"])
def test_fallbacks_use_the_normal_launch(runtime, reason):
    k = _Jit(returns_compiled=reason != "no compiled kernel")
    if reason == "interpreter":
        runtime.setenv("TRITON_INTERPRET", "1")
    elif reason == "switch off":
        runtime.setattr(_common, "FAST_LAUNCH", False)
    elif reason == "launch hook":
        runtime.setattr(_common, "_triton_runtime", lambda: (_Knobs(hooked=True), _Driver()))
    elif reason == "no triton runtime":
        runtime.setattr(_common, "_triton_runtime", lambda: None)
    elif reason == "not a JIT function":
        del k.params
    x = torch.empty(16)
    for _ in range(3):
        _common.fast_launch(k, (2,), x, 16, 1.0, BLOCK=16)
    assert len(k.normal) == 3, reason
    assert all(not c.direct for c in k.compiled)


def test_missing_argument_is_refused_before_any_launch(runtime):
    k = _Jit()
    with pytest.raises(TypeError, match="BLOCK"):
        _common._Plan(k, 3, ())
    assert k.normal == []


@triton.jit
def _real_kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, HW: tl.constexpr = False):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


def test_plan_of_a_real_triton_kernel():
    """The attributes fast_launch reads exist on this triton's JITFunction and mean what it
    assumes (parameter order, constexpr flags, defaults)."""
    plan = _common._Plan(_real_kernel, 3, ("scale", "BLOCK", "num_warps"))
    assert plan.sources == (("pos", 0), ("pos", 1), ("pos", 2), ("kw", "scale"), ("kw", "BLOCK"),
                            ("const", False))
    assert plan.runtime == (True, True, True, True, False, False)
    assert plan.option_names == ("num_warps",)


def test_real_kernel_under_the_interpreter_matches_torch():
    """Under TRITON_INTERPRET=1 (a child process) fast_launch takes the normal launch and the
    kernel computes what it should."""
    import subprocess
    import sys
    code = (
        "import torch, triton, triton.language as tl\n"
        "from inductor_w4a8.launch._common import fast_launch\n"
        "@triton.jit\n"
        "def k(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n"
        "    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)\n"
        "x = torch.randn(50); out = torch.full((50,), float('nan'))\n"
        "for s in (2.0, 3.0):\n"
        "    fast_launch(k, (1,), x, out, 50, s, BLOCK=64)\n"
        "    assert torch.equal(out, x * s), s\n"
        "print('ok')\n")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# programmatic dependent launch: PDL=True and launch_pdl=True together, only where they apply
# ------------------------------------------------------------------------------------------
class _PdlJit(_Jit):
    """A kernel that takes PDL (as the forward's kernels do)."""

    def __init__(self):
        super().__init__()
        def k(x_ptr, n, scale, BLOCK, FLAG=True, PDL=False):
            pass
        self.signature = inspect.signature(k)
        self.params.append(_Param("PDL", True))
        self.arg_names.append("PDL")


class _Props:
    def __init__(self, major):
        self.major, self.multi_processor_count = major, 2


def _gpu(monkeypatch, major):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _Props(major))


@pytest.mark.parametrize("major,expect", [(9, True), (10, True), (8, False)])
def test_pdl_on_sm90_and_newer_for_kernels_that_take_it(runtime, major, expect):
    _gpu(runtime, major)
    k, plain = _PdlJit(), _Jit()
    for _ in range(2):   # the first launch (through the JIT) and the direct one see the same
        _common.fast_launch(k, (3,), "x", 5, 1.5, BLOCK=64)
        _common.fast_launch(plain, (3,), "x", 5, 1.5, BLOCK=64)
    kwargs = k.normal[0][2]
    assert (kwargs.get("PDL"), kwargs.get("launch_pdl")) == ((True, True) if expect else (None, None))
    assert "PDL" not in plain.normal[0][2] and "launch_pdl" not in plain.normal[0][2]
    assert len(k.normal) == 1 and len(k.compiled[0].direct) == 1


def test_pdl_only_for_grids_that_fit_a_few_waves(runtime):
    """2 SMs here: up to 2 * PDL_MAX_PROGRAMS_PER_SM programs start early, larger grids wait."""
    _gpu(runtime, 9)
    k = _PdlJit()
    most = 2 * _common.PDL_MAX_PROGRAMS_PER_SM
    _common.fast_launch(k, (most // 2, 2), "x", 5, 1.5, BLOCK=64)
    _common.fast_launch(k, (most + 1,), "x", 5, 1.5, BLOCK=64)
    assert k.normal[0][2].get("launch_pdl") is True and "launch_pdl" not in k.normal[1][2]


def test_launch_pdl_without_the_wait_is_refused_before_any_launch(runtime):
    _gpu(runtime, 9)
    k = _PdlJit()
    for bad in ({"launch_pdl": True}, {"launch_pdl": True, "PDL": False}):
        with pytest.raises(ValueError, match="needs PDL=True"):
            _common.fast_launch(k, (3,), "x", 5, 1.5, BLOCK=64, **bad)
    assert k.normal == []


def test_pdl_switch_turns_it_off_and_the_key_changes(runtime):
    _gpu(runtime, 9)
    k = _PdlJit()
    _common.fast_launch(k, (3,), "x", 5, 1.5, BLOCK=64)
    with _common.pdl_launches(False):
        _common.fast_launch(k, (3,), "x", 5, 1.5, BLOCK=64)   # another specialization: the JIT
    assert len(k.normal) == 2
    assert k.normal[0][2].get("launch_pdl") is True and "launch_pdl" not in k.normal[1][2]


def test_forward_kernels_take_pdl():
    """Every kernel the block launches through fast_launch takes PDL, and every kernel that takes
    PDL (found in all of inductor_w4a8.kernels, so a new one is checked too) waits first."""
    from inductor_w4a8.kernels import (fp8_quant, grouped_gemm, grouped_gemv, moe_combine, moe_gather,
                                       moe_sort, quantize_scatter, routing, silu_mul_quant)
    kernels = [fp8_quant.quantize_fp8_per_token_kernel, grouped_gemm.w4a8_grouped_gemm_kernel,
               grouped_gemv.w4a8_grouped_gemv_kernel, moe_combine.combine_kernel,
               moe_gather.gather_rows_kernel, moe_sort.count_kernel, moe_sort.scan_kernel,
               moe_sort.place_kernel, quantize_scatter.quantize_scatter_fp8_kernel,
               routing.routing_kernel,
               silu_mul_quant.silu_mul_quant_kernel]
    import ast
    import importlib
    import pkgutil
    import textwrap

    import inductor_w4a8.kernels as package
    taking = [v for m in pkgutil.iter_modules(package.__path__)
              for v in vars(importlib.import_module(f"inductor_w4a8.kernels.{m.name}")).values()
              if isinstance(v, triton.runtime.JITFunction) and "PDL" in v.arg_names
              and v.__name__.endswith("_kernel")]
    assert {id(k) for k in kernels} <= {id(k) for k in taking}
    for k in taking:
        assert "PDL" in k.arg_names and k.signature.parameters["PDL"].default is False, k.__name__
        fn = ast.parse(textwrap.dedent(inspect.getsource(k.fn))).body[0]
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert ast.unparse(body[0]) == "wait_for_prior_kernels(PDL)", k.__name__


@pytest.mark.cuda
def test_cuda_block_is_the_same_with_and_without_pdl(seed):
    """The block with programmatic dependent launch (the default on sm_90+) against PDL off and
    against the ops, bit for bit: at 1 token (every kernel starts early) and at 600 tokens, where
    the GEMMs run long enough that an early kernel reading before its wait would see unfinished
    data. And PDL is in use: the decode GEMM was launched with it."""
    from compile_utils import make_inputs, make_moe
    from inductor_w4a8 import eager
    from inductor_w4a8.launch import grouped_gemm
    moe = make_moe(seed=seed % 1000, device="cuda", num_experts=16, top_k=4, hidden_size=1024,
                   intermediate_size=512, scoring="sigmoid", n_group=4, topk_group=2)
    with torch.no_grad():
        for T in (1, 1, 600):
            x, logits = make_inputs(T, moe, seed=seed + T, device="cuda")
            out = moe(x, logits)
            launched_with_pdl = grouped_gemm.LAST_COMPILED.metadata.launch_pdl
            with _common.pdl_launches(False):
                no_pdl = moe(x, logits)
            with eager.direct_calls(False):
                ops = moe(x, logits)
            torch.cuda.synchronize()
            assert torch.equal(out, no_pdl) and torch.equal(out, ops), T
            if T == 1:
                assert launched_with_pdl


def test_device_scratch_gives_torch_memory_on_the_device_then_restores_the_users_allocator():
    """Triton's scratch allocator is ours only inside the context (the launch of a kernel that
    builds tensor descriptors), on the launch's device; the user's own allocator is back after,
    also when the launch raises."""
    pytest.importorskip("triton")
    var = _common._scratch_allocator_var()
    if var is None:
        pytest.skip("this triton has no allocator context variable")
    def users(size, alignment, stream):
        return None
    token = var.set(users)
    try:
        with _common.device_scratch(torch.device("cpu")):
            buf = var.get()(300, 128, None)
            assert var.get() is not users
        assert isinstance(buf, torch.Tensor) and buf.numel() == 300 and buf.device.type == "cpu"
        assert var.get() is users
        with pytest.raises(RuntimeError, match="launch failed"):
            with _common.device_scratch(torch.device("cpu")):
                raise RuntimeError("launch failed")
        assert var.get() is users
    finally:
        var.reset(token)
