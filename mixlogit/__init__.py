"""mixlogit: mixed logit models on one kernel (MSL, variational Bayes, NUTS) with heterogeneity diagnostics."""

__version__ = "0.1.0"
