"""The random scale (S-MNL, ``scale="lognormal"``) in the Bayesian estimators: the model's likelihood is the
kernel's, and on the Netherlands train panel NUTS and SVI agree with MSL's quadrature estimate of sd.scale."""

from __future__ import annotations

import warnings

import pytest
import torch

import mixlogit as ml
from mixlogit.bayes.model import prepare
from mixlogit.datasets import TRAIN_ATTRIBUTES, TRAIN_COLUMNS
from mixlogit.draws import IntegrationRule
from mixlogit.msl import MSLProblem


@pytest.fixture(scope="module")
def train():
    return ml.ChoiceData.from_long(ml.datasets.load_train(), **TRAIN_COLUMNS)


@pytest.fixture(scope="module")
def smnl():
    return ml.MixedLogit(fixed=TRAIN_ATTRIBUTES, scale="lognormal")


@pytest.fixture(scope="module")
def msl(train, smnl):
    return smnl.fit(train, draws=128, draw_type="quadrature")


def test_model_likelihood_with_a_scale_is_the_kernels(train):
    # A random price and a random scale: per unit one z of (price, scale), against MSL's kernel on the same point.
    model = ml.MixedLogit(random={"price": "normal"}, fixed=[a for a in TRAIN_ATTRIBUTES if a != "price"],
                          scale="lognormal")
    hm = prepare(model, train, None)
    assert hm.Kz == 2 and hm.dim == 3 + 2 + 1 and "sd.scale" in hm.priors
    theta = torch.tensor([-3.0, -0.5, -1.5, -0.8, 0.6, 0.9], dtype=torch.float64)  # time change comfort price sd sd.scale
    z = torch.randn(hm.n_units, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rule = IntegrationRule(z=z.unsqueeze(1), log_weights=torch.zeros(1, dtype=torch.float64), kind="test")
    ref = MSLProblem(model.spec_for(train), hm.design, rule).unit_cond_loglik(theta, slice(None))[:, 0]
    torch.testing.assert_close(hm.loglik(theta, z, slice(None)), ref, rtol=0, atol=1e-12)
    g = hm.globals_from_theta(theta.numpy())
    torch.testing.assert_close(hm.theta(g), theta, rtol=0, atol=1e-12)  # sd.scale round-trips through log tau
    torch.testing.assert_close(hm.theta(hm.natural(hm.standardized(g))), theta, rtol=0, atol=1e-12)


def test_nuts_and_svi_find_msls_scale(train, smnl, msl):
    assert msl.params["sd.scale"] == pytest.approx(1.099, abs=1e-3)  # the README's quadrature row
    se = float(msl.bse["sd.scale"])  # 0.117
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nuts = smnl.fit(train, method="nuts", num_samples=300, num_warmup=300, chains=1, seed=0)
    svi = smnl.fit(train, method="svi", seed=0)
    assert nuts.priors["sd.scale"] == "halfnormal(1)"
    # Measured: NUTS 1.16 (sd .12), SVI 1.16 (sd .11) against MSL 1.099 (SE .117).
    for res in (nuts, svi):
        assert abs(res.params["sd.scale"] - msl.params["sd.scale"]) < 2 * se
        assert 0.7 < res.bse["sd.scale"] / se < 1.4
    assert abs(svi.params["sd.scale"] - nuts.params["sd.scale"]) < 0.5 * nuts.bse["sd.scale"]
    assert svi.trust_check().usable
    row = svi.heterogeneity().loc["scale"]
    assert row["mean"] == pytest.approx(1.0) and 1.2 < row["sd"] < 2.4  # sd of s = sqrt(exp(tau^2) - 1)


def test_guides_that_need_a_linear_predictor_refuse_a_scale(train, smnl):
    for guide in ("fullrank", "amortized"):
        with pytest.raises(ValueError, match=f"guide='{guide}' builds each unit's posterior on the linear predictor"
                                             ".*guide='marginal'"):
            smnl.fit(train, method="svi", guide=guide)
