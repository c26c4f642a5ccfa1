"""ArviZ diagnostics of a MixDPO run: the fitted strength distribution and per-pair posterior strengths.

:func:`strength_to_arviz` returns an ``arviz.InferenceData`` with

- ``posterior``: ``beta`` (chain, draw), draws from the fitted p_phi(beta); and ``beta_pair`` (chain, draw,
  pair), draws from each pair's posterior ``p(beta | h, chosen preferred) ∝ sigmoid(beta h) p_phi(beta)``, by
  sampling-importance-resampling of the fitted draws (exact in the limit, and fine for summaries at 1000 draws);
- ``constant_data``: ``beta_pair_mean`` and ``beta_pair_sd`` (pair), the posterior moments computed by the
  strength's own rule (:meth:`alignment.strength.Strength.posterior`), and ``group`` labels when known;
- ``observed_data``: ``margin`` (pair), the DPO margins h in nats;
- attributes (of the InferenceData and of ``posterior``): the family, its fitted parameters (``param_*``), the
  exact mean, sd and CV of the fitted distribution (``beta_mean``, ``beta_std``, ``beta_cv``), the run's strength
  settings as JSON (``strength_settings``: the starting distribution and DPO's beta) and, when the run logged
  them, E[beta] and CV over training (``history_step``, ``history_beta_mean``, ``history_beta_cv``).

``az.summary(idata, var_names=["beta"])`` summarises the fitted distribution; for annotator-level runs see
:mod:`alignment.annotator_diagnostics`. :func:`density_figure` (exact density, start overlaid, log-beta axis above CV
1), :func:`steps_figure` and :func:`group_figure` return unsaved Figures (tests read their artists by gid: "fitted",
"start", "fitted-marker", "dpo-beta", "beta-mean", "beta-cv", "pairs-<group>", "n-<group>"); :func:`plot_strength`
saves them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch

from mixlogit.validation import check_count

from .annotator_diagnostics import annotator_strength_to_arviz, plot_annotator_strength
from .evaluate import pair_logratios
from .models import load_causal_lm
from .run_dir import (
    LOG_HISTORY_FILE,
    load_strength,
    read_margins,
    read_run_record,
    strength_from_settings,
)
from .strength import make_strength
from .strength_base import Strength

__all__ = ["LOG_AXIS_CV", "PLOT_FILES", "annotator_strength_to_arviz", "density_figure",
           "group_figure", "plot_annotator_strength", "plot_strength", "run_margins", "steps_figure",
           "strength_history", "strength_to_arviz"]

#: Written by :func:`plot_strength`: the fitted strength's exact density (always), E[beta] and CV over the training
#: steps (when the run logged them) and the per-pair strengths by group (with groups and a random strength).
PLOT_FILES = ("strength_density.png", "strength_steps.png", "strength_by_group.png")


def _load_run_models(run_dir: str):
    """Policy, reference and tokenizer of a ``mixdpo train`` run directory."""
    run = read_run_record(run_dir, required=True)
    policy, tokenizer = load_causal_lm(run_dir, adapter_base=run.get("model") if run.get("lora") else None)
    ref = None
    if not run.get("lora"):
        ref, _ = load_causal_lm(run.get("ref_model") or run["model"])
    return policy, ref, tokenizer, run


def run_margins(trainer_or_run_dir, dataset=None) -> dict[str, Any]:
    """Margins of the pairs of ``dataset`` under a trained policy and its reference.

    Args:
        trainer_or_run_dir: a :class:`~alignment.trainer.MixDPOTrainer`, or a ``mixdpo train`` run directory.
        dataset: preference pairs; None takes the trainer's eval dataset, or the margins the run directory saved
            after training (``margins.npz``).

    Returns:
        Dict of arrays over pairs: ``row``, ``margin`` and, when groups are known, ``group``.
    """
    if not isinstance(trainer_or_run_dir, (str, os.PathLike)):
        return trainer_or_run_dir.pair_margins(dataset)
    run_dir = os.fspath(trainer_or_run_dir)
    if dataset is None:
        return read_margins(run_dir)
    policy, ref, tokenizer, run = _load_run_models(run_dir)
    group_column = run.get("group_column")
    if group_column is not None and group_column not in dataset.column_names:
        group_column = None
    return pair_logratios(
        policy, ref, dataset, tokenizer, group_column=group_column, max_length=run.get("max_length")
    )


def _strength_of(trainer_or_run_dir):
    """(strength, family, settings, log_history) of a trainer or a run folder; ``settings`` is the run's
    ``strength.json`` (or the trainer's equivalent), ``log_history`` a list (empty when none was written)."""
    if isinstance(trainer_or_run_dir, (str, os.PathLike)):
        folder = os.fspath(trainer_or_run_dir)
        strength, info = load_strength(folder)
        return strength, info["family"], info, _read_log_history(folder)
    strength = trainer_or_run_dir.strength
    return (strength, strength.family, trainer_or_run_dir.strength_settings,
            list(trainer_or_run_dir.state.log_history))


def _read_log_history(folder: str) -> list[dict[str, Any]]:
    """The run's ``log_history.json``, else the ``log_history`` of its (or its latest checkpoint's)
    ``trainer_state.json``; [] when there is none."""
    candidates = [os.path.join(folder, LOG_HISTORY_FILE), os.path.join(folder, "trainer_state.json")]
    steps = [n for n in os.listdir(folder) if n.startswith("checkpoint-") and n.rsplit("-", 1)[-1].isdigit()]
    if steps:
        latest = max(steps, key=lambda n: int(n.rsplit("-", 1)[-1]))
        candidates.append(os.path.join(folder, latest, "trainer_state.json"))
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return list(data if isinstance(data, list) else data.get("log_history", []))
    return []


def strength_to_arviz(trainer_or_run_dir, dataset=None, n_draws: int = 1000, seed: int = 0):
    """Convert a MixDPO run's fitted strength distribution and per-pair strengths to ``arviz.InferenceData``.

    Args:
        trainer_or_run_dir: a trained :class:`~alignment.trainer.MixDPOTrainer`, or a run directory written by
            ``mixdpo train`` (or any directory with ``strength.json`` + ``strength.pt`` and ``margins.npz``).
        dataset: pairs whose per-pair strengths are wanted (see :func:`run_margins` for None).
        n_draws: draws of beta from the fitted distribution and from each pair's posterior.
        seed: seed of the draws.

    Returns:
        ``arviz.InferenceData`` (see the module docstring for the groups and variables); dims ``chain`` (1),
        ``draw`` (n_draws) and ``pair`` (the kept pairs, coordinate = row index in ``dataset``).
    """
    import arviz as az

    check_count("n_draws", n_draws)
    strength, family, settings, log_history = _strength_of(trainer_or_run_dir)
    margins = run_margins(trainer_or_run_dir, dataset)
    h_np = np.asarray(margins["margin"], dtype=np.float64)
    rows = np.asarray(margins["row"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensors = list(strength.parameters()) + list(strength.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        h = torch.as_tensor(h_np, dtype=torch.float64, device=device)
        post = strength.posterior(h)
        draws = strength.sample(n_draws, generator=gen).detach().double().cpu()
        # Sampling-importance-resampling: the posterior is the prior reweighted by the pair's likelihood.
        logw = torch.nn.functional.logsigmoid(h.cpu()[:, None] * draws[None, :])
        idx = torch.multinomial(torch.softmax(logw, dim=-1), n_draws, replacement=True, generator=gen)
        pair_draws = draws[idx].T.numpy()  # (draw, pair)
        params = {k: float(v) for k, v in strength.family_params().items()}
        moments = {"mean": float(strength.mean()), "std": float(strength.std()), "cv": float(strength.cv())}
    coords = {"pair": rows}
    constant = {
        "beta_pair_mean": post.mean.detach().double().cpu().numpy(),
        "beta_pair_sd": post.std.detach().double().cpu().numpy(),
    }
    dims = {"beta_pair": ["pair"], "beta_pair_mean": ["pair"], "beta_pair_sd": ["pair"], "margin": ["pair"]}
    if "group" in margins:
        constant["group"] = np.asarray(margins["group"]).astype(str)
        dims["group"] = ["pair"]
    attrs = {
        "family": family,
        **{f"param_{k}": v for k, v in params.items()},
        **{f"beta_{k}": v for k, v in moments.items()},
        "strength_settings": json.dumps(settings),
    }
    history = strength_history(log_history)
    if history is not None:
        attrs.update({f"history_{k}" if k == "step" else f"history_beta_{k}": v for k, v in history.items()})
    idata = az.from_dict(
        posterior={"beta": draws.numpy()[None, :], "beta_pair": pair_draws[None, :, :]},
        observed_data={"margin": h_np},
        constant_data=constant,
        coords=coords,
        dims=dims,
        attrs=attrs,
    )
    # from_dict keeps `attrs` on the InferenceData; the posterior group gets them too, where xarray users look.
    idata.posterior.attrs.update(attrs)
    return idata


# ---------------------------------------------------------------------------------------------- figures
#: Above this CV (of the fitted or the starting distribution) the density plot has a log-beta axis.
LOG_AXIS_CV = 1.0
# Each curve spans its distribution's central 1 - 2 * _TAIL (its integral over the plot is 1 - 2 * _TAIL).
_TAIL = 2.5e-4
_GRID = 800
# Quantiles of the per-group plot: whiskers, box, median.
GROUP_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _moments(strength: Strength) -> dict[str, float]:
    """The exact mean, sd and CV of ``strength`` (the family's own formulas)."""
    with torch.no_grad():
        return {"mean": float(strength.mean()), "sd": float(strength.std()), "cv": float(strength.cv())}


def _describe(strength: Strength, what: str) -> str:
    params = ", ".join(f"{k}={v:.3g}" for k, v in strength.family_params().items())
    m = _moments(strength)
    return f"{what} {strength.family}({params})\nmean {m['mean']:.3g}, sd {m['sd']:.3g}, CV {m['cv']:.3g}"


def _grid(dists, log_axis: bool) -> np.ndarray:
    """x values covering each distribution's central 1 - 2 * _TAIL, finely for each (a narrow fitted density next
    to a wide start keeps its shape)."""
    parts = []
    for dist in dists:
        lo, hi = dist.ppf(_TAIL), dist.isf(_TAIL)
        if log_axis:
            lo = max(lo, hi * 1e-12)  # a Gamma of tiny shape: do not span hundreds of decades
            parts.append(np.geomspace(lo, hi, _GRID))
        else:
            parts.append(np.linspace(lo, hi, _GRID))
    return np.unique(np.concatenate(parts))


def density_figure(fitted: Strength, start: Strength | None = None, dpo_beta: float | None = None):
    """The fitted strength's exact density with the starting one overlaid (see the module docstring)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    dist = fitted.exact_distribution()
    start_dist = start.exact_distribution() if start is not None else None
    extra = None  # legend entries of a second y axis
    if dist is None:
        _point_axes(ax, fitted, start, fitted.family)
    else:
        dists = [dist] + ([start_dist] if start_dist is not None else [])
        cvs = [_moments(fitted)["cv"]] + ([_moments(start)["cv"]] if start_dist is not None else [])
        log_axis = max(cvs) > LOG_AXIS_CV
        x = _grid(dists, log_axis)
        ys = {w: (x * d.pdf(x) if log_axis else d.pdf(x)) for d, w in ((dist, "fitted"), (start_dist, "start")) if d}
        # A fitted spike would flatten the start to nothing on a shared axis: the start then gets its own (right).
        apart = bool("start" in ys and ys["fitted"].max() > 10 * ys["start"].max())
        ax.plot(x, ys["fitted"], gid="fitted", label=_describe(fitted, "fitted"), color="C0", lw=2)
        if "start" in ys:
            right = ax.twinx() if apart else ax
            right.plot(x, ys["start"], gid="start", label=_describe(start, "start") + (" (right axis)" * apart),
                       color="C1", lw=1.5, ls="--")
            right.set_ylim(bottom=0.0)
            if apart:
                right.set_ylabel("start's density (right axis)", color="C1")
                extra = right.get_legend_handles_labels()
        fitted_mean = _moments(fitted)["mean"]
        ax.axvline(fitted_mean, color="C0", lw=1, ls="-.", label=f"fitted mean {fitted_mean:.3g}")
        if log_axis:
            ax.set_xscale("log")
            ax.set_xlabel("beta (log scale)")
            ax.set_ylabel("density of log beta: beta * p(beta)")
        else:
            ax.set_xlim(left=0.0)
            ax.set_xlabel("beta")
            ax.set_ylabel("density p(beta)")
        ax.set_ylim(bottom=0.0)
        ax.set_title(f"Fitted strength distribution ({fitted.family}, exact density)")
    if dpo_beta is not None:
        ax.axvline(dpo_beta, color="k", ls=":", lw=1.5, gid="dpo-beta", label=f"DPO beta {dpo_beta:.3g}")
    handles, labels = ax.get_legend_handles_labels()
    if extra:
        handles, labels = handles + extra[0], labels + extra[1]
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


def _point_axes(ax, fitted: Strength, start: Strength | None, family: str) -> None:
    """A point mass (or a family with no known density) as a marked value: a vertical line with a marker."""
    if family != "point":
        raise ValueError(f"no exact density is known for the {family!r} strength family; add it to "
                         "its Strength.exact_distribution")
    b = fitted.family_params()["beta"]
    ax.axvline(b, color="C0", lw=2, gid="fitted", label=f"point strength beta = {b:.4g}")
    ax.plot([b], [0.9], "v", color="C0", ms=12, transform=ax.get_xaxis_transform(), gid="fitted-marker")
    values = [b]
    if start is not None:
        b0 = start.family_params()["beta"]
        if not math.isclose(b0, b, rel_tol=1e-9):
            ax.axvline(b0, color="C1", lw=1.5, ls="--", gid="start", label=f"start point strength beta = {b0:.4g}")
            values.append(b0)
    ax.set_xlim(0.0, 2.0 * max(values))
    ax.set_yticks([])
    ax.set_xlabel("beta")
    ax.set_title("Point strength: one beta for every pair (no density)")


def strength_history(log_history) -> dict[str, np.ndarray] | None:
    """``step``, ``mean`` and ``cv`` of the training entries of a trainer's ``log_history`` (those that logged
    ``beta/mean`` and ``beta/cv``); None when there are none."""
    rows = [e for e in (log_history or []) if "beta/mean" in e and "beta/cv" in e and "step" in e]
    if not rows:
        return None
    return {"step": np.array([float(e["step"]) for e in rows]),
            "mean": np.array([float(e["beta/mean"]) for e in rows]),
            "cv": np.array([float(e["beta/cv"]) for e in rows])}


def steps_figure(history: dict[str, np.ndarray], fitted: Strength | None = None, dpo_beta: float | None = None):
    """E[beta] and CV over the training steps (``history`` of :func:`strength_history`)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    step = history["step"]
    top.plot(step, history["mean"], "o-", ms=3, color="C0", gid="beta-mean", label="E[beta] logged in training")
    bottom.plot(step, history["cv"], "o-", ms=3, color="C2", gid="beta-cv", label="CV logged in training")
    if fitted is not None:
        m = _moments(fitted)
        what = "point strength" if fitted.family == "point" else "fitted"
        top.plot([step[-1]], [m["mean"]], "*", ms=12, color="C3", label=f"{what}, end of training: {m['mean']:.3g}")
        bottom.plot([step[-1]], [m["cv"]], "*", ms=12, color="C3", label=f"{what}, end of training: {m['cv']:.3g}")
    if dpo_beta is not None:
        top.axhline(dpo_beta, color="k", ls=":", lw=1, label=f"DPO beta {dpo_beta:.3g}")
    top.set_ylabel("E[beta]")
    bottom.set_ylabel("CV of beta")
    bottom.set_xlabel("training step (values averaged over each logging window)")
    for ax in (top, bottom):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if fitted is not None and fitted.family == "point":
        top.set_title("Point strength over training")
    else:
        top.set_title("Strength distribution over training" + (f" ({fitted.family})" if fitted is not None else ""))
    fig.tight_layout()
    return fig


def group_figure(values: np.ndarray, groups: np.ndarray, fitted: Strength | None = None,
                 ylabel: str = "pair's posterior mean E[beta | margin h, chosen won]"):
    """Per group: quantile intervals of ``values`` (one per pair), every pair as a dot, ``n`` written above."""
    plt = _pyplot()
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups).astype(str)
    names = sorted(set(groups.tolist()))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2.5), 4.4))
    rng = np.random.default_rng(0)
    for i, g in enumerate(names):
        v = values[groups == g]
        q05, q25, q50, q75, q95 = np.quantile(v, GROUP_QUANTILES)
        ax.vlines(i, q05, q95, color="k", lw=1.2, label="5-95%" if i == 0 else None)
        ax.vlines(i, q25, q75, color="C0", lw=7, alpha=0.6, label="25-75%" if i == 0 else None)
        ax.hlines(q50, i - 0.1, i + 0.1, color="C3", lw=2, label="median" if i == 0 else None)
        ax.scatter(i + 0.32 + rng.uniform(-0.08, 0.08, v.size), v, s=9, color="0.35", alpha=0.6,
                   gid=f"pairs-{g}", label="pairs" if i == 0 else None)
        ax.text(i, 1.01, f"n={v.size}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, gid=f"n-{g}")
    if fitted is not None:
        mean = _moments(fitted)["mean"]
        ax.axhline(mean, color="C0", ls="-.", lw=1, label=f"fitted E[beta] {mean:.3g}")
    positive = values[values > 0]
    if positive.size == values.size and values.size and positive.max() / positive.min() > 10.0:
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=0 if len(names) <= 6 else 90)
    ax.set_xlim(-0.6, len(names) - 0.2)
    ax.set_xlabel("group (n = pairs in the group)")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title("Per-pair strength by group: quantiles 5/25/50/75/95%", pad=18)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _strengths_of_idata(idata) -> tuple[Any, Any, dict[str, Any]]:
    """(fitted strength, starting strength or None, settings) rebuilt from an InferenceData's attributes."""
    attrs = dict(idata.posterior.attrs)
    family = attrs.get("family")
    params = {k.removeprefix("param_"): float(v) for k, v in attrs.items() if k.startswith("param_")}
    if family is None or not params:
        raise ValueError("this InferenceData has no 'family' and 'param_*' attributes: make it with "
                         "strength_to_arviz")
    fitted = make_strength(family, init=params)
    settings = json.loads(attrs["strength_settings"]) if "strength_settings" in attrs else {}
    start = strength_from_settings(settings) if settings else None
    return fitted, start, settings


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strength(run_dir_or_idata, out_dir: str, dataset=None, dpo_beta: float | None = None) -> list[str]:
    """Write PNG plots of the fitted strength distribution, its course over training and the per-group strengths.

    Args:
        run_dir_or_idata: an ``InferenceData`` from :func:`strength_to_arviz`, a trainer, or a run directory.
        out_dir: directory for the PNG files (created).
        dataset: passed to :func:`strength_to_arviz` when the first argument is not an ``InferenceData``.
        dpo_beta: DPO's beta, drawn as a reference line (default: the run's ``beta``).

    Returns:
        Paths of the written files (the figures of this module):

        - ``strength_density.png``: the exact density of the fitted p_phi(beta) with the run's starting
          distribution overlaid, the fitted mean and DPO's beta as vertical lines; the legend gives each one's
          parameters and exact mean, sd and CV. With a CV above 1 the axis is beta on a log scale and the curve
          the density of log beta. A point strength is a marked value ("point strength"), not a density.
        - ``strength_steps.png`` (only when the run logged ``beta/mean`` and ``beta/cv``): E[beta] and CV over
          the training steps, with the fitted values at the end.
        - ``strength_by_group.png`` (only with groups and a random strength): per group the 5/25/50/75/95%
          quantiles of the pairs' posterior means of beta, every pair as a dot, and the pairs per group (n).
    """
    idata = run_dir_or_idata
    if not hasattr(idata, "posterior"):
        idata = strength_to_arviz(run_dir_or_idata, dataset)
    fitted, start, settings = _strengths_of_idata(idata)
    if dpo_beta is None:
        dpo_beta = settings.get("beta")
    attrs = dict(idata.posterior.attrs)
    os.makedirs(out_dir, exist_ok=True)
    paths = [_save(density_figure(fitted, start, dpo_beta), os.path.join(out_dir, PLOT_FILES[0]))]
    if "history_step" in attrs:
        history = {"step": np.asarray(attrs["history_step"], dtype=np.float64).ravel(),
                   "mean": np.asarray(attrs["history_beta_mean"], dtype=np.float64).ravel(),
                   "cv": np.asarray(attrs["history_beta_cv"], dtype=np.float64).ravel()}
        paths.append(_save(steps_figure(history, fitted, dpo_beta), os.path.join(out_dir, PLOT_FILES[1])))
    const = idata.constant_data
    if "group" in const and fitted.family != "point":
        fig = group_figure(const["beta_pair_mean"].values, const["group"].values, fitted)
        paths.append(_save(fig, os.path.join(out_dir, PLOT_FILES[2])))
    return paths
