"""The base class of MixDPO's preference strengths: the binary logit integrated through mixlogit's one kernel.

A family (:mod:`alignment.strength_families`) supplies its moments and its rule (points and log-weights);
:class:`Strength` integrates ``sigmoid(beta h)`` over it with :func:`mixlogit.kernel.conditional_loglik` and
:func:`mixlogit.kernel.log_mixed_prob`, the pair being a situation with one non-chosen alternative whose attribute
difference is ``-h``. A family also declares its contract (``family``, ``integrators``, ``param_names``,
``default_init``), from which :mod:`alignment.strength` (the registry) and the trainer derive everything they need.

Dtypes. Parameters are stored in float64 by default (they are a handful of scalars), and every computation runs
in the *working dtype* of the margin: float64 for float64 margins, float32 otherwise (bfloat16 and float16 margins
are upcast for the integration). Outputs are in the working dtype.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from mixlogit.closed_forms import DEFAULT_TERMS
from mixlogit.draws import deterministic_rule
from mixlogit.kernel import conditional_loglik, log_mixed_prob, posterior_draw_weights
from mixlogit.validation import check_bool, check_count, check_positive_number

#: Default number of nodes (or draws, or series terms) per integrator.
DEFAULT_NODES = {"gauss-hermite": 16, "quadrature": 128, "mc": 16, "qmc": 16, "closed-form": DEFAULT_TERMS,
                 "exact": 1}
DETERMINISTIC_INTEGRATORS = ("gauss-hermite", "quadrature")


class StrengthPosterior(NamedTuple):
    """Per-example posterior of ``beta`` given that the chosen response won: ``sigmoid(beta h) p(beta)``."""

    mean: torch.Tensor
    std: torch.Tensor


#: Parameter dtypes a strength accepts (``dtype=``).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_float_dtype(dtype) -> torch.dtype:
    """``dtype`` when it is one of :data:`FLOAT_DTYPES` (the ``dtype=`` of a family's parameters)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating-point torch dtype ({', '.join(map(str, FLOAT_DTYPES))}), "
                         f"got {dtype!r}")
    return dtype


def log_parameter(value: float, dtype: torch.dtype) -> nn.Parameter:
    """A positive parameter trained as its log, so that no optimizer step can leave the domain."""
    return nn.Parameter(torch.tensor(math.log(value), dtype=dtype))


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a margin of ``dtype`` is integrated in: float64 stays, anything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_margin(margin, name: str = "margin") -> torch.Tensor:
    """Validate a margin tensor (floating, finite); the error names the first non-finite indices."""
    if not isinstance(margin, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(margin).__name__}")
    if not margin.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {margin.dtype}")
    bad = ~torch.isfinite(margin)
    if bool(bad.any()):
        if margin.dim() == 0:
            raise ValueError(f"{name} is {float(margin)}; it must be finite")
        idx = bad.nonzero().tolist()[:5]
        raise ValueError(f"{name} has {int(bad.sum())} non-finite entries, first at indices {idx}")
    return margin


