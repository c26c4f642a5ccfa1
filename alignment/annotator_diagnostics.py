"""ArviZ and plots of annotator-level MixDPO (``strength_level="annotator"``): each annotator's posterior strength.

:func:`annotator_strength_to_arviz` returns an ``arviz.InferenceData`` with

- ``posterior``: ``beta`` (chain, draw), draws from the learned population p_phi(beta), which is also the strength
  of an annotator unseen in training; and ``beta_annotator`` (chain, draw, annotator), draws from each annotator's
  posterior ``p(beta | its pairs)``: the discrete distribution over the nodes of the 512-node composite rule
  (:func:`alignment.panel.dense_strength`) with the Revelt-Train weights ``q_a(r) ∝ w_r prod_{j in a}
  sigmoid(beta_r h_j)`` of the cached margins. That is the distribution whose moments ``strength_by_annotator.csv``
  holds, so ``az.summary``'s means agree with the table's to Monte Carlo error (sd / sqrt(n_draws));
- ``constant_data`` (annotator): ``beta_annotator_mean``, ``beta_annotator_sd``, ``beta_annotator_q05``,
  ``beta_annotator_q95`` (the exact moments and 90% interval, the table's columns) and ``n_pairs``;
- coordinates: ``annotator`` = the annotator labels; with a group column also ``group`` (annotator), a non-index
  coordinate of both groups (``idata.posterior["beta_annotator"].groupby("group")``);
- attributes: the family, its parameters and the population's ``beta_mean``, ``beta_q05``, ``beta_q95``.

So ``az.summary(idata, var_names=["beta_annotator"], kind="stats")`` lists the annotators and
``az.plot_forest(idata, var_names=["beta_annotator"], combined=True, hdi_prob=0.9)`` draws them.
:func:`plot_annotator_strength` writes the caterpillar plot ``strength_by_annotator.png`` (``mixdpo report`` does
for a run with ``strength_by_annotator.csv``); it needs only the table and the strength, no draws.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mixlogit.persistence import read_json
from mixlogit.validation import check_count

from .panel import annotator_log_weights, annotator_posterior, dense_strength, rule_points
from .run_dir import ANNOTATORS_FILE, MARGIN_CACHE_NAME, STRENGTH_BY_ANNOTATOR, load_strength

__all__ = ["ANNOTATOR_PLOT_FILE", "annotator_group_summary", "annotator_strength_figure", "annotator_strength_to_arviz",
           "plot_annotator_strength", "population_strength", "read_annotator_table"]

#: Written by :func:`plot_annotator_strength`.
ANNOTATOR_PLOT_FILE = "strength_by_annotator.png"
_TABLE_COLUMNS = ("annotator", "n_pairs", "mean", "sd", "q05", "q95")
# Above this ratio of the largest 95% end to the smallest 5% end the strength axis is logarithmic.
_LOG_SPREAD = 10.0
# Annotators coloured by group (and named on the axis) only up to these counts.
_MAX_COLOURED_GROUPS, _MAX_NAMED_ANNOTATORS = 10, 30


def read_annotator_table(run_dir: str):
    """The ``strength_by_annotator.csv`` of a run folder as a DataFrame (labels and groups as text)."""
    import pandas as pd

    path = os.path.join(run_dir, STRENGTH_BY_ANNOTATOR)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} has no {STRENGTH_BY_ANNOTATOR}: it was not trained with "
                                "strength_level='annotator' (or its trainer's save_model has not run).")
    table = pd.read_csv(path, dtype={"annotator": str, "group": str}, keep_default_na=False)
    missing = [c for c in _TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks the column(s) {missing} (it needs {list(_TABLE_COLUMNS)})")
    return table


def _strength_of(source):
    if isinstance(source, (str, os.PathLike)):
        strength, info = load_strength(os.fspath(source))
        return strength, info["family"]
    return source.strength, source.strength.family


def population_strength(strength, level: float = 0.9) -> dict[str, float]:
    """The population p_phi(beta), the strength of an unseen annotator: ``mean``, ``sd``, ``low``, ``high`` (the
    central ``level`` interval), on the same dense rule as the annotators' posteriors."""
    empty = annotator_posterior(dense_strength(strength), torch.zeros(0, dtype=torch.float64),
                                torch.zeros(0, dtype=torch.long), 1, level)
    return {k: float(empty[k][0]) for k in ("mean", "sd", "low", "high")}


