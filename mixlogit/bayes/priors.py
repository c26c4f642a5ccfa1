"""Priors of the Bayesian mixed logit (:mod:`mixlogit.bayes`): named, validated, weakly informative by default.

A prior is written as ``"normal(0, 10)"``, ``("normal", 0, 10)``, ``{"family": "normal", "loc": 0, "scale": 10}``
or a :class:`Prior`. ``priors=`` in ``model.fit(..., method="svi" | "nuts")`` maps keys to priors; a key is a
parameter name (``"pf"``, ``"sd.pf"``, ``"asc.2"``) or a group: ``"fixed"`` (fixed coefficients and constants),
``"loc"`` (locations of random coefficients), ``"sd"`` (spreads), ``"corr"`` (the correlation matrix of the
correlated coefficients). A parameter's own key wins over its group.

Defaults (attributes are assumed to be on a scale where coefficients beyond about +-20 are implausible):

=============================  ==============================  ==========================================
parameters                     default                         why
=============================  ==============================  ==========================================
fixed coefficients, ``asc.*``  ``normal(0, 10)``               flat over any plausible utility weight
locations ``x``                ``normal(0, 10)``               same; lognormal families: ``normal(0, 3)``
                                                               (the location is ``log|beta|``)
spreads ``sd.x``               ``halfnormal(5)``               positive; lognormal families ``halfnormal(2)``
random scale ``sd.scale``      ``halfnormal(1)``               the sd of log s: 1 lets the middle 90% of
                               (S-MNL, ``scale="lognormal"``)  scales span a factor of 27, 2.5 a factor of 3,700
correlations                   ``lkj(2)``                      mild shrinkage towards independence
=============================  ==============================  ==========================================

Spreads are positive in the Bayesian model (their sign is not identified). With correlated coefficients the
covariance is ``diag(s) Omega diag(s)`` with ``Omega ~ LKJ(eta)`` and ``s`` the marginal standard deviations,
so an ``sd.x`` prior is on the *marginal* sd of ``x``; the reported ``sd.x`` and ``chol.a.b`` are the entries of
the Cholesky factor of the covariance, exactly as in MSL results.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import pyro.distributions as pdist
import torch
from torch.distributions import constraints

from ..spec import Spec

#: family -> (parameter names, support, parameters that must be > 0)
PRIOR_FAMILIES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "normal": (("loc", "scale"), "real", ("scale",)),
    "student_t": (("df", "loc", "scale"), "real", ("df", "scale")),
    "cauchy": (("loc", "scale"), "real", ("scale",)),
    "halfnormal": (("scale",), "positive", ("scale",)),
    "halfcauchy": (("scale",), "positive", ("scale",)),
    "lognormal": (("loc", "scale"), "positive", ("scale",)),
    "exponential": (("rate",), "positive", ("rate",)),
    "gamma": (("concentration", "rate"), "positive", ("concentration", "rate")),
    "lkj": (("eta",), "correlation", ("eta",)),
}
#: family -> its torch distribution (every family but ``lkj``), parameters in the order of PRIOR_FAMILIES.
_TORCH_FAMILIES = {"normal": torch.distributions.Normal, "student_t": torch.distributions.StudentT,
                   "cauchy": torch.distributions.Cauchy, "halfnormal": torch.distributions.HalfNormal,
                   "halfcauchy": torch.distributions.HalfCauchy, "lognormal": torch.distributions.LogNormal,
                   "exponential": torch.distributions.Exponential, "gamma": torch.distributions.Gamma}
GROUPS = ("fixed", "loc", "sd", "corr")
_LOGNORMAL_FAMILIES = ("lognormal", "-lognormal")


#: Improper priors, refused with the reason (:func:`refuse_improper`): flat on the parameter's support, and
#: flat on the log of a spread (proportional to 1/sd).
FLAT_FAMILIES, LOG_FLAT_FAMILIES = ("flat", "uniform", "improper"), ("jeffreys", "loguniform", "log_flat")
_USE_PROPER_SD = "use a proper prior such as 'halfnormal(5)' (the default) or 'halfcauchy(2.5)'"
_IMPROPER_REASONS = {
    ("sd", "flat"): ("a flat prior on a spread (uniform on (0, inf)) leaves the posterior improper unless the "
                     "likelihood falls faster than 1/sd as sd grows, and the data need not make it: the mixed logit "
                     "likelihood tends to a positive constant whenever every unit's choices follow a deterministic "
                     "rule for some coefficients (one binary choice per unit, for instance), so the posterior mass "
                     f"runs off to infinity; {_USE_PROPER_SD}"),
    ("sd", "log_flat"): ("a prior proportional to 1/sd (flat on log sd) always makes the posterior improper: as sd "
                         "falls to zero the likelihood tends to the plain logit's, a positive constant, and the "
                         f"integral of 1/sd diverges at zero; {_USE_PROPER_SD}"),
    ("other", "flat"): ("a flat prior on a coefficient leaves the posterior improper whenever the data separate the "
                        "alternatives (the likelihood then tends to a positive constant along a direction of "
                        "coefficients); use a wide proper prior such as 'normal(0, 100)'"),
    ("corr", "flat"): "the uniform prior on correlation matrices is the proper 'lkj(1)'",
}


def _family_name(value) -> str | None:
    """The family a prior specification names (lower case), or None when it names none."""
    if isinstance(value, Prior):
        return value.family
    if isinstance(value, str):
        m = _CALL.match(value)
        return (m.group(1) if m else value.strip()).lower()
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], str):
        return value[0].lower()
    if isinstance(value, dict) and "family" in value:
        return str(value["family"]).lower()
    return None


def refuse_improper(name: str, group: str, value) -> None:
    """Raise a :class:`PriorError` naming parameter ``name`` (of ``group``: "fixed", "loc", "sd" or "corr") and
    the reason when ``value`` specifies an improper prior."""
    family = _family_name(value)
    kind = "flat" if family in FLAT_FAMILIES else "log_flat" if family in LOG_FLAT_FAMILIES else None
    if kind is None:
        return
    where = group if group in ("sd", "corr") else "other"
    reason = _IMPROPER_REASONS.get((where, kind), _IMPROPER_REASONS.get((where, "flat")))
    raise PriorError(f"prior for {name!r} is the improper {family!r}: {reason}")


class PriorError(ValueError):
    """An unknown prior family or key, or invalid prior parameters."""


@dataclass(frozen=True)
class Prior:
    """A named prior: ``family`` (one of :data:`PRIOR_FAMILIES`) and its parameters in the documented order."""

    family: str
    params: tuple[float, ...]

    def __post_init__(self):
        where = f"prior {self.family!r}"
        if self.family not in PRIOR_FAMILIES:
            raise PriorError(f"unknown prior family {self.family!r}; accepted: {', '.join(PRIOR_FAMILIES)}")
        names, _, positive = PRIOR_FAMILIES[self.family]
        if len(self.params) != len(names):
            raise PriorError(f"{where} takes {len(names)} parameter(s) ({', '.join(names)}), got {len(self.params)}: "
                             f"{self.params}")
        for n, v in zip(names, self.params):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise PriorError(f"{where}: parameter {n} must be a finite number, got {v!r}")
            if n in positive and not v > 0:
                raise PriorError(f"{where}: parameter {n} must be > 0, got {v!r}")

    @property
    def support(self) -> str:
        """"real", "positive" or "correlation"."""
        return PRIOR_FAMILIES[self.family][1]

    def __str__(self) -> str:
        return f"{self.family}({', '.join(f'{v:g}' for v in self.params)})"

    def distribution(self, dtype=torch.float64) -> torch.distributions.Distribution:
        """The scalar torch distribution (not for ``lkj``, which needs the dimension: see :func:`lkj_distribution`)."""
        if self.family in _TORCH_FAMILIES:
            return _TORCH_FAMILIES[self.family](*[torch.tensor(float(v), dtype=dtype) for v in self.params])
        raise PriorError(f"prior {self} is a prior on correlation matrices; use it for the 'corr' key "
                         "(see lkj_distribution)")


_CALL = re.compile(r"^\s*([A-Za-z_\-]+)\s*\((.*)\)\s*$")


def parse_prior(value, where: str = "prior") -> Prior:
    """A :class:`Prior` from a string ``"normal(0, 10)"``, a tuple ``("normal", 0, 10)``, a dict
    ``{"family": "normal", "loc": 0, "scale": 10}`` or a Prior; the error names ``where``."""
    try:
        if isinstance(value, Prior):
            return value
        if isinstance(value, str):
            m = _CALL.match(value)
            if not m:
                raise PriorError(f"{where}: cannot read {value!r}; write e.g. 'normal(0, 10)' or 'halfnormal(5)'")
            family = m.group(1).lower()
            args = [a.strip() for a in m.group(2).split(",") if a.strip()]
            try:
                params = tuple(float(a) for a in args)
            except ValueError:
                raise PriorError(f"{where}: parameters of {value!r} must be numbers") from None
            return Prior(family, params)
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], str):
            return Prior(value[0].lower(), tuple(value[1:]))
        if isinstance(value, dict) and "family" in value:
            family = str(value["family"]).lower()
            if family not in PRIOR_FAMILIES:
                return Prior(family, ())  # raises the unknown-family error
            names = PRIOR_FAMILIES[family][0]
            extra = sorted(set(value) - set(names) - {"family"})
            if extra:
                raise PriorError(f"{where}: {family} has no parameter {extra[0]!r}; parameters: {', '.join(names)}")
            missing = [n for n in names if n not in value]
            if missing:
                raise PriorError(f"{where}: {family} needs parameter {missing[0]!r}")
            return Prior(family, tuple(value[n] for n in names))
    except PriorError as e:
        msg = str(e)
        raise PriorError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    raise PriorError(f"{where}: expected a string like 'normal(0, 10)', a tuple ('normal', 0, 10), a dict with "
                     f"'family', or a mixlogit.bayes.priors.Prior; got {value!r}")


def default_prior(spec: Spec, name: str) -> Prior:
    """The default prior of parameter ``name`` (see the module docstring)."""
    if name == "corr":
        return Prior("lkj", (2.0,))
    if name in spec.fixed:
        return Prior("normal", (0.0, 10.0))
    if name == "sd.scale":
        return Prior("halfnormal", (1.0,))
    if name.startswith("sd."):
        lognormal = spec.random[name[3:]] in _LOGNORMAL_FAMILIES
        return Prior("halfnormal", (2.0 if lognormal else 5.0,))
    lognormal = spec.random[name] in _LOGNORMAL_FAMILIES
    return Prior("normal", (0.0, 3.0 if lognormal else 10.0))


def resolve_priors(spec: Spec, priors: dict | None) -> dict[str, Prior]:
    """One prior per parameter (``spec.param_names`` without ``chol.*``) plus ``"corr"`` when the model has
    correlated coefficients. Raises :class:`PriorError` for unknown keys, families, or parameters, and for a
    prior whose support does not fit its parameter."""
    priors = dict(priors or {})
    if not isinstance(priors, dict):
        raise PriorError(f"priors must be a dict mapping parameter names or groups to priors, got {priors!r}")
    names = [n for n in spec.param_names if not n.startswith("chol.")]
    chol = [n for n in spec.param_names if n.startswith("chol.")]
    for key in priors:
        if key in chol:
            raise PriorError(f"priors: {key!r} is an entry of the Cholesky factor; with correlated coefficients give "
                             "a prior on the correlations with key 'corr' (e.g. 'lkj(2)') and on the sds ('sd.x')")
        if key not in names and key not in GROUPS:
            raise PriorError(f"priors: unknown key {key!r}; accepted: the groups {', '.join(GROUPS)} or a parameter "
                             f"name: {', '.join(names)}")
        if key == "corr" and not spec.correlated:
            raise PriorError("priors: key 'corr' given but the model has no correlated random coefficients")
    out: dict[str, Prior] = {}
    for n in names:
        group = "fixed" if n in spec.fixed else ("sd" if n.startswith("sd.") else "loc")
        refuse_improper(n, group, priors.get(n, priors.get(group)))
        if n in priors:
            p = parse_prior(priors[n], where=f"prior for {n!r}")
        elif group in priors:
            p = parse_prior(priors[group], where=f"prior for group {group!r}")
        else:
            p = default_prior(spec, n)
        need = "positive" if group == "sd" else "real"
        if p.support != need:
            ok = [f for f, (_, s, _) in PRIOR_FAMILIES.items() if s == need]
            raise PriorError(f"prior for {n!r} is {p}, whose support is {p.support}; {n!r} needs a prior on the "
                             f"{'positive half-line' if need == 'positive' else 'real line'}: {', '.join(ok)}")
        out[n] = p
    if spec.correlated:
        refuse_improper("corr", "corr", priors.get("corr"))
        p = parse_prior(priors["corr"], where="prior for 'corr'") if "corr" in priors else default_prior(spec, "corr")
        if p.support != "correlation":
            raise PriorError(f"prior for 'corr' is {p}; correlations need 'lkj(eta)' with eta > 0")
        out["corr"] = p
    return out


class IndependentPriors(pdist.TorchDistribution):
    """A vector of independent scalar priors that share a support: event shape (K,).

    Elements with the same family are grouped into one batched distribution, so the log-density costs one
    call per family rather than one per element.
    """

    arg_constraints: ClassVar[dict] = {}
    has_rsample = False

    def __init__(self, priors: list[Prior], dtype=torch.float64, validate_args=None, center=None, scale=None):
        supports = {p.support for p in priors}
        if len(supports) != 1:
            raise PriorError(f"priors of one block must share a support, got {sorted(supports)}")
        self.priors = list(priors)
        self._support_name = supports.pop()
        # Optional standardization, a fixed preconditioner that gives every coordinate a posterior sd near one:
        # the value u stands for center + scale * u (real line) or exp(center + scale * u) (positive half-line).
        self.center = None if center is None else torch.as_tensor(center, dtype=dtype)
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=dtype)
        self._log = self.center is not None and self._support_name == "positive"
        self._log_scale = 0.0 if self.scale is None else float(torch.log(self.scale).sum())
        self._groups = []
        for fam in dict.fromkeys(p.family for p in priors):
            idx = [i for i, p in enumerate(priors) if p.family == fam]
            params = torch.tensor([priors[i].params for i in idx], dtype=dtype).T  # (n_params, len(idx))
            # One batched torch distribution per family, built once: the priors are constant.
            batched = _batched(fam, params, dtype)
            self._groups.append((torch.tensor(idx), batched))
        self._dtype = dtype
        self._contiguous = len(self._groups) == 1
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size([len(priors)]), validate_args=False)

    @property
    def support(self):
        base = constraints.positive if self._support_name == "positive" and not self._log else constraints.real
        return constraints.independent(base, 1)

    def natural(self, value: torch.Tensor) -> torch.Tensor:
        """The parameter a (possibly standardized) value stands for."""
        if self.center is None:
            return value
        v = self.center + self.scale * value
        return torch.exp(v) if self._log else v

    def standardized(self, natural: torch.Tensor) -> torch.Tensor:
        if self.center is None:
            return natural
        return ((torch.log(natural) if self._log else natural) - self.center) / self.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.center is not None:
            nat = self.natural(value)
            jac = torch.log(nat).sum(-1) if self._log else 0.0  # d exp(v) / dv = exp(v)
            return self._log_prob(nat) + jac + self._log_scale
        return self._log_prob(value)

    def _log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._contiguous:
            return self._groups[0][1].log_prob(value).sum(-1)
        total = 0.0
        for idx, batched in self._groups:
            total = total + batched.log_prob(value[..., idx]).sum(-1)
        return total

    def sample(self, sample_shape=()):
        shape = tuple(sample_shape) + tuple(self.batch_shape)
        out = torch.empty(shape + (len(self.priors),), dtype=self._dtype)
        with torch.no_grad():
            for idx, batched in self._groups:
                out[..., idx] = batched.sample(shape)
        return self.standardized(out)

    def expand(self, batch_shape, _instance=None):
        # The elements are independent and log_prob works elementwise over leading dims: only the recorded
        # batch shape changes (Pyro expands sites inside plates, e.g. vectorized ELBO particles).
        new = copy.copy(self)
        new._batch_shape = torch.Size(batch_shape)
        return new


def _batched(family: str, params: torch.Tensor, dtype) -> torch.distributions.Distribution:
    """A batched torch distribution of one family; ``params`` (n_params, n)."""
    return _TORCH_FAMILIES[family](*[params[i].to(dtype) for i in range(params.shape[0])], validate_args=False)


def lkj_distribution(prior: Prior, dim: int, dtype=torch.float64):
    """The LKJ prior on the Cholesky factor of a ``dim`` x ``dim`` correlation matrix."""
    return pdist.LKJCholesky(dim, torch.tensor(float(prior.params[0]), dtype=dtype))


def describe(priors: dict[str, Prior]) -> dict[str, str]:
    """Parameter -> prior as text (for results, summaries and reports)."""
    return {k: str(v) for k, v in priors.items()}
