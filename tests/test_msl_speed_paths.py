"""The fast paths of the MSL objective against the reference paths they replace.

The kernel's closed-form gradient (:class:`mixlogit.kernel._LogitKernel`) against plain autograd through the
kernel's operations (``closed_form_grad=False``, the old path), and the thread pool over chunks against the
serial loop, on random designs with unavailable alternatives, unbalanced panels, fixed, lognormal and
correlated coefficients and a random scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import mixlogit as ml
from mixlogit import msl


def _random_panel(seed: int, n_persons: int = 23, n_alts: int = 4) -> ml.ChoiceData:
    """Unbalanced panel (1 to 5 situations per person), some alternatives unavailable, choices from a logit."""
    rng = np.random.default_rng(seed)
    rows, chid = [], 0
    for person in range(n_persons):
        weight = rng.uniform(0.5, 2.0)
        for _ in range(rng.integers(1, 6)):
            avail = rng.random(n_alts) > 0.25
            avail[rng.integers(n_alts)] = True
            x = rng.normal(size=(n_alts, 4))
            u = x @ np.array([1.0, -0.5, 0.8, 0.3]) + rng.gumbel(size=n_alts)
            chosen = int(np.argmax(np.where(avail, u, -np.inf)))
            for j in range(n_alts):
                rows.append({"id": person, "chid": chid, "alt": j, "choice": int(j == chosen), "av": int(avail[j]),
                             "x1": x[j, 0], "x2": x[j, 1], "x3": abs(x[j, 2]) + 0.1, "x4": x[j, 3], "w": weight})
            chid += 1
    return ml.ChoiceData.from_long(pd.DataFrame(rows), choice="choice", alt="alt", situation="chid", panel="id",
                                   avail="av", weights="w")


MODELS = {
    "fixed+normal": {"random": {"x1": "normal", "x2": "normal"}, "fixed": ["x4"]},
    "lognormal": {"random": {"x3": "lognormal", "x1": "normal"}, "fixed": ["x2"]},
    "correlated": {"random": {"x1": "normal", "x2": "normal"}, "correlated": True},
    "scale": {"fixed": ["x1", "x2"], "random": {"x3": "normal"}, "scale": "lognormal"},
    "bounded": {"random": {"x1": "uniform", "x2": "triangular", "x3": "truncated_normal", "x4": "-lognormal"}},
    "censored+asc": {"random": {"x1": "censored_normal"}, "fixed": ["x2"], "asc": True},
}


def _problem(name: str, seed: int = 0, **kw) -> tuple[msl.MSLProblem, np.ndarray]:
    data = _random_panel(seed)
    problem = ml.MixedLogit(**MODELS[name]).make_problem(data, draws=37, draw_type="halton", seed=seed)
    for key, value in kw.items():
        setattr(problem, key, value)
    rng = np.random.default_rng(seed + 100)
    return problem, rng.normal(scale=0.4, size=problem.spec.n_params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_closed_form_gradient_equals_autograd(name):
    fast, theta = _problem(name, workers=1)
    slow, _ = _problem(name, workers=1, closed_form_grad=False, closed_form_hessian=False)
    assert fast._needs_avail and fast._needs_mask  # the design exercises both masks
    v1, g1 = fast.value_and_grad(theta)
    v0, g0 = slow.value_and_grad(theta)
    assert v1 == pytest.approx(v0, rel=1e-12, abs=1e-8)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-10 * np.abs(g0).max())
    np.testing.assert_allclose(fast.scores(theta), slow.scores(theta), rtol=1e-9, atol=1e-10 * np.abs(g0).max())
    # Standard errors from the Hessian and the scores agree as well.
    h1, h0 = fast.hessian(theta), slow.hessian(theta)
    np.testing.assert_allclose(h1, h0, rtol=1e-9, atol=1e-10 * np.abs(h0).max())


@pytest.mark.parametrize("name", ["fixed+normal", "scale"])
def test_thread_pool_is_bit_identical_to_the_serial_loop(name):
    serial, theta = _problem(name, workers=1)
    pooled, _ = _problem(name, workers=3)
    assert len(serial.chunks) >= 2 * msl.MAX_WORKERS  # small designs are cut finely enough for every thread
    before = torch.get_num_threads()
    v1, g1 = serial.value_and_grad(theta)
    v2, g2 = pooled.value_and_grad(theta)
    assert torch.get_num_threads() == before  # the user's setting is restored
    assert v1 == v2 and np.array_equal(g1, g2)
    assert serial.loglik(theta) == pooled.loglik(theta)
    assert np.array_equal(serial.scores(theta), pooled.scores(theta))
    assert np.array_equal(serial.hessian(theta), pooled.hessian(theta))


def test_thread_pool_restores_threads_after_an_error():
    before = torch.get_num_threads()

    def fail(i):
        if i == 2:
            raise ValueError("boom")
        return i

    with pytest.raises(ValueError, match="boom"):
        msl.map_chunks(fail, range(5), workers=2)
    assert torch.get_num_threads() == before
    assert msl.map_chunks(lambda i: i * i, range(7), workers=3) == [i * i for i in range(7)]


def test_default_workers_follow_torch_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert msl.default_workers() == 1
    finally:
        torch.set_num_threads(before)
    assert 1 <= msl.default_workers() <= msl.MAX_WORKERS


def test_fit_is_the_same_with_either_gradient(monkeypatch):
    data = _random_panel(3, n_persons=60)
    model = ml.MixedLogit(random={"x1": "normal", "x3": "lognormal"}, fixed=["x2"])
    fast = model.fit(data, draws=50)
    post_init = msl.MSLProblem.__post_init__

    def old_path(self):
        post_init(self)
        self.closed_form_grad = self.closed_form_hessian = False

    monkeypatch.setattr(msl.MSLProblem, "__post_init__", old_path)
    slow = model.fit(data, draws=50)
    assert fast.loglik == pytest.approx(slow.loglik, abs=1e-8)
    np.testing.assert_allclose(fast.params, slow.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast.bse, slow.bse, rtol=1e-6)
