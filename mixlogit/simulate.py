"""Synthetic choice data with known truth, for parameter-recovery checks and examples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .data import ChoiceData
from .model import MixedLogit
from .spec import Spec
from .validation import check_bool


@dataclass
class SimulatedData:
    """Output of :func:`simulate`: the long table, the true parameters (named as in ``params``) and the model
    that generated it (``model.fit(data)`` estimates it)."""

    df: pd.DataFrame
    truth: pd.Series
    model: MixedLogit
    panel: bool
    betas: pd.DataFrame

    @property
    def data(self) -> ChoiceData:
        return ChoiceData.from_long(self.df, choice="choice", alt="alt", situation="situation",
                                    panel="person" if self.panel else None)


def simulate(
    n_persons: int = 500,
    n_situations: int = 5,
    n_alts: int = 3,
    random: dict[str, tuple[str, float, float]] | None = None,
    fixed: dict[str, float] | None = None,
    asc: dict[object, float] | None = None,
    chol: dict[str, float] | None = None,
    panel: bool = True,
    attribute_sd: float = 1.0,
    seed: int = 0,
) -> SimulatedData:
    """Simulate choices from a mixed logit with known parameters.

    Parameters
    ----------
    n_persons, n_situations, n_alts : sizes; every person faces ``n_situations`` situations of ``n_alts``
        alternatives labelled 0..n_alts-1.
    random : column -> (distribution, location, spread); e.g. ``{"x1": ("normal", 1.0, 0.5)}``.
    fixed : column -> coefficient.
    asc : alternative label -> constant (alternative 0 is the base and must not be given).
    chol : ``{"chol.a.b": value}`` off-diagonal Cholesky entries between normal random coefficients
        (all normal random coefficients are then correlated).
    panel : True: one coefficient draw per person, shared by their situations (returned table has a
        ``person`` column); False: a fresh draw per situation (cross-section, no panel column).
    attribute_sd : sd of the i.i.d. normal attributes.
    seed : seed of every random choice.
    """
    check_bool("panel", panel)
    random = dict(random or {})
    fixed = dict(fixed or {})
    asc = dict(asc or {})
    if not random and not fixed and not asc:
        raise ValueError("simulate needs at least one of random=, fixed=, asc=")
    for a in asc:
        if a == 0 or a not in range(n_alts):
            raise ValueError(f"asc alternative {a!r} must be one of 1..{n_alts - 1} (0 is the base)")
    correlated = [c for c, (d, _, _) in random.items() if d == "normal"] if chol else []
    model = MixedLogit(random={c: d for c, (d, _, _) in random.items()}, fixed=list(fixed), asc=bool(asc),
                       base_alt=0 if asc else None, correlated=correlated or False)
    rng = np.random.default_rng(seed)
    n_sit = n_persons * n_situations
    cols = list(random) + list(fixed)
    x = rng.normal(scale=attribute_sd, size=(n_sit, n_alts, len(cols)))

    # Coefficient draws through the same map the estimators use.

    spec = Spec(random={c: d for c, (d, _, _) in random.items()}, fixed=[f"asc.{a}" for a in sorted(asc)]
                + list(fixed), correlated=model.correlated)
    truth = {f"asc.{a}": v for a, v in sorted(asc.items())}
    truth.update(fixed)
    truth.update({c: loc for c, (_, loc, _) in random.items()})
    truth.update({f"sd.{c}": sd for c, (_, _, sd) in random.items()})
    for name in spec.param_names[len(truth):]:
        if name not in (chol or {}):
            truth[name] = 0.0
    for name, v in (chol or {}).items():
        if name not in spec.param_names:
            raise ValueError(f"chol entry {name!r} is not a Cholesky parameter; expected one of "
                             f"{[n for n in spec.param_names if n.startswith('chol.')]}")
        truth[name] = v
    theta = torch.tensor([truth[n] for n in spec.param_names], dtype=torch.float64)
    n_draw_units = n_persons if panel else n_sit
    z = torch.as_tensor(rng.normal(size=(n_draw_units, 1, len(random))), dtype=torch.float64)
    beta_r = spec.coefficients(theta, z)[:, 0, :].numpy() if random else np.zeros((n_draw_units, 0))
    unit_of_sit = np.repeat(np.arange(n_persons), n_situations) if panel else np.arange(n_sit)
    b = np.concatenate([beta_r[unit_of_sit], np.tile([fixed[c] for c in fixed], (n_sit, 1))], axis=1)
    v = np.einsum("sjk,sk->sj", x, b)
    for a, c in asc.items():
        v[:, a] += c
    gumbel = rng.gumbel(size=v.shape)
    choice = np.argmax(v + gumbel, axis=1)

    df = pd.DataFrame({
        "situation": np.repeat(np.arange(n_sit), n_alts),
        "alt": np.tile(np.arange(n_alts), n_sit),
        "choice": (np.tile(np.arange(n_alts), n_sit) == np.repeat(choice, n_alts)).astype(int),
    })
    if panel:
        df.insert(0, "person", np.repeat(unit_of_sit, n_alts))
    for k, c in enumerate(cols):
        df[c] = x[:, :, k].ravel()
    betas = pd.DataFrame(beta_r, columns=list(random))
    return SimulatedData(df=df, truth=pd.Series(truth)[spec.param_names], model=model, panel=panel, betas=betas)
