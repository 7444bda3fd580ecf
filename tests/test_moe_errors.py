"""W4A8MoE's refusals at the call, eager and under torch.compile(fullgraph=True) (CPU, CI):

* bad inputs (float32 hidden states, wrong hidden size, wrong expert count in router_logits,
  forward before process_weights_after_loading) raise W4A8InputError with our message, also from
  the compiled module (not Dynamo's "Observed exception");
* inference only: a call that would need gradients (an input or a parameter requiring grad, grad
  mode on) is refused naming torch.no_grad() / torch.inference_mode(); under no_grad or
  inference_mode the same call runs and returns a tensor without a grad_fn;
* inside a larger compiled model the checks are traced (no graph break for good inputs) and
  Dynamo's error still carries our message.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import inductor_w4a8 as w4a8
from inductor_w4a8 import W4A8InputError

from compile_utils import SMALL, MoEModel, make_inputs, make_moe
from compile_utils import fresh_dynamo  # noqa: F401  (autouse fixture)

BAD_INPUTS = {
    "float32 hidden states": (lambda x, lg: (x.float(), lg), "hidden_states must be torch.bfloat16"),
    "wrong hidden size": (lambda x, lg: (x[:, :32].contiguous(), lg), "hidden_states has 32 features"),
    "wrong expert count": (lambda x, lg: (x, lg[:, :5].contiguous()), "router_logits must have shape"),
    "rank 3 hidden states": (lambda x, lg: (x[None], lg), "hidden_states must have rank 2"),
    "float64 router logits": (lambda x, lg: (x, lg.double()), "router_logits must be one of"),
    "router logits on meta": (lambda x, lg: (x, lg.to("meta")), "move the inputs to cpu"),
}


def _runner(moe, how):
    if how == "eager":
        return moe
    return torch.compile(moe, backend="w4a8", fullgraph=True)


@pytest.mark.parametrize("how", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_our_error(case, how, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(5, moe, seed=seed)
    make_bad, match = BAD_INPUTS[case]
    run = _runner(moe, how)
    with torch.no_grad():
        if how == "compiled":  # a good call first: the refusal also comes from a warm compiled module
            torch.testing.assert_close(run(x, logits), moe(x, logits), rtol=0, atol=0)
        with pytest.raises(W4A8InputError, match=match):
            run(*make_bad(x, logits))


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_forward_before_processing_raises_our_error(how, seed):
    moe = w4a8.W4A8MoE(**SMALL)
    x, logits = make_inputs(3, moe, seed=seed)
    with torch.no_grad(), pytest.raises(W4A8InputError, match="process_weights_after_loading"):
        _runner(moe, how)(x, logits)


def _requires_grad_input(x, logits, moe):
    return x.clone().requires_grad_(True), logits


def _requires_grad_logits(x, logits, moe):
    return x, logits.clone().requires_grad_(True)


def _requires_grad_param(x, logits, moe):
    param = next(p for p in moe.parameters() if p.dtype in (torch.bfloat16, torch.float32))
    param.requires_grad_(True)
    return x, logits


GRAD_CASES = {"hidden_states": _requires_grad_input, "router_logits": _requires_grad_logits,
              "a parameter": _requires_grad_param}


@pytest.mark.parametrize("how", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_call_needing_grad_is_refused_naming_the_fix(case, how, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(4, moe, seed=seed)
    args = GRAD_CASES[case](x, logits, moe)
    run = _runner(moe, how)
    with pytest.raises(W4A8InputError, match=r"inference only.*torch\.no_grad\(\).*inference_mode"):
        run(*args)


@pytest.mark.parametrize("how", ["eager", "compiled"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_requires_grad_input_runs_without_a_graph_under_no_grad(mode, how, seed):
    moe = make_moe(seed=seed % 1000)
    x, logits = make_inputs(4, moe, seed=seed)
    with torch.no_grad():
        expected = moe(x, logits)
    x_grad = x.clone().requires_grad_(True)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = _runner(moe, how)(x_grad, logits)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_checks_inside_a_compiled_model_keep_one_graph_and_our_message():
    """Traced as part of a bigger model, the checks add no graph break; a bad input still fails
    at compile time, with our message in Dynamo's error."""
    model = MoEModel(num_layers=2)
    x, _ = make_inputs(6, model.layers[0])
    compiled = torch.compile(model, backend="w4a8", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        assert sum(counters["graph_break"].values()) == 0
        with pytest.raises(Exception, match="hidden_states must be torch.bfloat16"):
            compiled(x.float())
