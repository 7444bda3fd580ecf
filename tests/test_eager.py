"""eager.py: W4A8MoE's direct eager path (CPU, CI).

* the direct path gives bit for bit what the ops give, first call (checked kernels) and later
  calls (unchecked), and actually skips the dispatcher (no w4a8:: op is dispatched);
* it steps aside whenever something could tell: a TorchDispatchMode, a TorchFunctionMode, the
  profiler, FakeTensor / meta inputs, the direct_calls(False) switch, a gradient being needed;
* the first call per shapes runs every op check, later calls none; new shapes, new parameters
  or the value-check switch run them again.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from inductor_w4a8 import W4A8InputError, eager, ops, value_checks

from compile_utils import make_inputs, make_moe


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("w4a8::"):
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _dispatched(moe, *args):
    """Which w4a8 ops reach the dispatcher when the module runs: counted by an outer observer
    that does not itself disable the direct path (it is entered after the decision)."""
    seen = []
    real = torch.ops.w4a8

    class _Spy:
        def __getattr__(self, name):
            op = getattr(real, name)   # only ops that exist are counted
            seen.append(name)
            return op

    original = moe._run
    moe._run = lambda kernels, *a: original(_Spy() if kernels is real else kernels, *a)
    try:
        out = moe(*args)
    finally:
        del moe._run
    return out, seen


# route + sort, quantize + scatter, GEMM, act + quantize, GEMM, combine
OPS_PER_BLOCK = 6


def test_direct_path_matches_the_ops_bit_for_bit_and_skips_the_dispatcher(seed):
    moe = make_moe(seed=seed % 1000, scoring="sigmoid", n_group=2, topk_group=1,
                   routed_scaling_factor=2.5)
    with torch.no_grad():
        for T in (1, 7, 7, 33):  # T = 7 twice: the second call runs the unchecked kernels
            x, logits = make_inputs(T, moe, seed=seed + T)
            with eager.direct_calls(False):
                expected, seen_ops = _dispatched(moe, x, logits)
            out, seen_direct = _dispatched(moe, x, logits)
            assert len(seen_ops) == OPS_PER_BLOCK and seen_direct == []
            assert torch.equal(out, expected), T


@pytest.mark.parametrize("observer", ["dispatch mode", "function mode", "profiler"])
def test_observers_see_every_op(observer, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(5, moe, seed=seed)
    with torch.no_grad():
        moe(x, logits)  # warm: the direct path has this shape checked already
        if observer == "dispatch mode":
            with _OpCounter() as counter:
                moe(x, logits)
            assert len(counter.names) == OPS_PER_BLOCK, counter.names
        elif observer == "function mode":
            with torch.device("cpu"):
                _, seen = _dispatched(moe, x, logits)
            assert len(seen) == OPS_PER_BLOCK, seen
        else:
            with torch.profiler.profile() as prof:
                moe(x, logits)
            names = {e.name for e in prof.events()}
            assert {"w4a8::grouped_gemm", "w4a8::combine"} <= names, sorted(names)[:20]


def test_fake_and_meta_inputs_take_the_ops(seed):
    moe = make_moe(seed=seed % 1000).to("meta")
    x, logits = make_inputs(4, make_moe(seed=seed % 1000))
    with torch.no_grad():
        out = moe(x.to("meta"), logits.to("meta"))
    assert out.device.type == "meta" and out.shape == x.shape
    assert eager.direct_kernels(moe, x.to("meta"), logits.to("meta")) == eager.CALL_OPS


def _spy_checks(monkeypatch):
    calls = []
    for name in ("_check_select_and_sort", "_check_quantize_scatter",
                 "_check_grouped_gemm", "_check_silu_mul", "_check_combine"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    return calls


def test_checks_run_once_per_shapes_and_parameters(monkeypatch, seed):
    moe = make_moe(seed=seed % 1000)
    calls = _spy_checks(monkeypatch)
    with torch.no_grad():
        x, logits = make_inputs(6, moe, seed=seed)
        moe(x, logits)
        first = len(calls)
        assert first >= OPS_PER_BLOCK  # every op checked on the first call (both GEMMs)
        moe(x, logits)
        assert len(calls) == first  # same shapes: no check
        x2, logits2 = make_inputs(9, moe, seed=seed + 1)
        moe(x2, logits2)
        assert len(calls) == 2 * first  # new T: checked again, once
        with value_checks(True):
            moe(x2, logits2)
        assert len(calls) == 3 * first  # the debug switch checks every call
        moe.w2_group_scale = torch.nn.Parameter(moe.w2_group_scale.clone(), requires_grad=False)
        moe(x2, logits2)
        assert len(calls) == 4 * first  # a replaced parameter: checked again


def test_replaced_parameter_with_a_wrong_shape_is_refused_not_launched(seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(6, moe, seed=seed)
    with torch.no_grad():
        moe(x, logits)
        bad = moe.w2_group_scale[:, :-1].contiguous()
        moe.w2_group_scale = torch.nn.Parameter(bad, requires_grad=False)
        with pytest.raises(W4A8InputError, match="w_scale must have shape"):
            moe(x, logits)


def test_switch_and_environment_turn_the_direct_path_off(seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(3, moe, seed=seed)
    with torch.no_grad():
        assert eager.direct_kernels(moe, x, logits)[0] is not None
        with eager.direct_calls(False):
            assert eager.direct_kernels(moe, x, logits) == eager.CALL_OPS
    # a call that needs gradients never goes direct (W4A8MoE.__call__ refuses it anyway)
    assert eager.direct_kernels(moe, x.clone().requires_grad_(True), logits) == eager.CALL_OPS


def test_a_routing_setting_changed_after_a_call_is_checked_again(seed):
    """The checked-once key holds the module's routing settings: an n_group that does not divide E,
    set after a good call, is refused by the ops' check (not run unchecked)."""
    moe = make_moe(seed=seed % 1000, scoring="sigmoid", n_group=2, topk_group=1)
    x, logits = make_inputs(5, moe, seed=seed)
    with torch.no_grad():
        moe(x, logits)
        moe(x, logits)                         # now the unchecked kernels for this key
        moe.n_group = moe.num_experts + 1      # not a divisor of E
        with pytest.raises(W4A8InputError, match="is not a multiple of n_group"):
            moe(x, logits)
