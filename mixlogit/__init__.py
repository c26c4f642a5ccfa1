"""mixlogit: mixed logit models on one kernel (MSL, variational Bayes, NUTS) with heterogeneity diagnostics.

>>> import mixlogit as ml
>>> df = ml.datasets.load_electricity()
>>> data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")
>>> res = ml.MixedLogit(random={"pf": "normal", "cl": "normal"}, fixed=["loc"]).fit(data, draws=500)
"""

from . import datasets
from .bayes.results import BayesResults
from .data import ChoiceData, ChoiceDataError
from .diagnostics import heterogeneity, plot_heterogeneity, to_arviz
from .distributions import DISTRIBUTION_NAMES
from .draws import DRAW_TYPES
from .loading import load
from .model import MixedLogit
from .results import MixedLogitResults
from .simulate import simulate
from .wide import wide_to_long

__version__ = "0.1.0"

__all__ = ["DISTRIBUTION_NAMES", "DRAW_TYPES", "BayesResults", "ChoiceData", "ChoiceDataError", "MixedLogit",
           "MixedLogitResults", "datasets", "heterogeneity", "load", "plot_heterogeneity", "simulate", "to_arviz",
           "wide_to_long"]
