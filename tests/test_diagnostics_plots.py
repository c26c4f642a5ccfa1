"""The strength plots of ``mixdpo report`` (:func:`alignment.diagnostics.plot_strength`): the exact fitted density
with the start overlaid, a point strength as a marked value, E[beta] and CV over the logged steps, the per-group
quantiles with n. Run folders are written with the strength / run-folder API (no training, no TRL)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

torch.set_num_threads(1)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from alignment import run_dir
from alignment.diagnostics import (
    PLOT_FILES,
    density_figure,
    group_figure,
    plot_strength,
    steps_figure,
    strength_history,
    strength_to_arviz,
)
from alignment.strength import make_strength


def _line(fig, gid):
    lines = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == gid]
    assert len(lines) == 1, [ln.get_gid() for ax in fig.axes for ln in ax.lines]
    return lines[0]


def _texts(fig):
    ax = fig.axes[0]
    texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
    legend = ax.get_legend()
    if legend is not None:
        texts += [t.get_text() for t in legend.get_texts()]
    return texts


def _scipy(strength):
    p = strength.family_params()
    if strength.family == "lognormal":
        return stats.lognorm(s=p["sigma"], scale=math.exp(p["mu"]))
    return stats.gamma(a=p["shape"], scale=1.0 / p["rate"])


@pytest.mark.parametrize(("family", "fitted", "start", "log_axis"), [
    ("lognormal", {"mu": -2.0, "sigma": 0.6}, {"mu": -2.43, "sigma": 0.5}, False),
    ("lognormal", {"mu": -3.5, "sigma": 1.6}, {"mu": -2.43, "sigma": 0.5}, True),  # CV 3.4: log-beta axis
    ("gamma", {"shape": 5.0, "rate": 30.0}, {"shape": 4.0, "rate": 40.0}, False),
    ("gamma", {"shape": 0.4, "rate": 4.0}, {"shape": 4.0, "rate": 40.0}, True),  # CV 1.6, density infinite at 0
])
def test_density_is_the_exact_pdf_and_integrates_to_one(family, fitted, start, log_axis):
    fit, st = make_strength(family, fitted), make_strength(family, start)
    fig = density_figure(fit, st, dpo_beta=0.1)
    ax = fig.axes[0]
    assert (ax.get_xscale() == "log") is log_axis
    for gid, strength in (("fitted", fit), ("start", st)):
        line = _line(fig, gid)
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        pdf = _scipy(strength).pdf(x)
        if log_axis:  # the curve is the density of log beta over a log-scaled beta axis
            np.testing.assert_allclose(y, x * pdf, rtol=1e-10)
            area = np.trapezoid(y, np.log(x))
        else:
            np.testing.assert_allclose(y, pdf, rtol=1e-10)
            area = np.trapezoid(y, x)
        assert area == pytest.approx(1.0, abs=2e-3), (gid, area)
    dpo = _line(fig, "dpo-beta")
    assert list(dpo.get_xdata()) == [0.1, 0.1]
    texts = " ".join(_texts(fig))
    assert ("density of log beta" in texts) is log_axis
    # The legend's moments are the fitted distribution's exact ones.
    m = _scipy(fit)
    assert f"mean {m.mean():.3g}, sd {m.std():.3g}, CV {m.std() / m.mean():.3g}" in texts
    assert "posterior" not in texts.lower() and "learned" not in texts.lower() and "fitted" in texts
    plt.close(fig)


def test_point_strength_is_a_marked_value_not_a_density():
    fig = density_figure(make_strength("point", {"beta": 0.2}), make_strength("point", {"beta": 0.2}), dpo_beta=0.1)
    fitted = _line(fig, "fitted")
    assert list(fitted.get_xdata()) == [0.2, 0.2]  # a vertical line at beta
    marker = _line(fig, "fitted-marker")
    assert list(marker.get_xdata()) == [0.2] and marker.get_marker() == "v"
    # Nothing is a curve: every line has at most two points.
    assert all(len(ln.get_xdata()) <= 2 for ax in fig.axes for ln in ax.lines)
    texts = _texts(fig)
    assert "point strength beta = 0.2" in texts
    assert not any("learned" in t.lower() or "density p" in t.lower() for t in texts)
    plt.close(fig)


def _run_folder(folder, family="lognormal", init=None, groups=True, history=True, fix_mean=True):
    settings = run_dir.strength_settings(family, 0.1, init, fix_mean=fix_mean)
    strength = run_dir.strength_from_settings(settings)
    if family == "lognormal":
        with torch.no_grad():
            strength.log_sigma.fill_(math.log(0.8))  # "trained": the spread moved from its start
    run_dir.save_strength(strength, str(folder), {**settings, "group_column": "group" if groups else None})
    rng = np.random.default_rng(0)
    n = {"a": 4, "b": 11, "c": 25}
    margins = {"row": np.arange(sum(n.values())), "margin": rng.normal(0.5, 2.0, sum(n.values()))}
    if groups:
        margins["group"] = np.array([g for g, k in n.items() for _ in range(k)], dtype=object)
    run_dir.save_margins(str(folder), margins)
    if history:
        log = [{"loss": 0.69, "beta/mean": 0.1, "beta/std": 0.05 + 0.01 * s, "beta/cv": 0.5 + 0.1 * s, "step": s}
               for s in range(1, 6)]
        log.append({"eval_loss": 0.6, "eval_beta/mean": 0.1, "eval_beta/cv": 0.9, "step": 5})
        run_dir.write_run_records(str(folder), {"model": "m"}, {"eval_loss": 0.6}, log_history=log)
    return strength


def test_plot_strength_on_a_run_folder_writes_the_listed_files(tmp_path):
    run = tmp_path / "run"
    strength = _run_folder(run)
    paths = plot_strength(str(run), str(tmp_path / "plots"))
    assert [os.path.basename(p) for p in paths] == list(PLOT_FILES)
    assert "pair_strengths.png" not in PLOT_FILES and not (tmp_path / "plots" / "pair_strengths.png").exists()
    assert all(os.path.getsize(p) > 5000 for p in paths)
    # The attributes carry the exact moments, the starting settings and the logged history.
    idata = strength_to_arviz(str(run), n_draws=50)
    attrs = idata.posterior.attrs
    assert attrs["beta_mean"] == pytest.approx(float(strength.mean().detach()), rel=1e-12)
    assert attrs["beta_cv"] == pytest.approx(math.sqrt(math.expm1(0.8**2)), rel=1e-12)
    assert json.loads(attrs["strength_settings"])["init"] == {"sigma": 0.5}
    np.testing.assert_array_equal(attrs["history_step"], [1, 2, 3, 4, 5])


def test_steps_plot_reads_the_log_history(tmp_path):
    run = tmp_path / "run"
    _run_folder(run)
    history = strength_history(json.loads((run / "log_history.json").read_text()))
    np.testing.assert_allclose(history["cv"], [0.6, 0.7, 0.8, 0.9, 1.0])  # the training entries only
    idata = strength_to_arviz(str(run), n_draws=50)
    np.testing.assert_allclose(idata.posterior.attrs["history_beta_cv"], history["cv"])
    fig = steps_figure(history, make_strength("lognormal", {"mu": -2.6, "sigma": 0.8}), 0.1)
    np.testing.assert_allclose(_line(fig, "beta-mean").get_ydata(), [0.1] * 5)
    np.testing.assert_allclose(_line(fig, "beta-cv").get_xdata(), [1, 2, 3, 4, 5])
    plt.close(fig)
    # No history: no steps file. A checkpoint's trainer_state.json is read when log_history.json is missing.
    bare = tmp_path / "bare"
    _run_folder(bare, history=False)
    names = [os.path.basename(p) for p in plot_strength(str(bare), str(tmp_path / "p1"))]
    assert names == ["strength_density.png", "strength_by_group.png"]
    (bare / "checkpoint-3").mkdir()
    state = {"log_history": [{"beta/mean": 0.1, "beta/cv": 0.7, "step": 3}]}
    (bare / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    names = [os.path.basename(p) for p in plot_strength(str(bare), str(tmp_path / "p2"))]
    assert "strength_steps.png" in names


def test_group_plot_annotates_n_and_shows_every_pair():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.1, 0.01, 20), [0.5], rng.normal(0.2, 0.01, 7)])
    groups = np.array(["x"] * 21 + ["y"] * 7)
    fig = group_figure(values, groups, make_strength("gamma", {"shape": 4.0, "rate": 40.0}))
    ax = fig.axes[0]
    texts = {t.get_gid(): t.get_text() for t in ax.texts}
    assert texts == {"n-x": "n=21", "n-y": "n=7"}
    dots = {c.get_gid(): c.get_offsets() for c in ax.collections if c.get_gid()}
    assert len(dots["pairs-x"]) == 21 and len(dots["pairs-y"]) == 7
    assert 0.5 in np.asarray(dots["pairs-x"])[:, 1]  # the outlier is drawn
    assert "5/25/50/75/95%" in ax.get_title()
    plt.close(fig)


def test_point_run_writes_no_group_plot(tmp_path):
    run = tmp_path / "run"
    _run_folder(run, family="point")
    names = [os.path.basename(p) for p in plot_strength(str(run), str(tmp_path / "plots"))]
    assert names == ["strength_density.png", "strength_steps.png"]
