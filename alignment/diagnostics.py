"""ArviZ diagnostics of a MixDPO run: the learned strength distribution and per-pair posterior strengths.

:func:`strength_to_arviz` returns an ``arviz.InferenceData`` with

- ``posterior``: ``beta`` (chain, draw), draws from the learned p_phi(beta); and ``beta_pair`` (chain, draw,
  pair), draws from each pair's posterior ``p(beta | h, chosen preferred) ∝ sigmoid(beta h) p_phi(beta)``, by
  sampling-importance-resampling of the prior draws (exact in the limit, and fine for summaries at 1000 draws);
- ``constant_data``: ``beta_pair_mean`` and ``beta_pair_sd`` (pair), the posterior moments computed by the
  strength's own rule (:meth:`alignment.strength.Strength.posterior`), and ``group`` labels when known;
- ``observed_data``: ``margin`` (pair), the DPO margins h in nats;
- attributes (of the InferenceData and of ``posterior``): the family, its parameters, mean, sd and CV.

So ``az.summary(idata, var_names=["beta"])`` summarises the learned distribution and
``az.plot_forest(idata, var_names=["beta_pair"])`` the per-pair strengths. For annotator-level runs
(``strength_level="annotator"``), :func:`annotator_strength_to_arviz` and :func:`plot_annotator_strength` (from
:mod:`alignment.annotator_diagnostics`) give each annotator's posterior strength, with an ``annotator`` dim.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mixlogit.validation import check_count

from .annotator_diagnostics import annotator_strength_to_arviz, plot_annotator_strength
from .evaluate import pair_logratios
from .models import load_causal_lm
from .run_dir import load_strength, read_margins, read_run_record, read_strength_config

__all__ = ["PLOT_FILES", "annotator_strength_to_arviz", "plot_annotator_strength", "plot_strength", "run_margins",
           "strength_to_arviz"]

#: Written by :func:`plot_strength` (the last only with groups): the strength density, the per-pair strengths
#: and the per-group strengths.
PLOT_FILES = ("strength_density.png", "pair_strengths.png", "strength_by_group.png")


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
    if isinstance(trainer_or_run_dir, (str, os.PathLike)):
        strength, info = load_strength(os.fspath(trainer_or_run_dir))
        return strength, info["family"]
    strength = trainer_or_run_dir.strength
    return strength, strength.family


def strength_to_arviz(trainer_or_run_dir, dataset=None, n_draws: int = 1000, seed: int = 0):
    """Convert a MixDPO run's learned strength distribution and per-pair strengths to ``arviz.InferenceData``.

    Args:
        trainer_or_run_dir: a trained :class:`~alignment.trainer.MixDPOTrainer`, or a run directory written by
            ``mixdpo train`` (or any directory with ``strength.json`` + ``strength.pt`` and ``margins.npz``).
        dataset: pairs whose per-pair strengths are wanted (see :func:`run_margins` for None).
        n_draws: draws of beta from the learned distribution and from each pair's posterior.
        seed: seed of the draws.

    Returns:
        ``arviz.InferenceData`` (see the module docstring for the groups and variables); dims ``chain`` (1),
        ``draw`` (n_draws) and ``pair`` (the kept pairs, coordinate = row index in ``dataset``).
    """
    import arviz as az
    import torch

    check_count("n_draws", n_draws)
    strength, family = _strength_of(trainer_or_run_dir)
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
    }
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


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_strength(run_dir_or_idata, out_dir: str, dataset=None, dpo_beta: float | None = None) -> list[str]:
    """Write PNG plots of the learned strength distribution and the per-pair strengths.

    Args:
        run_dir_or_idata: an ``InferenceData`` from :func:`strength_to_arviz`, a trainer, or a run directory.
        out_dir: directory for the PNG files (created).
        dataset: passed to :func:`strength_to_arviz` when the first argument is not an ``InferenceData``.
        dpo_beta: DPO's beta, drawn as a reference line (default: the run's beta when known).

    Returns:
        Paths of the written files: ``strength_density.png`` (histogram of draws from p_phi(beta) with its mean),
        ``pair_strengths.png`` (posterior mean +- sd of beta against the pair's margin, coloured by group) and,
        with groups, ``strength_by_group.png`` (posterior means per group).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idata = run_dir_or_idata
    if not hasattr(idata, "posterior"):
        if dpo_beta is None and isinstance(run_dir_or_idata, (str, os.PathLike)):
            info = read_strength_config(os.fspath(run_dir_or_idata)) or {}
            dpo_beta = info.get("beta")
        idata = strength_to_arviz(run_dir_or_idata, dataset)
    os.makedirs(out_dir, exist_ok=True)
    attrs = dict(idata.posterior.attrs)
    family = attrs.get("family", "?")
    draws = idata.posterior["beta"].values.ravel()
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    hi = np.quantile(draws, 0.995)
    ax.hist(
        draws[draws <= hi], bins=60, density=True, color="tab:blue", alpha=0.7, label=f"p(beta), {family}"
    )
    ax.axvline(float(draws.mean()), color="tab:blue", ls="--", label=f"mean {draws.mean():.3g}")
    if dpo_beta is not None:
        ax.axvline(dpo_beta, color="k", ls=":", label=f"DPO beta {dpo_beta:.3g}")
    cv = attrs.get("beta_cv")
    ax.legend()
    title = f"Learned strength distribution ({family}" + (f", CV {cv:.2f})" if cv is not None else ")")
    paths.append(_save(fig, ax, "beta", "density", title, os.path.join(out_dir, PLOT_FILES[0])))

    const = idata.constant_data
    margin = idata.observed_data["margin"].values
    mean, sd = const["beta_pair_mean"].values, const["beta_pair_sd"].values
    groups = const["group"].values if "group" in const else None
    fig, ax = plt.subplots(figsize=(6, 4))
    if groups is None:
        ax.errorbar(margin, mean, yerr=sd, fmt="o", ms=3, alpha=0.5, elinewidth=0.5)
    else:
        for g in sorted(set(groups.tolist())):
            sel = groups == g
            ax.errorbar(
                margin[sel], mean[sel], yerr=sd[sel], fmt="o", ms=3, alpha=0.6, elinewidth=0.5, label=g
            )
        ax.legend(title="group", fontsize=8)
    paths.append(
        _save(
            fig,
            ax,
            "margin h (nats)",
            "posterior beta (mean +- sd)",
            "Per-pair posterior strength",
            os.path.join(out_dir, PLOT_FILES[1]),
        )
    )

    if groups is not None:
        names = sorted(set(groups.tolist()))
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot([mean[groups == g] for g in names], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        paths.append(
            _save(
                fig,
                ax,
                "group",
                "posterior mean of beta",
                "Per-pair posterior strength by group",
                os.path.join(out_dir, PLOT_FILES[2]),
            )
        )
    return paths