def _panel_inputs(source) -> tuple[torch.Tensor, torch.Tensor, list[str], Any]:
    """Cached margins (n,), their annotator ids (n,), the labels and the table, of a trainer or a run folder."""
    if not isinstance(source, (str, os.PathLike)):
        panel = getattr(source, "panel", None)
        if panel is None:
            raise ValueError("this trainer has strength_level='pair': it has no per-annotator strengths")
        h, ids = panel.cached(source.margin_cache)
        return h, ids, list(panel.index.labels), panel.table(source.strength, source.margin_cache)
    folder = os.fspath(source)
    table = read_annotator_table(folder)
    for name in (ANNOTATORS_FILE, MARGIN_CACHE_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder!r} has {STRENGTH_BY_ANNOTATOR} but no {name}, which the posterior "
                                    "draws need; pass the trainer instead (or plot the table alone with "
                                    "plot_annotator_strength).")
    index = read_json(os.path.join(folder, ANNOTATORS_FILE))
    if "annotator_of_row" not in index:
        raise ValueError(f"{os.path.join(folder, ANNOTATORS_FILE)} has no 'annotator_of_row' (it was written "
                         "before the run folders kept it); pass the trainer instead.")
    labels = [str(v) for v in index["labels"]]
    if labels != table["annotator"].tolist():
        raise ValueError(f"{folder!r}: the annotators of {STRENGTH_BY_ANNOTATOR} are not those of {ANNOTATORS_FILE}")
    margins = torch.load(os.path.join(folder, MARGIN_CACHE_NAME), map_location="cpu", weights_only=True)["margins"]
    of_row = torch.as_tensor(index["annotator_of_row"], dtype=torch.long)
    if of_row.numel() != margins.numel():
        raise ValueError(f"{folder!r}: {MARGIN_CACHE_NAME} has {margins.numel()} rows, {ANNOTATORS_FILE} "
                         f"{of_row.numel()}: they are not of one run")
    seen = ~torch.isnan(margins)
    return margins[seen].double(), of_row[seen], labels, table


