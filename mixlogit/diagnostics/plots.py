"""Heterogeneity plots as PNG files: implied coefficient densities with a band, a forest plot of the
population parameters, and individual-level estimates against the population density.

The plots ask the result for what they need (``res.spec``, ``res.theta``, ``res.parameter_draws``,
``res.to_arviz``, ``res.individual_estimates``), never which estimator made it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..data import ChoiceData
from ..moments import marginal_transform
from ..persistence import replace_folder
from ..spec import Spec

PLOT_FILES = ("densities.png", "forest.png", "individual.png")


def density_on_grid(spec: Spec, theta: np.ndarray, k: int, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Density of coefficient k on grid x (change of variables from z) and its point mass at zero."""
    z = torch.linspace(-7, 7, 1401, dtype=torch.float64)
    with torch.no_grad():
        b = marginal_transform(spec, torch.as_tensor(theta, dtype=torch.float64), k, z).numpy()
    zn = z.numpy()
    db = np.gradient(b, zn)
    phi = np.exp(-0.5 * zn ** 2) / math.sqrt(2 * math.pi)
    flat = np.abs(db) < 1e-10
    mass0 = float(np.sum(phi[flat]) * (zn[1] - zn[0]))
    ok = ~flat
    if ok.sum() < 2:
        return np.zeros_like(x), mass0
    bb, dens = b[ok], phi[ok] / np.abs(db[ok])
    order = np.argsort(bb)
    return np.interp(x, bb[order], dens[order], left=0.0, right=0.0), mass0


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (draws without a display; matplotlib loads only for plots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def panel_grid(n: int):
    """A figure with ``n`` panels, up to three per row; returns the figure and its ``n`` axes in order."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = new_figure(4.2 * cols, 3.2 * rows)
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(n)]


def _central_range(spec: Spec, theta: np.ndarray, k: int) -> np.ndarray:
    """Coefficient k at z = -3 and +3 (the plotted range)."""
    with torch.no_grad():
        return marginal_transform(spec, torch.as_tensor(theta), k, torch.tensor([-3.0, 3.0], dtype=torch.float64)
                                  ).numpy()


def plot_heterogeneity(res, out_dir, data: ChoiceData | None = None, n: int = 200, seed: int = 0,
                       level: float = 0.9, overwrite: bool = False) -> dict[str, Path]:
    """Write the heterogeneity plots of a result as PNG files into ``out_dir`` and return their paths.
    Existing plots there are replaced only with ``overwrite=True``; the plots are written as a unit (all of the
    new ones, or the old ones after an interruption), and a previous model's plot this one lacks is removed.

    - ``densities.png``: the implied density of every random coefficient (median over ``n`` parameter draws)
      with a pointwise ``level`` band (posterior draws, or the asymptotic normal for MSL);
    - ``forest.png``: forest plot of the population parameters (``az.plot_forest``, ``level`` intervals);
    - ``individual.png``: individual-level estimates (posterior means of each unit's coefficients; for MSL the
      conditional means of Revelt and Train, which need ``data``) against the population density.
    """
    out = Path(out_dir)
    with replace_folder(out, PLOT_FILES, overwrite) as tmp:
        paths = draw_plots(res, tmp, data=data, n=n, seed=seed, level=level)
    return {k: out / p.name for k, p in paths.items()}


def draw_plots(res, out: Path, data: ChoiceData | None = None, n: int = 200, seed: int = 0,
               level: float = 0.9) -> dict[str, Path]:
    """Draw the plots of :func:`plot_heterogeneity` into the folder ``out`` as they are (no overwrite check;
    :func:`plot_heterogeneity` and the report call it inside a folder written as a unit)."""
    import arviz as az

    spec = res.spec
    paths: dict[str, Path] = {}
    center = res.theta
    names = spec.heterogeneity_names  # the random coefficients, then a random scale
    label = {**spec.random, "scale": f"{spec.scale}, mean 1"}
    if names:
        th = res.parameter_draws(n, seed)
        fig, axes = panel_grid(len(names))
        for k, (name, ax) in enumerate(zip(names, axes)):
            q = _central_range(spec, center, k)
            lo, hi = float(q.min()), float(q.max())
            pad = 0.15 * (hi - lo if hi > lo else 1.0)
            x = np.linspace(lo - pad, hi + pad, 400)
            dens = np.stack([density_on_grid(spec, t, k, x)[0] for t in th])
            band = np.quantile(dens, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=0)
            ax.fill_between(x, band[0], band[2], alpha=0.3, label=f"{level:.0%} band")
            ax.plot(x, band[1], label="median density")
            mass0 = density_on_grid(spec, center, k, x)[1]
            title = f"{name} ({label[name]})"
            if mass0 > 1e-3:
                title += f", P(beta=0)={mass0:.2f}"
            ax.set_title(title, fontsize=10)
            ax.axvline(0.0, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("scale s (multiplies the whole utility)" if name == "scale" and spec.scale else "coefficient")
            if k == 0:
                ax.legend(fontsize=8)
        paths["densities"] = out / "densities.png"
        fig.savefig(paths["densities"], dpi=110)

    idata = res.to_arviz(data=None, seed=seed)
    fig = new_figure(6, 0.35 * len(res.param_names) + 1.5)
    ax = fig.add_subplot(1, 1, 1)
    az.plot_forest(idata, var_names=list(res.param_names), combined=True, hdi_prob=level, ax=ax)
    ax.set_title(f"population parameters ({level:.0%} intervals)")
    paths["forest"] = out / "forest.png"
    fig.savefig(paths["forest"], dpi=110)

    ind = res.individual_estimates(data) if names else None
    if ind is not None:
        fig, axes = panel_grid(len(names))
        for k, (name, ax) in enumerate(zip(names, axes)):
            v = ind[name].to_numpy()
            ax.hist(v, bins=min(40, max(10, len(v) // 10)), density=True, alpha=0.5,
                    label="individual posterior means")
            q = _central_range(spec, center, k)
            x = np.linspace(min(q.min(), v.min()), max(q.max(), v.max()), 400)
            ax.plot(x, density_on_grid(spec, center, k, x)[0], label="population density")
            ax.set_title(name, fontsize=10)
            if k == 0:
                ax.legend(fontsize=8)
        paths["individual"] = out / "individual.png"
        fig.savefig(paths["individual"], dpi=110)
    return paths