# ---------------------------------------------------------------------------------------------- base class
class Strength(nn.Module):
    """A distribution of the preference strength ``beta`` with learnable parameters.

    Subclasses provide the moments and :meth:`_rule` (points and log-weights); the base class integrates the
    binary logit with mixlogit's kernel. Calling the module is :meth:`log_prob_preferred`.
    """

    family: str = ""
    integrators: tuple[str, ...] = ()
    #: Per-family overrides of :data:`DEFAULT_NODES`.
    default_nodes: ClassVar[dict[str, int]] = {}
    #: The family's parameters on their natural scale: the keys of ``init`` and of :meth:`family_params`.
    param_names: ClassVar[tuple[str, ...]] = ()
    #: The constructor takes ``mean=`` and ``fix_mean=`` (E[beta] can be pinned while the spread is learned).
    supports_fix_mean: ClassVar[bool] = False
    #: The trainer holds the parameters fixed (a point mass is DPO, whose beta is a hyperparameter).
    fixed_in_training: ClassVar[bool] = False

    def __init__(self, integrator: str, nodes: int | None, seed: int | None, generator: torch.Generator | None):
        super().__init__()
        if integrator not in self.integrators:
            raise ValueError(
                f"integrator {integrator!r} is not available for the {self.family} strength; "
                f"accepted: {', '.join(self.integrators)}"
            )
        self.integrator = integrator
        default = self.default_nodes.get(integrator, DEFAULT_NODES[integrator])
        self.nodes = default if nodes is None else check_count("nodes", nodes)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(seed) if seed is not None else torch.seed())
        self.generator = generator

    # ------------------------------------------------------------------ family interface
    @classmethod
    def default_init(cls, beta: float, init: dict[str, float], fix_mean: bool = False) -> dict[str, float]:
        """Initial parameters of a run centred on DPO's ``beta``: ``init`` (a subset of :attr:`param_names`,
        checked by the caller) completed so that E[beta] = ``beta``; with ``fix_mean`` the mean is pinned by the
        constructor's ``mean=`` instead, so only the spread parameters are returned.

        The base class returns ``init`` unchanged (the constructor's defaults fill in the rest); a family
        overrides it to centre itself on ``beta``.
        """
        return {k: float(v) for k, v in init.items()}

    def mean(self) -> torch.Tensor:
        """E[beta] (0-dim tensor, differentiable)."""
        raise NotImplementedError

    def std(self) -> torch.Tensor:
        """sd[beta] (0-dim tensor, differentiable)."""
        raise NotImplementedError

    def cv(self) -> torch.Tensor:
        """Coefficient of variation sd / mean (0-dim tensor)."""
        return self.std() / self.mean()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of beta, shape (n,), reparameterized (differentiable in the parameters)."""
        raise NotImplementedError

    def family_params(self) -> dict[str, float]:
        """The family's parameters (on their natural scale) as floats, for logging as ``beta/<name>``."""
        raise NotImplementedError

    def exact_distribution(self):
        """The scipy.stats frozen distribution at the current parameters (exact density and quantiles, for
        reports and plots); None (this default) for a point mass or a family without one."""

    def _rule(self, batch: int, dtype: torch.dtype, device: torch.device, coarse: bool = False):
        """Strength points and log-weights: ((1 or B, R, 1), (R,) or (B, R))."""
        raise NotImplementedError

    # ------------------------------------------------------------------ integration through the kernel
    #: Hold the nodes below the working dtype's largest finite value (set by :meth:`with_finite_nodes`).
    _finite_nodes = False

    def with_finite_nodes(self, fn, h: torch.Tensor):
        """``fn(h)`` again, with every strength node held at or below the working dtype's largest finite value.

        A node beyond the dtype's range (``exp(mu + sigma z)`` above 3.4e38 in float32) is inf, and ``inf * 0``
        is NaN where ``sigmoid(beta * 0)`` is 1/2 for every beta. Holding it at the largest finite value gives the
        right limit for every margin. Only the rare call whose result was not finite pays for this second pass,
        so the normal path has no extra operation.
        """
        self._finite_nodes = True
        try:
            return fn(h)
        finally:
            self._finite_nodes = False

    def _cond(self, h: torch.Tensor, coarse: bool = False):
        """Per-draw log sigmoid(beta_r h_b): (B, R), the draws (1 or B, R, 1) and log-weights."""
        if self._finite_nodes:
            # The rule in float64, held below the working dtype's largest value, then cast: no inf enters the
            # graph, so the gradients stay finite as well (a held node passes no gradient to the parameters).
            beta, log_w = self._rule(h.shape[0], torch.float64, h.device, coarse)
            beta, log_w = beta.clamp_max(torch.finfo(h.dtype).max).to(h.dtype), log_w.to(h.dtype)
        else:
            beta, log_w = self._rule(h.shape[0], h.dtype, h.device, coarse)
        if h.shape[0] == 0:  # the kernel cannot reshape an empty batch; the result is (0, R)
            return h.unsqueeze(-1).expand(-1, beta.shape[1]), beta, log_w
        # One situation, one non-chosen alternative whose attribute difference (rejected - chosen) is -h.
        cond = conditional_loglik((-h).reshape(-1, 1, 1, 1), beta)
        return cond, beta, log_w

    def log_prob_marginal(self, h: torch.Tensor) -> torch.Tensor:
        """log E[sigmoid(beta h)] for a flat margin ``h`` (B,) already in the working dtype, without input checks
        (the loss checks its four log-prob tensors once and calls this): (B,)."""
        cond, _, log_w = self._cond(h)
        return log_mixed_prob(cond, log_w)

    def log_prob_expected(self, h: torch.Tensor) -> torch.Tensor:
        """E[log sigmoid(beta h)] for a flat working-dtype margin ``h`` (B,), without input checks: (B,)."""
        cond, _, log_w = self._cond(h)
        return (cond * torch.exp(log_w)).sum(-1)

    def _posterior(self, h: torch.Tensor) -> StrengthPosterior:
        cond, beta, log_w = self._cond(h)
        beta = beta[..., 0]
        w = posterior_draw_weights(cond, log_w)
        mean = (w * beta).sum(-1)
        var = (w * (beta - mean.unsqueeze(-1)) ** 2).sum(-1)
        return StrengthPosterior(mean, torch.sqrt(var))

    def _apply_flat(self, fn, margin: torch.Tensor):
        check_margin(margin)
        h = margin.reshape(-1).to(working_dtype(margin.dtype))
        out = fn(h)
        if any(bool(torch.isnan(o).any()) for o in (out if isinstance(out, tuple) else (out,))):
            out = self._without_nan(fn, h, margin.dim())
        if isinstance(out, tuple):
            return type(out)(*(o.reshape(margin.shape) for o in out))
        return out.reshape(margin.shape)

    def _without_nan(self, fn, h: torch.Tensor, dim: int):
        """``fn(h)`` with the nodes held finite (NaN came out of the plain pass); a clear error if NaN remains."""
        out = self.with_finite_nodes(fn, h)
        for o in out if isinstance(out, tuple) else (out,):
            nan = torch.isnan(o)
            if bool(nan.any()):
                self.check_range(h.dtype)
                raise ValueError(
                    f"the {self.describe()} gives NaN in {h.dtype} at {'' if dim == 1 else 'flattened '}margin "
                    f"indices {nan.nonzero().squeeze(-1).tolist()[:5]}: its parameters are outside what {h.dtype} "
                    "can integrate; pass float64 margins"
                )
        return out

    def log_prob_preferred(self, margin: torch.Tensor) -> torch.Tensor:
        """``log E_beta[sigmoid(beta * margin)]``, elementwise; any shape, differentiable.

        margin : DPO log-ratio margin ``(pi - ref)(chosen) - (pi - ref)(rejected)`` in nats.
        Returns a tensor of the margin's shape in the working dtype (float64, else float32).
        """
        return self._apply_flat(self.log_prob_marginal, margin)

    def expected_log_prob(self, margin: torch.Tensor) -> torch.Tensor:
        """``E_beta[log sigmoid(beta * margin)]`` elementwise (the "expected" objective's negative)."""
        return self._apply_flat(self.log_prob_expected, margin)

    def posterior(self, margin: torch.Tensor) -> StrengthPosterior:
        """Per-example posterior mean and sd of beta given that the chosen response was preferred.

        The posterior density is proportional to ``sigmoid(beta * margin) p(beta)``; computed with the same rule
        as the likelihood (Revelt and Train weights, :func:`mixlogit.kernel.posterior_draw_weights`).
        Returns ``StrengthPosterior(mean, std)``, each of the margin's shape.
        """
        return self._apply_flat(self._posterior, margin)

    def error_estimate(self, margin: torch.Tensor) -> torch.Tensor:
        """Estimated absolute error of :meth:`log_prob_preferred` for deterministic rules, elementwise.

        The difference between the rule and its half-resolution companion (strictly fewer nodes, see
        :attr:`error_estimate_nodes`; a rule without one is refused with the reason rather than report a false
        0, and the nodes it states are :attr:`nodes_used`): it estimates the companion's error and
        bounds this rule's (which converges faster) for the composite "quadrature" rule, pointwise. Gauss-Hermite
        errors oscillate in the margin, so there it bounds only the worst case over a range of margins. For the
        Gamma closed form it is the series' truncation bound ``4 / (3 + sqrt 8)^N`` (rounding comes on top:
        measured below 1e-13); zero for a point mass; not defined for simulation.
        """
        if self.integrator in ("exact", "closed-form"):
            bound = 4.0 / (3.0 + math.sqrt(8.0)) ** self.nodes if self.integrator == "closed-form" else 0.0
            return torch.full_like(margin, bound, dtype=working_dtype(margin.dtype))
        if self.integrator not in DETERMINISTIC_INTEGRATORS:
            raise ValueError(
                f"error_estimate needs a deterministic integrator ({', '.join(DETERMINISTIC_INTEGRATORS)}), "
                f"not {self.integrator!r}: a simulation's error is its standard error across seeds"
            )

        if self._coarse_nodes is None:
            raise ValueError(
                f"error_estimate is not available for the {self.integrator!r} rule with {self.nodes_used} nodes"
                f"{self._requested_note()}: {self._coarse_reason} (comparing the rule with itself would give a "
                f"false 0){self._min_estimable_nodes()}"
            )

        def diff(h):
            fine = self.log_prob_marginal(h)
            cond, _, log_w = self._cond(h, coarse=True)
            return (fine - log_mixed_prob(cond, log_w)).abs()

        with torch.no_grad():
            return self._apply_flat(diff, margin)

    def forward(self, margin: torch.Tensor) -> torch.Tensor:
        return self.log_prob_preferred(margin)

    def check_parameters(self, where: str = "") -> None:
        """Raise a ValueError naming every parameter of the strength that is not finite (NaN or inf), stored
        (``log_sigma``) or on the family's scale (``sigma``); ``where`` says where they came from."""
        with torch.no_grad():
            stored = [(n, t) for n, t in (*self.named_parameters(), *self.named_buffers())
                      if t.numel() == 1 and t.dtype.is_floating_point]
            bad = [f"{n} = {float(t)}" for n, t in stored if not bool(torch.isfinite(t))]
            bad += [f"{k} = {v}" for k, v in self.family_params().items()
                    if not math.isfinite(v) and f"{k} = {v}" not in bad]
        if bad:
            raise ValueError(f"the {self.family} strength{where} has non-finite parameters: {', '.join(bad)}")

    def check_range(self, dtype: torch.dtype = torch.float32) -> None:
        """Raise a ValueError when E[beta] is not finite in ``dtype``, the working dtype of the margins.

        The rewards ``E[beta] * log-ratio`` and the loss's derivative in the margin at 0, ``E[beta] / 2``, scale
        with the mean: a strength whose mean overflows the working dtype (e.g. a lognormal ``mu`` above about 88
        in float32, 709 in float64) cannot give finite results. The error names the parameters and the limit.
        """
        self.check_parameters()
        with torch.no_grad():
            mean = self.mean().detach()
            finite = bool(torch.isfinite(mean.to(torch.float64)) & torch.isfinite(mean.to(dtype)))
        if not finite:
            raise ValueError(
                f"the {self.describe()} has E[beta] = {float(mean):.4g}, which is not finite in {dtype} (largest "
                f"finite value {torch.finfo(dtype).max:.4g}): the rewards E[beta] * log-ratio and the loss's "
                "gradients cannot be represented. Choose parameters with a smaller E[beta]"
                + ("." if dtype == torch.float64 else ", or pass float64 log-probabilities (margins).")
            )

    def describe(self) -> str:
        """The family and its parameters, for messages: ``"lognormal strength (mu=-2.4, sigma=0.5)"``."""
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.family_params().items())
        return f"{self.family} strength ({params})"

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v:.4g}" for k, v in self.family_params().items())
        return (f"{params}, mean={float(self.mean().detach()):.4g}, cv={float(self.cv().detach()):.4g}, "
                f"integrator={self.integrator!r}, nodes={self.nodes_used}{self._requested_note()}")

    # ------------------------------------------------------------------ the nodes actually used
    #: Node counts of a deterministic rule and of its strictly coarser companion (None: there is none); set by
    #: :meth:`_register_normal_rule`.
    _rule_nodes: int | None = None
    _coarse_nodes: int | None = None
    _coarse_reason: str = ""

    @property
    def nodes_used(self) -> int:
        """The nodes the integrator actually uses: a deterministic rule may round the requested ``nodes`` (the
        composite rule uses whole panels of 8 nodes, at least 2 panels; Gauss-Hermite at least 2 nodes)."""
        return self.nodes if self._rule_nodes is None else self._rule_nodes

    @property
    def error_estimate_nodes(self) -> tuple[int, int] | None:
        """``(nodes, companion nodes)`` of :meth:`error_estimate` for a deterministic rule; None where the rule has
        no strictly coarser companion (and so no honest estimate)."""
        if self._coarse_nodes is None:
            return None
        return self.nodes_used, self._coarse_nodes

    def _requested_note(self) -> str:
        return "" if self.nodes_used == self.nodes else f" (requested {self.nodes})"

    def _min_estimable_nodes(self) -> str:
        """Advice naming the smallest ``nodes`` (up to 64) whose rule has a strictly coarser companion."""
        for n in range(self.nodes + 1, 65):
            rule = deterministic_rule(self.integrator, n, 1)
            if rule.coarse is not None and rule.coarse.n_points < rule.n_points:
                return f"; pass nodes >= {n}"
        return ""

    # ------------------------------------------------------------------ helpers for subclasses
    def _initial_location(self, name: str, value, mean, fix_mean: bool, dtype, *, check,
                          from_mean) -> float | None:
        """Shared handling of ``mean=`` / ``fix_mean=`` against the family's location parameter ``name``.

        Returns the location's initial value: ``check(name, value)`` when ``name`` itself is given, else
        ``from_mean(E[beta])`` (default E[beta] 0.1). With ``fix_mean`` it returns None: the mean is
        registered as the buffer ``target_mean`` and the family derives its location from it, so there is no
        location to learn.
        """
        if value is not None and mean is not None:
            raise ValueError(f"give either {name} or mean (E[beta]) for {type(self).__name__}, not both")
        if fix_mean and value is not None:
            raise ValueError(f"fix_mean=True pins E[beta]: pass mean=..., not {name}=...")
        self.fix_mean = check_bool("fix_mean", fix_mean)
        if value is not None:
            return check(name, value)
        mean = check_positive_number("mean", 0.1 if mean is None else mean)
        if self.fix_mean:
            self.register_buffer("target_mean", torch.tensor(mean, dtype=dtype))
            return None
        return from_mean(mean)

    def _register_normal_rule(self):
        rule = deterministic_rule(self.integrator, self.nodes, 1)
        self.register_buffer("_z", rule.z[0, :, 0].clone(), persistent=False)
        self.register_buffer("_log_w", rule.log_weights.clone(), persistent=False)
        self._rule_nodes = rule.n_points
        # The error estimate compares the rule with a companion: only a strictly coarser one says anything (the
        # same rule would report a false 0). Without one the estimate is refused with the reason.
        coarse = rule.coarse
        if coarse is None or coarse.n_points >= rule.n_points:
            self._coarse_reason = getattr(rule, "coarse_reason", None) or "no strictly coarser companion rule exists"
            self._coarse_nodes, coarse = None, rule
        else:
            self._coarse_nodes = coarse.n_points
        self.register_buffer("_z_coarse", coarse.z[0, :, 0].clone(), persistent=False)
        self.register_buffer("_log_w_coarse", coarse.log_weights.clone(), persistent=False)

    def _cached(self, key, make):
        """Constant tensors (nodes, weights) converted once per dtype and device instead of on every call."""
        cache = self.__dict__.setdefault("_const_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _normal_nodes(self, dtype, device, coarse):
        """The rule's standard normal nodes (in the buffers' dtype) and its log-weights in ``dtype``."""
        z, log_w = (self._z_coarse, self._log_w_coarse) if coarse else (self._z, self._log_w)
        z = self._cached(("z", coarse, z.dtype, device), lambda: z.to(device=device))
        return z, self._cached(("log_w", coarse, dtype, device), lambda: log_w.to(device=device, dtype=dtype))

    def _uniform_log_weights(self, dtype, device):
        r = self.nodes
        return self._cached(("uniform", dtype, device),
                            lambda: torch.full((r,), -math.log(r), dtype=dtype, device=device))

    def _randn(self, shape, dtype, device, generator=None):
        gen = generator or self.generator
        return torch.randn(shape, generator=gen, dtype=dtype, device=gen.device).to(device)

    def _rand(self, shape, dtype, device, generator=None):
        gen = generator or self.generator
        return torch.rand(shape, generator=gen, dtype=dtype, device=gen.device).to(device)

    def _param(self, t: torch.Tensor, dtype, device) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- point


__all__ = [
    "DEFAULT_NODES",
    "DETERMINISTIC_INTEGRATORS",
    "FLOAT_DTYPES",
    "Strength",
    "StrengthPosterior",
    "check_float_dtype",
    "check_margin",
    "log_parameter",
    "working_dtype",
]
