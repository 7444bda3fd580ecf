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


def _until_captured(moe, x, logits):
    """The calls that take a key to a captured graph: checked, seen once, captured (and replayed)."""
    for _ in range(3):
        out = moe(x, logits)
    return out


def test_seen_once_then_captured_then_replayed(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(3, moe, seed=seed)
    with torch.no_grad():
        expected = moe(x, logits)                     # checked call: never a graph
        assert eager_graphs.GRAPHS_ATTR not in moe.__dict__
        outs = [moe(x, logits) for _ in range(4)]     # seen, capture + replay, replay, replay
    assert stub_capture.captures == 1
    graph, = [e for e in moe.__dict__[eager_graphs.GRAPHS_ATTR].graphs.values()]
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
            _until_captured(moe, *make_inputs(T, moe, seed=seed))
        x, logits = make_inputs(3, moe, seed=seed)
        moe(x, logits)                                   # T = 3 used again: now the most recent
        x, logits = make_inputs(eager_graphs.MAX_TOKENS, moe, seed=seed)
        moe(x, logits)
        moe(x, logits)                                   # seen once only: evicts no graph
    cache = moe.__dict__[eager_graphs.GRAPHS_ATTR]
    assert len(cache.graphs) == eager_graphs.MAX_GRAPHS
    expected = [*range(4, eager_graphs.MAX_GRAPHS + 3), 3]
    assert [key[0][0][0] for key in cache.graphs] == expected   # T of each, least recent first


def test_cache_stays_bounded_over_many_shapes(stub_capture, seed):
    """Many token counts and parameter moves: never more than MAX_GRAPHS graphs and
    4 * MAX_GRAPHS keys seen once per module (what bounds the memory the cache holds)."""
    moe = make_moe(seed=seed % 1000)
    cache_sizes, old_storages = [], []   # kept alive: a freed address could come back as a new one
    with torch.no_grad():
        for T in range(1, eager_graphs.MAX_TOKENS + 1):
            for move in range(3):
                old_storages.append(moe.w2_group_scale.data)
                moe.w2_group_scale.data = moe.w2_group_scale.data.clone()   # a new key each time
                _until_captured(moe, *make_inputs(T, moe, seed=seed))
                cache = moe.__dict__[eager_graphs.GRAPHS_ATTR]
                cache_sizes.append((len(cache.graphs), len(cache.seen)))
    assert max(g for g, _ in cache_sizes) == eager_graphs.MAX_GRAPHS
    assert max(s for _, s in cache_sizes) <= 4 * eager_graphs.MAX_GRAPHS
    assert stub_capture.captures == 3 * eager_graphs.MAX_TOKENS


def test_a_new_capture_is_the_most_recent(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    with torch.no_grad():
        for T in (1, 2):
            _until_captured(moe, *make_inputs(T, moe, seed=seed))
        x, logits = make_inputs(5, moe, seed=seed)
        moe(x, logits)      # checked
        moe(x, logits)      # seen
        x1, logits1 = make_inputs(1, moe, seed=seed)
        moe(x1, logits1)    # T = 1 replayed: most recent
        moe(x, logits)      # T = 5 captured: now the most recent
    assert [key[0][0][0] for key in moe.__dict__[eager_graphs.GRAPHS_ATTR].graphs] == [2, 1, 5]


def test_inference_mode_is_its_own_graph(stub_capture, seed):
    """Static buffers made under inference_mode are inference tensors, which a call outside it
    could not copy into: the mode is part of the key."""
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(3, moe, seed=seed)
    for _ in range(3):
        with torch.inference_mode():
            moe(x, logits)
        with torch.no_grad():
            moe(x, logits)
    assert stub_capture.captures == 2


def test_a_failed_capture_warns_once_and_runs_directly(monkeypatch, seed):
    class _Failing:
        attempts = 0

        def __init__(self, run, x, logits):
            type(self).attempts += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(eager_graphs, "_Graph", _Failing)
    monkeypatch.setattr(eager_graphs, "_eligible", lambda x: True)
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(2, moe, seed=seed)
    with torch.no_grad():
        expected = moe(x, logits)
        moe(x, logits)
        with pytest.warns(UserWarning, match="capturing a forward of 2 tokens failed"):
            out = moe(x, logits)
        outs = [moe(x, logits) for _ in range(3)]
    assert _Failing.attempts == 1
    for o in [out, *outs]:
        assert torch.equal(o, expected)


def test_module_copies_start_with_an_empty_cache(stub_capture, seed):
    import copy
    import io
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(2, moe, seed=seed)
    with torch.no_grad():
        _until_captured(moe, x, logits)
    assert eager_graphs.captured_keys(moe) == 1
    twin = copy.deepcopy(moe)
    buffer = io.BytesIO()
    torch.save(moe, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert eager_graphs.captured_keys(twin) == 0 and eager_graphs.captured_keys(loaded) == 0
    with torch.no_grad():
        assert torch.equal(twin(x, logits), moe(x, logits))


def test_a_moved_parameter_is_a_new_graph(stub_capture, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(4, moe, seed=seed)
    with torch.no_grad():
        _until_captured(moe, x, logits)
        moe.w2_group_scale.data = moe.w2_group_scale.data.clone() * 2   # same Parameter, new storage
        out = _until_captured(moe, x, logits)
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


@pytest.mark.cuda
def test_cuda_streams_and_inference_mode_get_their_own_graphs(seed):
    """Replays alternating between two streams, and a capture under inference_mode followed by
    calls outside it: every result the direct path's, one graph per (stream, mode)."""
    moe = make_moe(device="cuda", seed=seed % 1000)
    inputs = [make_inputs(3, moe, seed=seed + i) for i in range(4)]
    other = torch.cuda.Stream()
    with torch.no_grad():
        with eager_graphs.graph_replay(False):
            expected = [moe(x, logits) for x, logits in inputs]
        outs = []
        for round_ in range(4):
            for i, (x, logits) in enumerate(inputs):
                if i % 2:
                    other.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(other):
                        outs.append((i, moe(x, logits)))
                    torch.cuda.current_stream().wait_stream(other)
                else:
                    outs.append((i, moe(x, logits)))
        with torch.inference_mode():
            for x, logits in inputs:
                moe(x, logits)
        outs += [(i, moe(x, logits)) for i, (x, logits) in enumerate(inputs)]
    torch.cuda.synchronize()
    assert eager_graphs.captured_keys(moe) == 3
    for i, out in outs:
        assert torch.equal(out, expected[i]), i
