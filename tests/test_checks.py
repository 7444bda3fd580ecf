"""checks.py: the value-check debug switch (off by default, so the default forward never reads
device values), the W4A8_VALUE_CHECKS environment default, and what the switch turns on.
The CUDA no-sync test of the whole block lives in test_moe.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from inductor_w4a8 import W4A8InputError, checks, ops, value_checks

from compile_utils import make_inputs, make_moe


def test_value_checks_are_off_by_default_and_the_switch_nests():
    t = torch.zeros(3)
    assert not checks.value_checks_enabled(t)
    with value_checks(True):
        assert checks.value_checks_enabled(t)
        assert not checks.value_checks_enabled(t.to("meta"))  # no values to read
        with value_checks(False):
            assert not checks.value_checks_enabled(t)
        assert checks.value_checks_enabled(t)
    assert not checks.value_checks_enabled(t)


@pytest.mark.parametrize("value, expected", [("1", True), ("", False)])
def test_environment_variable_sets_the_default(value, expected):
    env = {**os.environ, checks.VALUE_CHECKS_ENV: value}
    code = ("import torch, inductor_w4a8.checks as c; "
            "print(c.value_checks_enabled(torch.zeros(1)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(expected)


def _spy(monkeypatch):
    """Record every decision of the ops' value-check gate during a forward."""
    decisions = []
    original = ops.value_checks_enabled
    monkeypatch.setattr(ops, "value_checks_enabled",
                        lambda t: decisions.append(original(t)) or decisions[-1])
    return decisions


def test_default_forward_runs_no_value_check(monkeypatch, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(9, moe, seed=seed)
    reads = []
    monkeypatch.setattr(ops, "_check_offset_values",
                        lambda *a, **k: reads.append("offsets"))
    decisions = _spy(monkeypatch)
    with torch.no_grad():
        moe(x, logits)
    assert decisions and not any(decisions), decisions  # the gate was asked and said no
    assert len(reads) == 2  # both GEMMs reached the (gated) offsets check: it is wired in


def test_switch_turns_the_value_checks_on_in_the_forward(monkeypatch, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(9, moe, seed=seed)
    decisions = _spy(monkeypatch)
    with torch.no_grad(), value_checks(True):
        moe(x, logits)
    # the ids check in sort_by_expert and the offsets check of both GEMMs
    assert decisions.count(True) == 3, decisions


def _ids_and_offsets(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (7, 2), generator=g, dtype=torch.int32)
    _, _, offsets = ops.sort_by_expert(ids, 6)
    return ids, offsets


def test_switch_refuses_out_of_range_expert_ids(seed):
    ids, _ = _ids_and_offsets(seed)
    ids[3, 1] = 6
    with value_checks(True), pytest.raises(W4A8InputError, match=r"outside \[0, 6\)"):
        ops.sort_by_expert(ids, 6)


def test_switch_refuses_bad_offsets_naming_them(seed):
    ids, offsets = _ids_and_offsets(seed)
    bad = offsets.clone()
    bad[0] = 1
    with value_checks(True), pytest.raises(W4A8InputError, match=r"expert_offsets\[0\] must be 0"):
        ops._check_offset_values("grouped_gemm", bad, ids.numel())
    ops._check_offset_values("grouped_gemm", bad, ids.numel())  # off: nothing read, nothing raised
