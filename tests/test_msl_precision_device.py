"""MSL's ``precision="mixed"`` against float64, and the device path (``fit(device=...)``, ``ChoiceData.to``).

Mixed precision runs the units x situations x alternatives x draws pass in float32: its values and gradients
must be close to float64's (and not equal: float32 really ran), its gradient must be the exact gradient of its
own value, and a fit must land within 0.01 standard errors of the float64 fit with the same standard errors.
The device path is checked on the CPU: a fit named ``device="cpu"`` while torch's default device is "meta" gives
the plain fit's numbers, so no tensor of the fit is made on the default device; data moved elsewhere, and devices
that do not exist here, are refused with messages naming the devices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_msl_speed_paths import MODELS, _problem

import mixlogit as ml
from mixlogit.devices import available_devices, resolve_device
from mixlogit.precision import PRECISIONS, check_precision


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_precision_values_and_gradients_are_close_to_double(name):
    double, theta = _problem(name, workers=1)
    mixed = dataclasses.replace(double, precision="mixed")
    v64, g64 = double.value_and_grad(theta)
    v32, g32 = mixed.value_and_grad(theta)
    assert v32 != v64  # float32 really ran
    assert v32 == pytest.approx(v64, rel=2e-6)
    np.testing.assert_allclose(g32, g64, rtol=0, atol=2e-5 * max(1.0, np.abs(g64).max()))
    assert mixed.loglik(theta) == pytest.approx(v32, rel=1e-12)
    s32, s64 = mixed.scores(theta), double.scores(theta)
    assert s32.dtype == np.float64 and s32.shape == s64.shape
    np.testing.assert_allclose(s32, s64, rtol=0, atol=2e-5 * max(1.0, np.abs(s64).max()))
    # The Hessian (standard errors) is float64 whatever the precision of the search.
    np.testing.assert_array_equal(mixed.hessian(theta), double.hessian(theta))


@pytest.mark.parametrize("name", ["fixed+normal", "scale"])
def test_mixed_closed_form_gradient_is_the_gradient_of_the_mixed_value(name):
    fast, theta = _problem(name, workers=1, precision="mixed")
    slow, _ = _problem(name, workers=1, precision="mixed", closed_form_grad=False)
    v1, g1 = fast.value_and_grad(theta)
    v0, g0 = slow.value_and_grad(theta)
    assert v1 == pytest.approx(v0, rel=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-5 * np.abs(g0).max())


@pytest.fixture(scope="module")
def panel():
    sim = ml.simulate(n_persons=150, n_situations=6, n_alts=3, fixed={"x3": 0.5},
                      random={"x1": ("normal", 1.0, 0.6), "x2": ("normal", -0.5, 0.4)}, seed=3)
    return sim.model, sim.data


@pytest.fixture(scope="module")
def double_fit(panel):
    model, data = panel
    return model.fit(data, draws=100, seed=1)


def test_mixed_precision_fit_is_within_a_hundredth_of_a_standard_error(panel, double_fit):
    model, data = panel
    mixed = model.fit(data, draws=100, seed=1, precision="mixed")
    assert mixed.converged and mixed.settings["precision"] == "mixed"
    assert double_fit.settings["precision"] == "double"
    se = double_fit.bse.to_numpy()
    shift = np.abs(mixed.params.abs().to_numpy() - double_fit.params.abs().to_numpy()) / se
    assert shift.max() < 0.01
    np.testing.assert_allclose(mixed.bse.to_numpy(), se, rtol=0.01)
    # The reported log-likelihood is float64 at the mixed estimates: no better than float64's optimum, and close.
    assert mixed.loglik <= double_fit.loglik + 1e-9
    assert mixed.loglik == pytest.approx(double_fit.loglik, abs=1e-4)
    problem = model.make_problem(data, draws=100, seed=1)
    assert mixed.loglik == pytest.approx(problem.loglik(mixed.params.to_numpy().copy()), abs=1e-9)


def test_a_mixed_search_that_stops_far_out_is_finished_in_float64(panel, double_fit, monkeypatch):
    from mixlogit import model as model_module

    model, data = panel
    # Stop the float32 search after its second iteration: the float64 check and steps must still find the optimum.
    monkeypatch.setitem(model_module.SEARCH_STOP_GAIN, "mixed", 1e6)
    res = model.fit(data, draws=100, seed=1, precision="mixed")
    assert res.converged
    shift = np.abs(res.params.abs().to_numpy() - double_fit.params.abs().to_numpy()) / double_fit.bse.to_numpy()
    assert shift.max() < 0.01  # what converged means: a float64 Newton step shorter than 0.01 SE
    assert res.loglik == pytest.approx(double_fit.loglik, abs=1e-5)


@pytest.mark.parametrize("bad", ["single", "float32", "", None, 32])
def test_unknown_precision_lists_the_accepted_values(panel, bad):
    model, data = panel
    with pytest.raises(ValueError, match="precision") as err:
        model.fit(data, draws=10, precision=bad)
    assert all(repr(p) in str(err.value) for p in PRECISIONS)
    with pytest.raises(ValueError, match="'double', 'mixed'"):
        check_precision(bad)


def test_a_fit_on_a_named_device_makes_no_tensor_on_the_default_device(panel, double_fit):
    model, data = panel
    with torch.device("meta"):  # anything the fit made without naming its device would land here and fail
        res = model.fit(data, draws=100, seed=1, device="cpu")
    np.testing.assert_array_equal(res.params.to_numpy(), double_fit.params.to_numpy())
    np.testing.assert_array_equal(res.bse.to_numpy(), double_fit.bse.to_numpy())
    assert res.loglik == double_fit.loglik and res.settings["device"] == "cpu"
    on_cpu = model.fit(data.to("cpu"), draws=100, seed=1)  # the data's device is the fit's default
    assert on_cpu.loglik == double_fit.loglik


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_evaluates_on_its_own_device_whatever_the_default(name):
    problem, theta = _problem(name, workers=1)
    v, g = problem.value_and_grad(theta)
    s, h = problem.scores(theta), problem.hessian(theta)
    with torch.device("meta"):  # every distribution, the correlated block and the random scale name their device
        v2, g2 = problem.value_and_grad(theta)
        s2, h2 = problem.scores(theta), problem.hessian(theta)
    assert v2 == v
    for a, b in ((g2, g), (s2, s), (h2, h)):
        np.testing.assert_array_equal(a, b)


def test_data_and_draws_moved_to_a_device_keep_every_tensor_there(panel):
    model, data = panel
    spec = model.spec_for(data)
    design = data.to("meta").design(spec.random_names, spec.fixed)
    assert {getattr(design, f.name).device.type for f in dataclasses.fields(design)} == {"meta"}
    plain = model.make_problem(data, draws=20, seed=1)
    assert design.x_rand_diff.shape == plain.design.x_rand_diff.shape
    assert plain.design.x_rand_diff.device.type == "cpu" and data.device is None  # to() made a copy
    rule = plain.rule.to("meta")
    assert rule.z.device.type == rule.log_weights.device.type == "meta" and rule.z.shape == plain.rule.z.shape
    assert plain.design.to("cpu") is plain.design  # already there: nothing is copied


def test_data_on_another_device_than_the_fit_are_refused(panel):
    model, data = panel
    with pytest.raises(ValueError, match=r"the data are on device 'meta', but the fit runs on 'cpu'.*data\.to\('cpu'\)"):
        model.fit(data.to("meta"), draws=10, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_an_unavailable_device_names_itself_and_what_is_available(panel):
    model, data = panel
    assert available_devices()[0] == "cpu"
    with pytest.raises(ValueError, match=r"device='cuda' is not available \(torch.cuda.is_available\(\) is False\); "
                                         r"available here: cpu"):
        model.fit(data, draws=10, device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:3' is not available.*available here: cpu"):
        data.to("cuda:3")
    with pytest.raises(ValueError, match=r"device='tpu0' is not a device name; available here: cpu"):
        resolve_device("tpu0")
    with pytest.raises(TypeError, match="device must be a device name"):
        resolve_device(0.5)


def test_the_command_line_takes_precision_and_device_for_msl_only(tmp_path, capsys):
    from mixlogit.cli import main

    base = ["fit", "--dataset", "electricity", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--precision applies to --method msl, not --method svi"):
        main([*base, "--method", "svi", "--precision", "mixed"])
    with pytest.raises(SystemExit):  # argparse lists the choices
        main([*base, "--precision", "half"])
    err = capsys.readouterr().err
    assert "--precision: invalid choice: 'half'" in err and "double" in err and "mixed" in err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) == 2
        assert "--device='cuda' is not available" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
