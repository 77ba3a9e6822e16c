"""Bad input at every public entry (issue 8): ops, the C++ kernel ops, MaskedLinear, MaskConfig / fm.apply and the
CLI refuse it before any work starts, with a message that names the argument and what was expected. NaN logits are
refused; silent broadcasts, truncations and truthy strings are not accepted."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

import fastmask as fm
from fastmask import cli
from fastmask.ops import _backend, _modes

from conftest import device_backend_params

NAN = float("nan")
INF = float("inf")


def _ml(**override):
    kwargs = dict(x=torch.randn(2, 7), weight=torch.randn(5, 7), logits=torch.randn(5, 7), bias=None)
    kwargs.update(override)
    return fm.ops.masked_linear(**kwargs)


# --- the public ops ------------------------------------------------------------------------------------------------
OP_CASES = [
    # (id, call, exception, message)
    ("uniform-float-shape", lambda: fm.ops.uniform((2.5, 3)), TypeError, "uniform: shape must be a sequence of ints"),
    ("uniform-negative-shape", lambda: fm.ops.uniform((2, -1)), ValueError, "shape must be non-negative"),
    ("uniform-negative-seed", lambda: fm.ops.uniform((2,), seed=-1), ValueError, r"seed must be in \[0, 2\*\*63 - 1\]"),
    ("uniform-float-offset", lambda: fm.ops.uniform((2,), offset=1.0), TypeError, "offset must be an int"),
    ("gate-int-logits", lambda: fm.ops.gate(torch.zeros(3, dtype=torch.int64)), TypeError,
     "logits must be a floating tensor"),
    ("gate-complex-logits", lambda: fm.ops.gate(torch.zeros(3, dtype=torch.complex64)), TypeError,
     "logits must be a floating tensor"),
    ("gate-estimator", lambda: fm.ops.gate(torch.zeros(3), estimator="concrete"), ValueError,
     "estimator must be one of"),
    ("gate-training-string", lambda: fm.ops.gate(torch.zeros(3), training="no"), TypeError,
     "training must be a bool"),
    ("gate-inverse-tensor", lambda: fm.ops.gate(torch.zeros(3), inverse=torch.tensor(True)), TypeError,
     "inverse must be a bool"),
    ("gate-tau-nan", lambda: fm.ops.gate(torch.zeros(3), estimator="threshold_st", tau=NAN), ValueError,
     "tau must be a finite number"),
    ("gate-beta-inf", lambda: fm.ops.gate(torch.zeros(3), beta=INF), ValueError, "beta must be a finite number"),
    ("gate-beta-zero", lambda: fm.ops.gate(torch.zeros(3), beta=0.0), ValueError, "beta .* must be > 0"),
    ("gate-stretch", lambda: fm.ops.hard_concrete(torch.zeros(3), gamma=0.1), ValueError, "gamma < 0 < 1 < zeta"),
    ("l0-estimator", lambda: fm.ops.l0_norm(torch.zeros(3), estimator="l1"), ValueError, "estimator must be one of"),
    ("l0-int", lambda: fm.ops.l0_norm(torch.zeros(3, dtype=torch.int32)), TypeError, "logits must be a floating"),
    ("ml-x-int", lambda: _ml(x=torch.ones(2, 7, dtype=torch.int32)), TypeError, "x must be a floating tensor"),
    ("ml-x-last-dim", lambda: _ml(x=torch.randn(2, 6)), ValueError, "x must have last dimension in_features=7"),
    ("ml-x-scalar", lambda: _ml(x=torch.tensor(1.0)), ValueError, "x must have last dimension"),
    ("ml-x-dtype", lambda: _ml(x=torch.randn(2, 7, dtype=torch.float64)), TypeError,
     "x and weight must have the same dtype"),
    ("ml-weight-3d", lambda: _ml(weight=torch.randn(5, 7, 1)), ValueError, "weight must be 2-D"),
    ("ml-logits-3d", lambda: _ml(logits=torch.randn(5, 7, 1)), ValueError, "logits must be a 2-D gate grid"),
    ("ml-logits-1d-wrong", lambda: _ml(logits=torch.randn(6)), ValueError, "1-D logits must have length"),
    ("ml-logits-grid", lambda: _ml(logits=torch.randn(3, 7)), ValueError, "cannot infer the block size"),
    ("ml-logits-block", lambda: _ml(logits=torch.randn(3, 7), block=(1, 1)), ValueError,
     r"logits must have shape \[5, 7\]"),
    ("ml-block-zero", lambda: _ml(block=(0, 1)), ValueError, "block must be two positive ints"),
    ("ml-block-float", lambda: _ml(block=(1.0, 1)), ValueError, "block must be two positive ints"),
    ("ml-block-bool", lambda: _ml(block=(True, 1)), ValueError, "block must be two positive ints"),
    # A (1,) bias would broadcast silently over the 5 outputs in F.linear: refused.
    ("ml-bias-broadcast", lambda: _ml(bias=torch.randn(1)), ValueError, r"bias must have shape \[5\]"),
    ("ml-bias-dtype", lambda: _ml(bias=torch.randn(5, dtype=torch.float64)), TypeError,
     "bias must have the dtype of x"),
    ("ml-device", lambda: _ml(x=torch.randn(2, 7, device="meta")), ValueError, "all tensors must be on one device"),
    ("ml-layout", lambda: _ml(weight_layout="io"), ValueError, "weight_layout must be one of"),
    ("ml-training-int", lambda: _ml(training=1), TypeError, "training must be a bool"),
    ("ml-square-1d", lambda: _ml(weight=torch.randn(7, 7), logits=torch.randn(7)), ValueError,
     "ambiguous for a square weight"),
]


@pytest.mark.parametrize("call,exception,message", [pytest.param(c, e, m, id=i) for i, c, e, m in OP_CASES])
def test_ops_refuse_bad_arguments_naming_them(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_nan_logits_are_refused_before_any_kernel(device, backend, monkeypatch):
    fm.set_backend(backend)
    fm.set_check_finite(True)  # on CUDA the default ("auto") skips the check (it costs a device sync)
    try:
        logits = torch.randn(5, 7, device=device)
        logits[2, 3] = NAN
        x, weight = torch.randn(2, 7, device=device), torch.randn(5, 7, device=device)
        calls = []
        real = _backend.resolve

        def spy(dev):  # the backend must never be reached
            calls.append(dev)
            return real(dev)

        for module in ("fastmask.ops.gate", "fastmask.ops.masked_linear", "fastmask.ops.grouped_masked_linear"):
            monkeypatch.setattr(importlib.import_module(module), "resolve", spy)
        for estimator in fm.ref.ESTIMATORS:
            with pytest.raises(ValueError, match="ops.gate: logits contains 1 NaN value"):
                fm.ops.gate(logits, estimator=estimator)
            with pytest.raises(ValueError, match="ops.masked_linear: logits contains 1 NaN value"):
                fm.ops.masked_linear(x, weight, logits, estimator=estimator)
            with pytest.raises(ValueError, match="ops.l0_norm: logits contains 1 NaN value"):
                fm.ops.l0_norm(logits, estimator=estimator)
            with pytest.raises(ValueError, match="ops.grouped_masked_linear: logits contains 1 NaN value"):
                fm.ops.grouped_masked_linear(x, weight, torch.stack([logits, logits.nan_to_num()]),
                                             estimator=estimator)  # two masks, one per half of the batch
        assert calls == []
        layer = fm.MaskedLinear(weight)
        with torch.no_grad():
            layer.logits[0, 0] = NAN
        with pytest.raises(ValueError, match="NaN"):
            layer(x)
    finally:
        fm.set_check_finite("auto")


def test_nan_check_setting():
    logits = torch.tensor([NAN, 1.0])
    assert fm.get_check_finite() == "auto"
    with pytest.raises(ValueError, match="NaN"):  # "auto": CPU tensors are checked
        fm.ops.gate(logits)
    fm.set_check_finite(False)
    try:
        assert torch.isnan(fm.ops.gate(logits, estimator="hard_concrete"))[0]  # unchecked: the NaN goes through
    finally:
        fm.set_check_finite("auto")
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="mode must be True, False or 'auto'"):
            fm.set_check_finite(bad)
    # "auto" never reads GPU tensors back (no device sync): decided on the device type alone.
    meta = torch.full((3,), NAN, device="meta")
    _modes.refuse_nan(meta, "logits", "test")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_nan_check_on_cuda_only_when_enabled():
    logits = torch.tensor([NAN, 1.0], device="cuda")
    assert torch.isnan(fm.ops.gate(logits)).any()  # "auto": not checked on the GPU (no sync)
    fm.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="NaN"):
            fm.ops.gate(logits)
    finally:
        fm.set_check_finite("auto")


# --- the C++ kernel ops (fastmask._C, CPU): TORCH_CHECK errors, never a crash ---------------------------------------
_P = (0, 0, 0, 2 / 3, -0.1, 1.1, 0.0, True, False)  # estimator, seed, offset, beta, gamma, zeta, tau, training, inv


def _cpp_cases():
    ops = torch.ops.fastmask
    w, l = torch.randn(6, 8), torch.randn(6, 8)
    return [
        ("uniform-double", lambda: ops._uniform_fill(torch.empty(3, dtype=torch.float64), 0, 0), "must be float32"),
        ("uniform-noncontig", lambda: ops._uniform_fill(torch.empty(3, 4).t(), 0, 0), "must be contiguous"),
        ("gate-estimator", lambda: ops._gate_fwd(l, 9, *_P[1:]), r"estimator must be an integer code in \[0, 3\]"),
        ("gate-estimator-neg", lambda: ops._gate_bwd(l, l, -1, *_P[1:]), "estimator must be an integer code"),
        ("gate-int", lambda: ops._gate_fwd(l.long(), *_P), "logits must be a floating-point tensor"),
        ("gate-bwd-shape", lambda: ops._gate_bwd(torch.ones(5), l, *_P), "grad_gates must have the shape of logits"),
        ("gate-bwd-int", lambda: ops._gate_bwd(l.int(), l, *_P), "grad_gates must be a floating-point tensor"),
        ("mw-weight-1d", lambda: ops._masked_weight(torch.ones(8), l, 1, 1, *_P), "weight must be 2-D"),
        ("mw-logits-3d", lambda: ops._masked_weight(w, l[None], 1, 1, *_P), "logits must be a 2-D grid"),
        ("mw-block-zero", lambda: ops._masked_weight(w, l, 0, 1, *_P), "block .* must be positive"),
        ("mw-block-neg", lambda: ops._masked_weight(w, l, 1, -3, *_P), "block .* must be positive"),
        ("mw-grid", lambda: ops._masked_weight(w, torch.ones(3, 8), 1, 1, *_P), r"shape \[6, 8\]"),
        ("mw-int-weight", lambda: ops._masked_weight(w.int(), l, 1, 1, *_P), "weight must be float32"),
        ("mw-int-logits", lambda: ops._masked_weight(w, l.int(), 1, 1, *_P), "logits must be a floating-point"),
        ("mg-shape", lambda: ops._mask_grad(torch.ones(5, 8), w, l, 1, 1, *_P, False),
         "grad_wm must have the shape of weight"),
        ("mg-int", lambda: ops._mask_grad(torch.ones(6, 8, dtype=torch.int32), w, l, 1, 1, *_P, True),
         "grad_wm must be a floating-point"),
        ("mg-estimator", lambda: ops._mask_grad(torch.ones(6, 8), w, l, 1, 1, 7, *_P[1:], True),
         "estimator must be an integer code"),
    ]


def test_cpp_kernel_ops_check_their_arguments():
    ok, why = _backend.availability("cpu", "cpu")
    if not ok:
        pytest.skip(f"fastmask._C is not available: {why}")
    for name, call, message in _cpp_cases():
        with pytest.raises(RuntimeError, match=message):
            call()
    # Tensors the CPU kernels have no implementation for are refused by the dispatcher, not read as CPU memory.
    with pytest.raises(NotImplementedError):
        torch.ops.fastmask._gate_fwd(torch.ones(3, device="meta"), *_P)
    with pytest.raises(NotImplementedError):
        torch.ops.fastmask._masked_weight(torch.randn(6, 8).to_sparse(), torch.randn(6, 8), 1, 1, *_P)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_blocks_larger_than_the_weight_mean_the_whole_weight(device, backend):
    # A huge block used to reach the kernels as is (64-bit overflow of ceil_div in C++, a huge repeat_interleave
    # in the reference); it covers the whole weight, like a block of the weight's size.
    fm.set_backend(backend)
    x, weight = torch.randn(3, 7, device=device), torch.randn(5, 7, device=device)
    logits = torch.full((1, 1), 0.7, device=device)
    want = fm.ops.masked_linear(x, weight, logits, block=(5, 7), seed=3)
    for block in ((2**63 - 1, 2**62), (10**12, 7)):
        torch.testing.assert_close(fm.ops.masked_linear(x, weight, logits, block=block, seed=3), want, rtol=0, atol=0)


def test_triton_kernels_check_the_gate_grid():
    pytest.importorskip("triton")
    from fastmask import kernels
    from fastmask._params import GateParams

    p = GateParams(0, 0, 0, 2 / 3, -0.1, 1.1, 0.0, True, False)
    with pytest.raises(ValueError, match="logits grid .* does not match weight"):
        kernels.masked_linear_forward(torch.randn(2, 7), torch.randn(5, 7), torch.randn(3, 7), None, (1, 1), False, p)


# --- MaskedLinear -----------------------------------------------------------------------------------------------
MODULE_CASES = [
    ("int-weight", dict(weight=torch.ones(6, 8, dtype=torch.int64)), TypeError, "weight must be a floating tensor"),
    ("bias-shape", dict(bias=torch.ones(5)), ValueError, r"bias must be None or a tensor of shape \[6\]"),
    ("bias-dtype", dict(bias=torch.ones(6, dtype=torch.float64)), ValueError, "with the weight's dtype"),
    ("bias-type", dict(bias=[0.0] * 6), ValueError, "bias must be None or a tensor"),
    ("block-zero", dict(granularity="block", block=(0, 3)), ValueError, "block must be two positive ints"),
    ("block-float", dict(granularity="block", block=(2.5, 3)), ValueError, "block must be two positive ints"),
    ("block-one", dict(granularity="block", block=(4,)), ValueError, "block must be two positive ints"),
    ("head-dim-zero", dict(granularity="head", head_dim=0), ValueError, "needs head_dim dividing"),
    ("head-dim-3", dict(granularity="head", head_dim=3), ValueError, "needs head_dim dividing the 8 input units"),
    ("init-logit-nan", dict(init_logit=NAN), ValueError, "init_logit must be a finite number"),
    ("init-logit-inf", dict(init_logit=-INF), ValueError, "init_logit must be a finite number"),
    ("init-keep", dict(init_keep=1.5), ValueError, "init_keep must be in"),
    ("tau-nan", dict(estimator="threshold_st", tau=NAN), ValueError, "tau must be a finite number"),
    ("beta-nan", dict(beta=NAN), ValueError, "beta must be a finite number"),
    ("estimator", dict(estimator="magic"), ValueError, "estimator must be one of"),
    ("granularity", dict(granularity="row"), ValueError, "granularity must be one of"),
    ("layout", dict(weight_layout="oi"), ValueError, "weight_layout must be"),
    ("seed", dict(seed=-2), ValueError, "seed must be an int"),
]


@pytest.mark.parametrize("override,exception,message", [pytest.param(o, e, m, id=i) for i, o, e, m in MODULE_CASES])
def test_masked_linear_module_refuses_bad_arguments(override, exception, message):
    kwargs = dict(weight=torch.randn(6, 8), bias=None)
    kwargs.update(override)
    with pytest.raises(exception, match=message):
        fm.MaskedLinear(kwargs.pop("weight"), kwargs.pop("bias"), **kwargs)


def test_masked_linear_module_forward_names_the_input():
    layer = fm.MaskedLinear(torch.randn(6, 8))
    with pytest.raises(ValueError, match="x must have last dimension in_features=8"):
        layer(torch.randn(3, 7))


# --- MaskConfig and fm.apply -----------------------------------------------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


CONFIG_CASES = [
    ("estimator", dict(estimator="concrete"), "MaskConfig.estimator must be one of"),
    ("granularity", dict(granularity="rows"), "MaskConfig.granularity must be one of"),
    ("block-zero", dict(granularity="block", block=(0, 2)), "MaskConfig.block must be two positive ints"),
    ("block-three", dict(block=(2, 2, 2)), "MaskConfig.block must be two positive ints"),
    ("block-float", dict(block=(2.0, 2)), "MaskConfig.block must be two positive ints"),
    ("targets-regex", dict(targets=["("]), r"MaskConfig.targets\[0\] is not a valid regex"),
    ("targets-empty", dict(targets=[]), "MaskConfig.targets must be None or a non-empty list"),
    ("seed", dict(seed=-1), "MaskConfig.seed must be an int"),
    ("tau-nan", dict(tau=NAN), "MaskConfig.tau must be a finite number"),
    ("init-logit-inf", dict(init_logit=INF), "MaskConfig.init_logit must be a finite number"),
]


@pytest.mark.parametrize("kwargs,message", [pytest.param(k, m, id=i) for i, k, m in CONFIG_CASES])
def test_mask_config_names_the_bad_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fm.MaskConfig(**kwargs)


def test_mask_config_json_is_checked():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['estimater'\]"):
        fm.MaskConfig.from_json(json.dumps({"estimater": "hard_concrete"}))
    with pytest.raises(ValueError, match="MaskConfig.from_json: not valid JSON"):
        fm.MaskConfig.from_json('{"estimator": ')
    with pytest.raises(TypeError, match="MaskConfig.from_dict expects a dict, got list"):
        fm.MaskConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="MaskConfig.block must be two positive ints"):
        fm.MaskConfig.from_json(json.dumps({"block": [0, 1]}))


def test_apply_refuses_bad_models_configs_and_targets():
    with pytest.raises(TypeError, match="fastmask.apply: model must be a torch.nn.Module, got str"):
        fm.apply("bert", fm.MaskConfig(targets=["Linear"]))
    with pytest.raises(TypeError, match="config must be a MaskConfig, got dict"):
        fm.apply(_mlp(), {"targets": ["Linear"]})
    with pytest.raises(ValueError, match=r"unknown MaskConfig field\(s\) \['estimatr'\]"):
        fm.apply(_mlp(), fm.MaskConfig(targets=["Linear"]), estimatr="hard_concrete")
    with pytest.raises(ValueError, match=r"the target\(s\) \['attention'\] match no nn.Linear"):
        fm.apply(_mlp(), fm.MaskConfig(targets=["attention"]))
    with pytest.raises(ValueError, match=r"target\(s\) \['nothing'\] match no"):  # one of two matching nothing
        fm.apply(_mlp(), fm.MaskConfig(targets=["Linear", "nothing"]))
    with pytest.raises(ValueError, match="no default targets for model type"):
        fm.apply(_mlp())  # no model.config.model_type: targets must be given
    with pytest.raises(ValueError, match="MaskConfig.block must be two positive ints"):
        fm.apply(_mlp(), fm.MaskConfig(targets=["Linear"]), granularity="block", block=(3, 0))
    model = _mlp()
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="granularity='head' needs model.config"):
        fm.apply(model, fm.MaskConfig(targets=["Linear"], granularity="head"))
    assert [type(m) for m in model] == before  # nothing was swapped


# --- the command line ------------------------------------------------------------------------------------------
CLI_CASES = [
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    (["demo", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["demo", "--lr", "-0.1"], "argument --lr: expected a finite number > 0"),
    (["demo", "--l0-weight", "inf"], "argument --l0-weight: expected a finite number >= 0, got 'inf'"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int in [0, 2**63 - 1], got '-1'"),
    (["demo", "--seed", "1.5"], "argument --seed: expected an int"),
    (["demo", "--steps", "many"], "argument --steps: invalid int value"),
    (["run"], "the following arguments are required: experiment"),
    (["run", "no-such-experiment"], "invalid choice: 'no-such-experiment'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_cli_flags_are_checked_before_any_work(argv, message, capsys, monkeypatch):
    import fastmask.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo must not start"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cli_refuses_an_output_path_that_is_a_file(tmp_path, capsys, monkeypatch):
    import fastmask.demo as demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo must not start"))
    existing = tmp_path / "report.txt"
    existing.write_text("not a folder")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(existing)])
    assert "argument --out: expected a folder path (not an existing file)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        cli.main(["demo", "--steps", "0"])


def test_cli_run_reports_bad_experiment_flags_as_usage_errors(capsys, monkeypatch):
    import sys
    import types

    from fastmask.experiments import runner

    experiment = types.ModuleType("fastmask_test_experiment")
    experiment.add_arguments = lambda parser: runner.add_config_arguments(parser, runner.RunConfig)
    experiment.run_from_args = lambda args: (runner.config_from_args(runner.RunConfig, args, "toy"),
                                             pytest.fail("the experiment must not start"))
    monkeypatch.setitem(sys.modules, experiment.__name__, experiment)
    monkeypatch.setitem(cli.EXPERIMENTS, "toy", (experiment.__name__, "a test experiment"))
    for argv, message in ((["--steps", "0"], "steps must be an int >= 1, got 0"),
                          (["--device", "tpu"], "device must be auto, cpu, cuda or cuda:N")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run", "toy", *argv])
        assert exit_info.value.code == 2
        assert f"run toy: {message}" in capsys.readouterr().err
