"""eager_graphs.py: graph replay of W4A8MoE's eager decode.

CPU (CI): the switch, who is eligible, and the per-module cache (seen once -> captured ->
replayed, least recently used dropped, a parameter whose storage moved is a new key), with the
capture stubbed. CUDA: bit for bit the direct path, fresh outputs per call, decode sizes only,
inside a user's own capture the kernels are captured as before.
"""
from __future__ import annotations

import pytest
import torch

from inductor_w4a8 import eager_graphs
from inductor_w4a8.testing import capture_cuda_graph

from compile_utils import make_inputs, make_moe


def test_switch_nests_and_restores():
    assert eager_graphs.enabled() == eager_graphs.graph_replay.default
    with eager_graphs.graph_replay(False):
        assert not eager_graphs.enabled()
        with eager_graphs.graph_replay(True):
            assert eager_graphs.enabled()
        assert not eager_graphs.enabled()
    assert eager_graphs.enabled() == eager_graphs.graph_replay.default


def test_cpu_forward_never_touches_the_cache(seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(2, moe, seed=seed)
    with torch.no_grad():
        for _ in range(4):
            moe(x, logits)
    assert eager_graphs.GRAPHS_ATTR not in moe.__dict__


class _StubGraph:
    """Stands in for _Graph on CPU: runs the block at capture and at every replay, counts both."""
    captures = 0

    def __init__(self, run, x, logits):
        type(self).captures += 1
        self.run, self.replays = run, 0

    def replay(self, x, logits):
        self.replays += 1
        return self.run(x, logits)


@pytest.fixture
def stub_capture(monkeypatch):
    _StubGraph.captures = 0
    monkeypatch.setattr(eager_graphs, "_Graph", _StubGraph)
    monkeypatch.setattr(eager_graphs, "_eligible",
                        lambda x: eager_graphs.enabled() and x.shape[0] <= eager_graphs.MAX_TOKENS)
    return _StubGraph


def test_seen_once_then_captured_then_replayed(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(3, moe, seed=seed)
    with torch.no_grad():
        expected = moe(x, logits)                     # checked call: never a graph
        assert eager_graphs.GRAPHS_ATTR not in moe.__dict__
        outs = [moe(x, logits) for _ in range(4)]     # seen, capture + replay, replay, replay
    assert stub_capture.captures == 1
    graph, = [e for e in moe.__dict__[eager_graphs.GRAPHS_ATTR].values()]
    assert graph.replays == 3
    for out in outs:
        assert torch.equal(out, expected)


def test_large_batches_and_the_switch_skip_the_graph(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(eager_graphs.MAX_TOKENS + 1, moe, seed=seed)
    with torch.no_grad():
        for _ in range(4):
            moe(x, logits)
        x, logits = make_inputs(2, moe, seed=seed)
        with eager_graphs.graph_replay(False):
            for _ in range(4):
                moe(x, logits)
    assert stub_capture.captures == 0


def test_cache_drops_the_least_recently_used(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    with torch.no_grad():
        for T in range(1, eager_graphs.MAX_GRAPHS + 3):
            x, logits = make_inputs(T, moe, seed=seed)
            for _ in range(3):
                moe(x, logits)
    cache = moe.__dict__[eager_graphs.GRAPHS_ATTR]
    assert len(cache) == eager_graphs.MAX_GRAPHS
    assert [key[0][0][0] for key in cache] == list(range(3, eager_graphs.MAX_GRAPHS + 3))  # T of each


def test_a_moved_parameter_is_a_new_graph(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(4, moe, seed=seed)
    with torch.no_grad():
        for _ in range(3):
            moe(x, logits)
        moe.w2_group_scale.data = moe.w2_group_scale.data.clone() * 2   # same Parameter, new storage
        out = [moe(x, logits) for _ in range(3)][-1]
        with eager_graphs.graph_replay(False):
            expected = moe(x, logits)
    assert stub_capture.captures == 2
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 5, eager_graphs.MAX_TOKENS])
def test_cuda_replay_is_the_direct_path_bit_for_bit(T, seed):
    moe = make_moe(device="cuda", seed=seed % 1000)
    inputs = [make_inputs(T, moe, seed=seed + i) for i in range(5)]
    with torch.no_grad():
        with eager_graphs.graph_replay(False):
            expected = [moe(x, logits) for x, logits in inputs]
        outs = [moe(x, logits) for x, logits in inputs]   # checked, seen, capture, replay, replay
        outs += [moe(x, logits) for x, logits in inputs]  # every call a replay
    assert eager_graphs.captured_keys(moe) == 1
    for i, out in enumerate(outs):  # fresh inputs each call, and no output overwritten by a later call
        assert torch.equal(out, expected[i % 5]), i


@pytest.mark.cuda
def test_cuda_no_graph_above_decode_sizes(seed):
    moe = make_moe(device="cuda", seed=seed % 1000)
    x, logits = make_inputs(eager_graphs.MAX_TOKENS + 1, moe, seed=seed)
    with torch.no_grad():
        for _ in range(4):
            moe(x, logits)
    assert eager_graphs.captured_keys(moe) == 0


@pytest.mark.cuda
def test_cuda_inside_a_user_capture_the_kernels_are_captured(seed):
    moe = make_moe(device="cuda", seed=seed % 1000)
    x, logits = make_inputs(2, moe, seed=seed)
    with torch.no_grad():
        for _ in range(4):
            expected = moe(x, logits)        # this module already replays its own graph
        static_x, static_logits = x.clone(), logits.clone()
        graph, out = capture_cuda_graph(moe, static_x, static_logits)
        x2, logits2 = make_inputs(2, moe, seed=seed + 1)
        static_x.copy_(x2)
        static_logits.copy_(logits2)
        graph.replay()
        with eager_graphs.graph_replay(False):
            expected2 = moe(x2, logits2)
    assert torch.equal(out, expected2)
    assert not torch.equal(expected, expected2)


@pytest.mark.cuda
def test_cuda_a_moved_parameter_is_recaptured(seed):
    moe = make_moe(device="cuda", seed=seed % 1000)
    x, logits = make_inputs(3, moe, seed=seed)
    with torch.no_grad():
        for _ in range(4):
            moe(x, logits)
        moe.w13_group_scale.data = moe.w13_group_scale.data.clone()
        moe.w13_group_scale.data[0] *= 2   # expert 0's scales doubled, in the new storage only
        outs = [moe(x, logits) for _ in range(3)]
        with eager_graphs.graph_replay(False):
            expected = moe(x, logits)
    assert eager_graphs.captured_keys(moe) == 2
    for out in outs:
        assert torch.equal(out, expected)
