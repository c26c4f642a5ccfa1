"""The optimizers of the simulated log-likelihood, and the Newton polish that ends every fit.

``optimizer=`` in :meth:`mixlogit.model.MixedLogit.fit` picks one of :data:`OPTIMIZERS`:

- ``"bfgs-hessian"`` (the default): BFGS started from the BHHH matrix (:func:`mixlogit.msl.maximize`) until an
  iteration gains less than :data:`REFRESH_GAIN` log-likelihood, then BFGS again from that point started from the
  exact inverse Hessian (:meth:`mixlogit.msl.MSLProblem.hessian`, closed form). Near the optimum BFGS's own
  approximation is what holds it back: refreshed once, it finishes in a few steps. Where the Hessian is not
  negative definite there, the second BFGS starts from the BHHH matrix instead, and where the second stops short
  of ``gtol`` (a line search that cannot improve) a third starts from the BHHH matrix at its end.
- ``"bfgs"``: BFGS started from the BHHH matrix alone, the optimizer before ``"bfgs-hessian"``.
- ``"trust-exact"``: scipy's trust-region Newton with the exact Hessian at every iterate (which handles an
  indefinite Hessian far from the optimum); BFGS takes over where it stops short of ``gtol``.

In mixed precision (:mod:`mixlogit.precision`) only the first BFGS runs in float32: the refreshed BFGS and
trust-exact run on the float64 problem, where float32 noise cannot stall their line searches or trust-region
ratios (on E1, mixed with ``"bfgs-hessian"``: 16 value+gradient evaluations, the same LL to 1e-12).

Every optimizer stops at the same test: the largest absolute gradient entry below ``gtol`` (scipy's BFGS
criterion; trust-exact's, the gradient's 2-norm, is stricter), after which :func:`polish` decides convergence
with the exact Hessian, which the standard errors need anyway.

On E1 (Train's electricity data, six normal coefficients, 1,000 plain Halton draws, one thread) a whole fit with
``"bfgs"`` takes 43 iterations, 45 value+gradient evaluations and one Hessian (the standard errors'); with
``"bfgs-hessian"`` 13 iterations, 15 evaluations and two Hessians (each costs about 8 evaluations), at the same
log-likelihood and standard errors to 4e-8, 1.7x faster (median of 5 paired runs); trust-exact takes 10
evaluations and 10 Hessians, 0.7x, and climbs to another local optimum (sd.loc of the other sign, which these
draws do not make symmetric). At 10,000 draws bfgs-hessian takes 17 evaluations against 48, 1.6x faster (median
of 3 paired runs), LL within 4e-12 and SEs within 2e-8. ``benchmarks/bench_msl.py --optimizer`` measures them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize

from .msl import MSLProblem, OptimizeResult, judge, maximize, positive_definite_inverse
from .progress import progress_bar

#: Values accepted by ``optimizer=``, the default first.
OPTIMIZERS = ("bfgs-hessian", "bfgs", "trust-exact")

#: ``"bfgs-hessian"`` refreshes BFGS with the exact Hessian after the first iteration that gains less
#: log-likelihood than this: the log-likelihood is then nearly quadratic over a step, so the Hessian there is the
#: one the remaining steps need. (On E1 the gains fall below it after 9 of BFGS's 43 iterations, 0.18 below the
#: optimum; thresholds from 0.01 to 10 give whole fits of 14 to 19 value+gradient evaluations.)
REFRESH_GAIN = 0.1


def check_optimizer(optimizer) -> str:
    """``optimizer`` when it is one of :data:`OPTIMIZERS`; otherwise a ValueError listing them."""
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(map(repr, OPTIMIZERS))}")
    return optimizer


class Evaluations:
    """``problem`` with its value+gradient and Hessian remembered at the last point each was asked for.

    scipy asks again for the point it ends at, :func:`mixlogit.msl.judge` for the value and gradient there and
    :func:`polish` for the Hessian there (which a trust region has already computed): each is computed once.
    Everything else is ``problem``'s own.
    """

    def __init__(self, problem: MSLProblem):
        self.problem = problem
        self._last: dict[str, tuple[bytes, object]] = {}

    def __getattr__(self, name):
        return getattr(self.problem, name)

    def _remembered(self, kind: str, theta, compute):
        key = np.asarray(theta, dtype=np.float64).tobytes()
        if kind not in self._last or self._last[kind][0] != key:
            self._last[kind] = (key, compute(theta))
        return self._last[kind][1]

    def value_and_grad(self, theta) -> tuple[float, np.ndarray]:
        value, grad = self._remembered("value_and_grad", theta, self.problem.value_and_grad)
        return value, grad.copy()

    def hessian(self, theta) -> np.ndarray:
        return self._remembered("hessian", theta, self.problem.hessian).copy()


def search(problem: MSLProblem, start: np.ndarray, optimizer: str = OPTIMIZERS[0], *, maxiter: int = 2000,
           gtol: float = 1e-5, callback=None, stop_gain: float | None = None,
           finish: MSLProblem | None = None) -> OptimizeResult:
    """Maximize the simulated log-likelihood from ``start`` with ``optimizer`` (see the module's notes).

    ``maxiter`` bounds the iterations of all phases together; ``callback(n_iter, x)`` follows every iteration;
    ``stop_gain`` as in :func:`mixlogit.msl.maximize` (a search in mixed precision). ``finish``: the problem of
    every phase after the first BFGS, and of trust-exact (the float64 twin of a mixed-precision ``problem``, whose
    noise would stall line searches and trust-region ratios near the optimum; each phase spends a float64
    Hessian anyway); default ``problem``. ``"bfgs"`` runs on ``problem`` alone.
    """
    check_optimizer(optimizer)
    if optimizer == "bfgs":
        return maximize(problem, start, maxiter=maxiter, gtol=gtol, callback=callback, stop_gain=stop_gain)
    finish = problem if finish is None else finish
    if finish is not problem:
        stop_gain = None
    if optimizer == "trust-exact":
        opt, restarts = _trust_exact(finish, start, maxiter=maxiter, gtol=gtol, callback=callback), ["bhhh"]
    else:
        opt = maximize(problem, start, maxiter=maxiter, gtol=gtol, callback=callback,
                       stop_gain=max(REFRESH_GAIN, stop_gain or 0.0))
        # A search in mixed precision that stops by its gain is done: the float64 check after it takes over.
        restarts = ["hessian"] + (["bhhh"] if stop_gain is None else [])
    for restart in restarts:  # BFGS again where the last phase stopped short of gtol with iterations left
        if not _unfinished(opt, gtol, maxiter):
            break
        hess_inv0 = positive_definite_inverse(-finish.hessian(opt.theta)) if restart == "hessian" else None
        done = opt.n_iter
        more = maximize(finish, opt.theta, maxiter=maxiter - done, gtol=gtol, stop_gain=stop_gain,
                        hess_inv0=hess_inv0,
                        callback=None if callback is None else (lambda n_iter, x, done=done: callback(done + n_iter, x)))
        opt = OptimizeResult(more.theta, more.loglik, more.converged, done + more.n_iter, more.message,
                             more.grad_norm, more.grad)
    return opt


def _unfinished(opt: OptimizeResult, gtol: float, maxiter: int) -> bool:
    """Whether a first phase ended short of ``gtol`` with iterations left (not judge's looser 1e-4 floor)."""
    return bool(math.isfinite(opt.loglik) and opt.grad_norm >= gtol and opt.n_iter < maxiter)


def _trust_exact(problem: MSLProblem, start: np.ndarray, *, maxiter: int, gtol: float, callback) -> OptimizeResult:
    n_iter = 0

    def fun(x):
        v, g = problem.value_and_grad(x)
        if not math.isfinite(v) or not np.all(np.isfinite(g)):
            return np.inf, np.zeros_like(g)  # outside the region where it is defined: the step is refused
        return -v, -g

    def cb(intermediate_result):
        nonlocal n_iter
        n_iter += 1
        if callback is not None:
            callback(n_iter, intermediate_result.x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = optimize.minimize(fun, start, jac=True, hess=lambda x: -problem.hessian(x), method="trust-exact",
                              callback=cb, options={"maxiter": maxiter, "gtol": gtol})
    return judge(problem, r.x, gtol, int(r.nit), str(r.message))


def find_optimum(problem: MSLProblem, searched: MSLProblem, starts: list[np.ndarray], *, optimizer: str,
                 maxiter: int, gtol: float, stop_gain: float | None, progress: bool
                 ) -> tuple[OptimizeResult, np.ndarray]:
    """The best of the searches from ``starts`` on ``searched`` (``problem`` itself, or its mixed-precision twin),
    judged and polished on ``problem`` in float64; and the exact Hessian at the returned point."""
    problem = Evaluations(problem)
    searched = problem if searched is problem.problem else Evaluations(searched)
    best = None
    for i, s in enumerate(starts):
        bar = progress_bar(progress, desc=f"MSL start {i + 1}/{len(starts)}" if len(starts) > 1 else "MSL")
        opt = search(searched, s, optimizer, maxiter=maxiter, gtol=gtol, stop_gain=stop_gain, finish=problem,
                     callback=(lambda n_iter, xk, bar=bar: bar.update(1)) if bar is not None else None)
        if bar is not None:
            bar.close()
        if best is None or (np.isfinite(opt.loglik) and opt.loglik > best.loglik):
            best = opt
    if searched is not problem:  # convergence is judged, and the optimum polished, in float64
        best = judge(problem, best.theta, gtol, best.n_iter, best.message)
    best, hessian = polish(problem, best, max_steps=max(0, maxiter - best.n_iter))
    if searched is not problem and not best.converged:  # the float32 search ended too far out: go on in float64
        resumed = maximize(problem, best.theta, maxiter=maxiter, gtol=gtol)
        best, hessian = polish(problem, resumed, max_steps=max(0, maxiter - resumed.n_iter))
    return best, hessian


#: A point whose Newton step is shorter than 0.01 standard errors (``g'(-H)^-1 g < 1e-4``, the step's squared
#: length in the metric of the asymptotic covariance) counts as the optimum: the remaining error is
#: negligible next to the sampling error.
DECREMENT_TOL = 0.5e-4


def newton_decrement(grad: np.ndarray, hessian: np.ndarray) -> float:
    """The log-likelihood gain a Newton step predicts, ``g' (-H)^-1 g / 2``; inf unless -H is positive definite.

    Twice the decrement is the squared length of the Newton step in standard-error units.

    A scale-free convergence check that also works where the simulated likelihood has kinks (censored
    coefficients), so the gradient cannot reach ``gtol`` although the optimum is found.
    """
    try:
        chol = np.linalg.cholesky(-0.5 * (hessian + hessian.T))
    except np.linalg.LinAlgError:
        return math.inf
    y = np.linalg.solve(chol, grad)
    return 0.5 * float(y @ y)


#: Where the simulated likelihood has kinks and no step along the Newton direction gains anything, a Newton
#: step shorter than 0.05 standard errors (``g'(-H)^-1 g < 2.5e-3``) still counts as the optimum.
KINK_DECREMENT_TOL = 1.25e-3


def polish(problem: MSLProblem, opt: OptimizeResult, max_steps: int = 10) -> tuple[OptimizeResult, np.ndarray]:
    """Newton steps with the exact Hessian and backtracking after BFGS, until the Newton decrement is below
    :data:`DECREMENT_TOL`. Returns the (possibly improved) result with its ``converged`` flag decided, and the
    Hessian at the returned point.

    BFGS usually ends converged and this costs one Hessian (needed for the standard errors anyway). It matters
    for kinked likelihoods (censored coefficients), where BFGS's line search stalls short of ``gtol``.
    """
    theta, value, grad = opt.theta, opt.loglik, opt.grad
    hess = problem.hessian(theta)
    message = opt.message
    if opt.converged:
        return opt, hess
    for _ in range(max_steps):
        dec = newton_decrement(grad, hess)
        if dec < DECREMENT_TOL:
            break
        if not math.isfinite(dec):
            message = "the Hessian is not negative definite at the last point"
            break
        step = np.linalg.solve(-hess, grad)
        improved = False
        for t in (1.0, 0.5, 0.25, 0.125, 0.0625):
            cand = theta + t * step
            v = problem.loglik(cand)
            if math.isfinite(v) and v > value:
                improved = True
                break
        if not improved:
            if dec < KINK_DECREMENT_TOL:
                message = "optimum at a kink of the simulated likelihood (Newton step < 0.05 standard errors)"
                return OptimizeResult(theta, value, True, opt.n_iter, message, opt.grad_norm, grad), hess
            break
        theta = cand
        value, grad = problem.value_and_grad(theta)
        hess = problem.hessian(theta)
    dec = newton_decrement(grad, hess)
    gnorm = float(np.max(np.abs(grad)))
    converged = bool(math.isfinite(value) and (gnorm < 1e-4 or dec < DECREMENT_TOL))
    if converged:
        message = "converged (Newton decrement)"
    return OptimizeResult(theta, value, converged, opt.n_iter, message, gnorm, grad), hess


