"""Heterogeneity diagnostics for every estimator, from (spec, parameter draws, design): the heterogeneity
table (:mod:`.statistics`), pointwise log-likelihoods and predictive draws (:mod:`.pointwise`), ArviZ export
(:mod:`.arviz`), plots (:mod:`.plots`) and the report (:mod:`.report`)."""

from .arviz import LOG_LIKELIHOODS, loo_table, to_arviz, to_idata
from .plots import PLOT_FILES, density_on_grid, panel_grid, plot_heterogeneity
from .pointwise import conditional_loglik_draws, marginal_loglik, predictive_choices, situations
from .report import heterogeneity_display, write_report
from .statistics import (
                         STATS,
                         coefficient_stats,
                         heterogeneity,
                         heterogeneity_delta,
                         heterogeneity_frame,
                         heterogeneity_from_draws,
                         stats_over_draws,
)

__all__ = ["LOG_LIKELIHOODS", "PLOT_FILES", "STATS", "coefficient_stats", "conditional_loglik_draws", "density_on_grid",
           "heterogeneity", "heterogeneity_delta", "heterogeneity_display", "heterogeneity_frame",
           "heterogeneity_from_draws", "loo_table", "marginal_loglik", "panel_grid", "plot_heterogeneity",
           "predictive_choices", "situations", "stats_over_draws", "to_arviz", "to_idata", "write_report"]
