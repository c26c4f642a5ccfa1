"""Bayesian mixed logit: variational inference (Pyro SVI) and NUTS, on the one kernel MSL uses.

Reached through ``MixedLogit.fit(data, method="svi" | "nuts")`` (:func:`mixlogit.bayes.fit.fit`). The modules,
from the bottom up:

- :mod:`~mixlogit.bayes.priors`: named, validated priors and their defaults;
- :mod:`~mixlogit.bayes.model`: the hierarchical model as a Pyro model (``HierarchicalMixedLogit``), its
  likelihood the kernel's;
- :mod:`~mixlogit.bayes.pilot`: starting values, the whitening of the population parameters and each unit's
  Laplace approximation, from a pilot MSL fit;
- :mod:`~mixlogit.bayes.guides`: the variational families with unit guides (``"fullrank"``, ``"meanfield"``,
  ``"amortized"``);
- :mod:`~mixlogit.bayes.marginal`: the units integrated out (importance points on the kernel): the default guide
  ``"marginal"`` and the likelihood of the trust check;
- :mod:`~mixlogit.bayes.trust`: the trust check of SVI fits (Pareto k of p/q);
- :mod:`~mixlogit.bayes.svi` and :mod:`~mixlogit.bayes.nuts`: the two estimators;
- :mod:`~mixlogit.bayes.samplers`: posterior draws from a guide, from chains or from a file;
- :mod:`~mixlogit.bayes.results`: :class:`BayesResults` and :class:`PosteriorDraws`;
- :mod:`~mixlogit.bayes.fit`: the entry point and the estimators' options.

Only :mod:`~mixlogit.bayes.results`, :mod:`~mixlogit.bayes.samplers` and :mod:`~mixlogit.bayes.trust` load
without Pyro, so that reading a results file, and ``import mixlogit``, never import it; this package imports just
those.
"""

from .results import BayesResults, PosteriorDraws

__all__ = ["BayesResults", "PosteriorDraws"]
