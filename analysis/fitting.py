"""Point estimates: least squares for the pure law, summed Huber + multi-start L-BFGS for the others.

Besiroglu et al. (2404.10102) traced Chinchilla's implausible fit to an optimiser that stopped early:
with delta = 1e-3 a *mean*-reduced Huber loss is tiny, and L-BFGS's default tolerances fire before
the optimum. Here the objective is summed by default, the tolerances are set relative to the
objective's own gradient scale (so sum and mean reach the same optimum), and convergence is judged
from the gradient at the solution, not from the optimiser's message alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, nnls

from . import forms
from .threads import one_blas_thread

DEFAULT_DELTA = 1e-3
FLOOR_ALPHA_GRID = np.geomspace(0.02, 2.0, 40)
JOINT_EXPONENT_GRID = np.linspace(0.05, 1.5, 30)
N_STARTS = 6  # best grid cells handed to L-BFGS
MAX_EXPONENT = 10.0


@dataclass
class Optimum:
    theta: np.ndarray
    objective: float
    grad_norm: float  # |grad|_inf divided by its largest possible size (delta * max|jac| * weight)
    converged: bool
    message: str
    n_starts: int
    at_bound: list  # indices of parameters resting on a bound


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss per residual and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    loss = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    return loss, np.clip(r, -delta, delta)


def _objective(log_predict_grad, log_y: np.ndarray, delta: float, weight: float):
    def f(theta):
        log_pred, jac = log_predict_grad(theta)
        loss, dloss = huber(log_pred - log_y, delta)
        # Elementwise product, not `@`: a BLAS call on these tiny arrays wakes the BLAS thread pool,
        # which costs ~100x the arithmetic on a busy machine.
        return weight * loss.sum(), weight * (dloss[:, None] * jac).sum(axis=0)

    return f


def minimise(log_predict_grad, log_y, starts, delta=DEFAULT_DELTA, reduction="sum", rel_gtol=1e-12,
             bounds=None) -> Optimum:
    """Summed (or mean) Huber of log residuals, L-BFGS from each start; the best optimum wins.

    rel_gtol: stop when the gradient is this small relative to its natural size; bootstrap refits
    use a looser value than the reported fit (their spread dwarfs 1e-8). bounds keep a vanishing
    floor (log E -> -inf) from sending the optimiser on an endless walk.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    n = len(log_y)
    weight = 1.0 if reduction == "sum" else 1.0 / n
    f = _objective(log_predict_grad, log_y, delta, weight)
    best = None
    for start in starts:
        _, jac0 = log_predict_grad(np.asarray(start, float))
        # The gradient's natural size: every point pulling at the Huber slope delta.
        grad_scale = weight * n * delta * max(1.0, float(np.abs(jac0).max()))
        start = np.asarray(start, float)
        if bounds is not None:
            start = np.clip(start, [b[0] for b in bounds], [b[1] for b in bounds])
        res = minimize(f, start, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 20000, "maxcor": 30, "ftol": 0.0, "gtol": rel_gtol * grad_scale})
        if best is None or res.fun < best[0].fun:
            best = (res, grad_scale)
    res, grad_scale = best
    grad = f(res.x)[1]
    at_bound = []
    for i, (lo, hi) in enumerate(bounds or []):  # a bound holding the optimum back is no failure
        if (res.x[i] <= lo + 1e-9 and grad[i] > 0) or (res.x[i] >= hi - 1e-9 and grad[i] < 0):
            grad[i] = 0.0
            at_bound.append(i)
    grad_norm = float(np.abs(grad).max() / grad_scale)
    # Judged from the gradient, not the optimiser's message: L-BFGS-B also reports success when a
    # step merely stops decreasing the objective.
    converged = bool(np.all(np.isfinite(res.x)) and grad_norm < max(1e-6, 10 * rel_gtol))
    return Optimum(res.x, float(res.fun), grad_norm, converged, str(res.message), len(starts), at_bound)


# ---------------------------------------------------------------- pure law: ordinary least squares


def fit_pure(log_x: np.ndarray, log_y: np.ndarray) -> dict:
    u_ref = float(log_x.mean())
    u = log_x - u_ref
    slope = float(u @ (log_y - log_y.mean()) / (u @ u))
    return forms.pure_params(slope, float(log_y.mean()), u_ref)