def annotator_strength_to_arviz(trainer_or_run_dir, n_draws: int = 1000, seed: int = 0):
    """Each annotator's posterior strength as ``arviz.InferenceData`` with an ``annotator`` dim.

    Args:
        trainer_or_run_dir: a :class:`~alignment.trainer.MixDPOTrainer` with ``strength_level="annotator"``, or its
            run folder (``strength.json``/``.pt``, ``strength_by_annotator.csv``, ``annotators.json`` and
            ``margin_cache.pt``: what ``mixdpo train`` and ``trainer.save_model`` write).
        n_draws: draws from the population and from each annotator's posterior.
        seed: seed of the draws.

    Returns:
        ``arviz.InferenceData`` (groups and variables in the module docstring); dims ``chain`` (1), ``draw``
        (n_draws) and ``annotator`` (A, coordinate = the labels, in the order of the table).
    """
    import arviz as az

    check_count("n_draws", n_draws)
    strength, family = _strength_of(trainer_or_run_dir)
    h, ids, labels, table = _panel_inputs(trainer_or_run_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dense = dense_strength(strength)
        q = torch.exp(annotator_log_weights(dense, h, ids, len(labels))).cpu()
        nodes, _ = rule_points(dense, torch.float64, "cpu")
        draws = nodes[torch.multinomial(q, n_draws, replacement=True, generator=gen)].T.numpy()  # (draw, A)
        population = strength.sample(n_draws, generator=gen).detach().double().cpu().numpy()
        params = {f"param_{k}": float(v) for k, v in strength.family_params().items()}
    pop = population_strength(strength)
    attrs = {"family": family, **params, "beta_mean": pop["mean"], "beta_q05": pop["low"], "beta_q95": pop["high"]}
    constant = {f"beta_annotator_{c}": table[c].to_numpy(np.float64) for c in ("mean", "sd", "q05", "q95")}
    constant["n_pairs"] = table["n_pairs"].to_numpy(np.int64)
    idata = az.from_dict(posterior={"beta": population[None], "beta_annotator": draws[None]},
                         constant_data=constant, coords={"annotator": labels},
                         dims={"beta_annotator": ["annotator"], **{k: ["annotator"] for k in constant}}, attrs=attrs)
    if "group" in table.columns:
        group = ("annotator", table["group"].astype(str).to_numpy())
        idata.posterior = idata.posterior.assign_coords(group=group)
        idata.constant_data = idata.constant_data.assign_coords(group=group)
    idata.posterior.attrs.update(attrs)
    return idata


def _summaries(source):
    """(table, population dict, family) of an InferenceData of :func:`annotator_strength_to_arviz`, a trainer or a
    run folder (the table's columns: annotator, n_pairs, mean, q05, q95 and group when known)."""
    import pandas as pd

    if hasattr(source, "posterior"):
        const, attrs = source.constant_data, dict(source.posterior.attrs)
        table = pd.DataFrame({"annotator": const["annotator"].values.astype(str), "n_pairs": const["n_pairs"].values,
                              **{c: const[f"beta_annotator_{c}"].values for c in ("mean", "q05", "q95")}})
        if "group" in const.coords:
            table["group"] = const["group"].values.astype(str)
        pop = {"mean": attrs["beta_mean"], "low": attrs["beta_q05"], "high": attrs["beta_q95"]}
        return table, pop, attrs.get("family", "?")
    strength, family = _strength_of(source)
    if isinstance(source, (str, os.PathLike)):
        table = read_annotator_table(os.fspath(source))
    else:
        if getattr(source, "panel", None) is None:
            raise ValueError("this trainer has strength_level='pair': it has no per-annotator strengths")
        table = source.panel.table(strength, source.margin_cache)
    return table, population_strength(strength), family


def annotator_group_summary(table):
    """Per group of a per-annotator table: ``n_annotators``, ``n_pairs`` and the mean and sd of the annotators'
    posterior means (a DataFrame indexed by group, sorted by that mean); None without a ``group`` column."""
    if "group" not in table.columns:
        return None
    by = table.groupby("group", sort=True).agg(n_annotators=("annotator", "size"), n_pairs=("n_pairs", "sum"),
                                               mean_of_means=("mean", "mean"), sd_of_means=("mean", "std"))
    return by.sort_values("mean_of_means")


def annotator_strength_figure(source):
    """The caterpillar plot of :func:`plot_annotator_strength` as a matplotlib Figure (not saved, not closed).

    Axes: ``fig.axes[0]`` the annotators (its scatter's points are ``(rank, posterior mean)`` in increasing order),
    ``fig.axes[1]`` the groups when there is a group column.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    table, pop, family = _summaries(source)
    table = table.sort_values("mean", kind="stable").reset_index(drop=True)
    groups = annotator_group_summary(table)
    fig, axes = plt.subplots(1, 1 if groups is None else 2, figsize=(7, 4.2) if groups is None else (11, 4.6),
                             sharey=True, squeeze=False, gridspec_kw={"width_ratios": [3] if groups is None
                                                                      else [3, 2]})
    ax = axes[0, 0]
    x = np.arange(len(table))
    names = [] if groups is None else groups.index.tolist()
    colour = {g: f"C{i}" for i, g in enumerate(names)} if len(names) <= _MAX_COLOURED_GROUPS else {}
    colours = [colour.get(g, "C0") for g in table["group"]] if colour else "C0"
    ax.vlines(x, table["q05"], table["q95"], colors=colours, lw=1.2 if len(x) <= 100 else 0.6, alpha=0.7)
    ax.scatter(x, table["mean"], c=colours, s=14 if len(x) <= 100 else 5, zorder=3)

    def population(axis, label=True):
        axis.axhspan(pop["low"], pop["high"], color="0.6", alpha=0.2,
                     label="population 90% (unseen annotator)" if label else None)
        axis.axhline(pop["mean"], color="k", ls="--", lw=1, label=f"population mean {pop['mean']:.3g}" if label
                     else None)

    population(ax)
    for g, c in colour.items():
        ax.scatter([], [], c=c, s=14, label=g)
    if len(x) <= _MAX_NAMED_ANNOTATORS:
        ax.set_xticks(x, table["annotator"], rotation=90, fontsize=7)
    spread = float(table["q95"].max()) / max(float(table["q05"].min()), 1e-300)
    if spread > _LOG_SPREAD:
        ax.set_yscale("log")
        if spread < 1e3:  # few decades: ticks at 1, 2 and 5 times the powers of ten, in plain numbers
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(f"annotator, sorted by posterior mean ({len(x)} annotators)")
    ax.set_ylabel("posterior beta: mean and 90% interval")
    ax.set_title(f"Per-annotator strength ({family})")
    ax.legend(fontsize=7, loc="upper left")
    if groups is not None:
        gx = axes[0, 1]
        population(gx, label=False)
        rng = np.random.default_rng(0)
        for i, g in enumerate(names):
            means = table.loc[table["group"] == g, "mean"].to_numpy()
            gx.scatter(i + rng.uniform(-0.15, 0.15, means.size), means, s=8, color=colour.get(g, "C0"), alpha=0.6)
            gx.hlines(groups.loc[g, "mean_of_means"], i - 0.35, i + 0.35, color="k", lw=2)
        ticks = [f"{g} (n={int(groups.loc[g, 'n_annotators'])})" for g in names]
        gx.set_xticks(np.arange(len(names)), ticks, rotation=0 if len(names) <= 5 else 90,
                      fontsize=7 if len(names) <= 25 else 5)
        gx.set_xlabel("group (bar: mean of its annotators' posterior means)")
        gx.set_title("Per-group strength")
    fig.tight_layout()
    return fig


def plot_annotator_strength(source, out_dir: str) -> str:
    """Write the caterpillar plot ``strength_by_annotator.png`` of the per-annotator posterior strengths.

    Args:
        source: an ``InferenceData`` of :func:`annotator_strength_to_arviz`, a trainer, or a run folder (its
            ``strength_by_annotator.csv`` and strength alone).
        out_dir: folder of the PNG (created).

    Returns:
        The path. Left panel: annotators sorted by posterior mean, each with its 90% interval, over the population
        p_phi(beta) (its mean, and its 90% interval as a band: the strength of an unseen annotator); the strength
        axis is logarithmic when the intervals span more than a factor of 10. With a group column a right panel
        shows each group's annotators' posterior means (dots) and their mean (a bar), with n annotators per group.
    """
    import matplotlib.pyplot as plt

    fig = annotator_strength_figure(source)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ANNOTATOR_PLOT_FILE)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
