"""fastmask.optim.OptimizerInBackward: the step taken inside the backward equals the ordinary step, no gradient
outlives the backward, the state round-trips through state_dict, and Adafactor's state is what the docs say."""

from __future__ import annotations

import copy

import pytest
import torch

from fastmask.optim import OptimizerInBackward


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.randn(32, 8), torch.randint(0, 3, (32,))


def _train(model, optimizer, x, y, steps):
    losses = []
    for step in range(steps):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer_class,kwargs", [(torch.optim.Adam, {"lr": 0.05}),
                                                    (torch.optim.Adafactor, {"lr": 0.05})])
def test_the_step_in_backward_equals_the_ordinary_step(optimizer_class, kwargs):
    """Each parameter's optimizer sees exactly its own complete gradient once per backward: bit-identical."""
    model, x, y = _model_and_data()
    twin, _, _ = _model_and_data()
    ordinary = _train(model, optimizer_class(model.parameters(), **kwargs), x, y, 6)
    in_backward = OptimizerInBackward(twin.parameters(), optimizer_class, **kwargs)
    assert _train(twin, in_backward, x, y, 6) == ordinary
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert q.grad is None  # dropped as soon as it was used


def test_state_dict_round_trip_resumes_bit_for_bit():
    model, x, y = _model_and_data()
    optimizer = OptimizerInBackward(model.parameters(), torch.optim.Adafactor, lr=0.05)
    _train(model, optimizer, x, y, 3)
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_state = copy.deepcopy(optimizer.state_dict())  # torch's state_dict holds the live tensors
    uninterrupted = _train(model, optimizer, x, y, 3)

    resumed_model, _, _ = _model_and_data(seed=1)  # other values everywhere
    with torch.no_grad():
        for p, saved in zip(resumed_model.parameters(), saved_params):
            p.copy_(saved)
    resumed = OptimizerInBackward(resumed_model.parameters(), torch.optim.Adafactor, lr=0.05)
    resumed.load_state_dict(saved_state)
    assert _train(resumed_model, resumed, x, y, 3) == uninterrupted
    with pytest.raises(ValueError, match="expected the states of 4 per-parameter optimizers"):
        resumed.load_state_dict({"per_parameter": []})


def test_adafactor_state_of_nm_logits_is_one_row_factor_per_group():
    """2:4 logits (out, in / 4, 6): Adafactor keeps a row factor (out, in / 4, 1) and a column factor (out, 1, 6):
    with the fp32 logits 7 bytes per weight (plus out * 24 bytes), where Adam keeps 24."""
    out_features, in_features = 12, 64
    logits = torch.nn.Parameter(torch.randn(out_features, in_features // 4, 6))
    optimizer = OptimizerInBackward([logits], torch.optim.Adafactor, lr=0.05)
    (logits.square().sum()).backward()
    assert logits.grad is None
    state_bytes = optimizer.state_bytes()
    factors = 4 * (out_features * in_features // 4) + 4 * out_features * 6
    assert state_bytes == factors + 4  # + the step counter (a float32 scalar tensor)
    per_weight = (logits.numel() * 4 + state_bytes) / (out_features * in_features)
    assert per_weight <= 8 and per_weight == pytest.approx(7 + (24 * out_features + 4) / (out_features * in_features))


def test_bad_parameters_are_refused():
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        OptimizerInBackward([frozen], torch.optim.Adam)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="lists a parameter twice"):
        OptimizerInBackward([p, p], torch.optim.Adam)
    optimizer = OptimizerInBackward([p], torch.optim.Adam, lr=0.1)
    optimizer.remove()  # detached: the backward leaves the gradient and the parameter alone
    (p * 2).sum().backward()
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.detach(), torch.ones(3))