# ---------------------------------------------------------------- starts by variable projection


def _nonneg_coefficients(columns: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Linear coefficients of y on positive basis columns (n x k); non-negative, cheap path first."""
    coef, *_ = np.linalg.lstsq(columns, y, rcond=None)
    return coef if np.all(coef >= 0) else nnls(columns, y)[0]


def _grid_starts(basis, exponent_grid, y: np.ndarray, n_keep: int) -> list[tuple]:
    """For each exponent tuple the coefficients are linear (VarPro idea); keep the best cells."""
    scored = []
    for exps in exponent_grid:
        cols = basis(exps)
        coef = _nonneg_coefficients(cols, y)
        pred = cols @ coef
        if np.all(pred > 0):
            scored.append((float(np.sum(np.log(pred / y) ** 2)), exps, coef))
    scored.sort(key=lambda item: item[0])
    return [(exps, coef) for _, exps, coef in scored[:n_keep]]


@one_blas_thread
def fit_floor(log_x, log_y, delta=DEFAULT_DELTA, reduction="sum", start: dict | None = None):
    """L = E + A X^-alpha; returns (params in fit units, Optimum)."""
    u_ref = float(log_x.mean())
    u = log_x - u_ref
    y = np.exp(log_y)
    floor_min = 1e-6 * y.min()  # log E needs E > 0; a vanishing E is the pure law
    if start is not None:
        starts = [forms.floor_theta(start, u_ref)]
    else:
        cells = _grid_starts(lambda e: np.stack([np.ones_like(u), np.exp(-e[0] * u)], axis=1),
                             [(a,) for a in FLOOR_ALPHA_GRID], y, N_STARTS)
        starts = [[np.log(max(c[0], floor_min)), np.log(max(c[1], floor_min)), e[0]] for e, c in cells]
    bounds = [(np.log(floor_min), float(log_y.min())), (-np.inf, np.inf), (0.0, MAX_EXPONENT)]
    opt = minimise(lambda th: forms.floor_log_predict_grad(th, u), log_y, starts, delta, reduction,
                   1e-12 if start is None else 1e-6, bounds)
    return forms.floor_params(opt.theta, u_ref), opt


@one_blas_thread
def fit_joint(log_n, log_d, log_y, delta=DEFAULT_DELTA, reduction="sum", start: dict | None = None):
    """L = E + A/N^a + B/D^b; returns (params in fit units, Optimum)."""
    un_ref, ud_ref = float(log_n.mean()), float(log_d.mean())
    un, ud = log_n - un_ref, log_d - ud_ref
    y = np.exp(log_y)
    tiny = 1e-6 * y.min()
    if start is not None:
        starts = [forms.joint_theta(start, un_ref, ud_ref)]
    else:
        grid = [(a, b) for a in JOINT_EXPONENT_GRID for b in JOINT_EXPONENT_GRID]
        cells = _grid_starts(
            lambda e: np.stack([np.ones_like(un), np.exp(-e[0] * un), np.exp(-e[1] * ud)], axis=1),
            grid, y, N_STARTS)
        starts = [[*np.log(np.maximum(c, tiny)), e[0], e[1]] for e, c in cells]
    bounds = [(np.log(tiny), float(log_y.min())), (-np.inf, np.inf), (-np.inf, np.inf),
              (0.0, MAX_EXPONENT), (0.0, MAX_EXPONENT)]
    opt = minimise(lambda th: forms.joint_log_predict_grad(th, un, ud), log_y, starts, delta, reduction,
                   1e-12 if start is None else 1e-6, bounds)
    return forms.joint_params(opt.theta, un_ref, ud_ref), opt


def design_condition(log_n: np.ndarray, log_d: np.ndarray) -> float:
    """Condition number of the standardised (log N, log D) design.

    With D = k*N (a fixed tokens-per-parameter ratio) the columns are identical and the A/N^a and
    B/D^b terms cannot be told apart; the number is sqrt((1+|rho|)/(1-|rho|)) for correlation rho.
    """
    cols = np.stack([log_n - log_n.mean(), log_d - log_d.mean()], axis=1)
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms < 1e-12 * (1 + np.abs(np.stack([log_n, log_d])).max())):
        return float("inf")
    s = np.linalg.svd(cols / norms, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
