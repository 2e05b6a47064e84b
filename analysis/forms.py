"""The functional forms, written in log space.

All forms predict log y so residuals are log-ratios: a 1% miss weighs the same at 2 nats as at
0.2 nats. The nonlinear forms use the log-sum-exp parameterisation (Chinchilla, Besiroglu et al.):
log L = LSE(e, s - alpha*u, ...) with E = exp(e), so every term stays positive without bounds.

  pure   y = (beta*X)^alpha          (VAR's notation; alpha < 0 for a decreasing loss)
         = a * X^b                   with a = beta^alpha, b = alpha
  floor  y = E + (X0/X)^alpha        (Henighan et al.: irreducible term E, alpha > 0)
         = E + A * X^-alpha          with A = X0^alpha
  joint  y = E + A/N^a + B/D^b       (Chinchilla approach 3)

u = log(X / x_ref) is the centred log input (x_ref = geometric mean of the data) because
centring decorrelates the prefactor from the exponent and makes the optimiser's job easy; the
helpers below convert the centred parameters to the reported ones.
"""

from __future__ import annotations

import math

import numpy as np

PARAM_NAMES = {
    "pure": ("alpha", "beta", "a", "b"),
    "floor": ("E", "X0", "alpha", "A"),
    "joint": ("E", "A", "B", "a", "b"),
}
# Free parameters of each form (the others are derived), for degrees of freedom.
PARAM_NAMES_FITTED = {"pure": ("alpha", "beta"), "floor": ("E", "X0", "alpha"), "joint": ("E", "A", "B", "a", "b")}


def logsumexp(terms: np.ndarray, axis: int = 0) -> np.ndarray:
    """log(sum(exp(terms))) over `axis`, stable; a few times faster than scipy's for 2-3 terms."""
    top = terms.max(axis=axis)
    return top + np.log(np.exp(terms - np.expand_dims(top, axis)).sum(axis=axis))


def _exp(value: float) -> float:
    """exp that saturates to inf: beta = exp(log a / alpha) is huge when alpha is near zero."""
    return math.exp(value) if value < 709 else math.inf


def pure_params(slope: float, intercept_c: float, u_ref: float) -> dict:
    """log y = slope*u + intercept_c with u = log X - u_ref  ->  alpha, beta, a, b (X in fit units)."""
    log_a = intercept_c - slope * u_ref
    beta = _exp(log_a / slope) if slope != 0 else math.nan
    return {"alpha": slope, "beta": beta, "a": _exp(log_a), "b": slope}


def pure_log_predict(params: dict, log_x: np.ndarray) -> np.ndarray:
    return math.log(params["a"]) + params["b"] * log_x


# ---------------------------------------------------------------- floor: theta = (e, s, alpha)


def floor_terms(theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    e, s, alpha = theta
    return np.stack([np.full_like(u, e), s - alpha * u])


def floor_log_predict_grad(theta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log y_hat and its Jacobian (n x 3) with respect to theta."""
    terms = floor_terms(theta, u)
    log_pred = logsumexp(terms, axis=0)
    w = np.exp(terms - log_pred)  # share of each term in the prediction
    jac = np.stack([w[0], w[1], -u * w[1]], axis=1)
    return log_pred, jac


def floor_params(theta: np.ndarray, u_ref: float) -> dict:
    e, s, alpha = theta
    log_a = s + alpha * u_ref  # undo centring: A*X^-alpha with X in fit units
    x0 = _exp(log_a / alpha) if alpha != 0 else math.nan
    return {"E": _exp(e), "X0": x0, "alpha": float(alpha), "A": _exp(log_a)}


def floor_theta(params: dict, u_ref: float) -> np.ndarray:
    log_a = math.log(params["A"])
    return np.array([math.log(params["E"]), log_a - params["alpha"] * u_ref, params["alpha"]])


def floor_log_predict(params: dict, log_x: np.ndarray) -> np.ndarray:
    return np.logaddexp(math.log(params["E"]), math.log(params["A"]) - params["alpha"] * log_x)


# ---------------------------------------------------------------- joint: theta = (e, sA, sB, a, b)


def joint_log_predict_grad(theta: np.ndarray, un: np.ndarray, ud: np.ndarray):
    e, sa, sb, a, b = theta
    terms = np.stack([np.full_like(un, e), sa - a * un, sb - b * ud])
    log_pred = logsumexp(terms, axis=0)
    w = np.exp(terms - log_pred)
    jac = np.stack([w[0], w[1], w[2], -un * w[1], -ud * w[2]], axis=1)
    return log_pred, jac


def joint_params(theta: np.ndarray, un_ref: float, ud_ref: float) -> dict:
    e, sa, sb, a, b = theta
    return {"E": _exp(e), "A": _exp(sa + a * un_ref), "B": _exp(sb + b * ud_ref),
            "a": float(a), "b": float(b)}


def joint_theta(params: dict, un_ref: float, ud_ref: float) -> np.ndarray:
    return np.array([math.log(params["E"]), math.log(params["A"]) - params["a"] * un_ref,
                     math.log(params["B"]) - params["b"] * ud_ref, params["a"], params["b"]])


def joint_log_predict(params: dict, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    terms = np.stack(np.broadcast_arrays(
        math.log(params["E"]),
        math.log(params["A"]) - params["a"] * log_n,
        math.log(params["B"]) - params["b"] * log_d,
    ))
    return logsumexp(terms, axis=0)


def log_predict(form: str, params: dict, log_x: np.ndarray, log_d: np.ndarray | None = None) -> np.ndarray:
    """log y at log X (fit units) for any form; `log_d` only for the joint form."""
    if form == "pure":
        return pure_log_predict(params, log_x)
    if form == "floor":
        return floor_log_predict(params, log_x)
    return joint_log_predict(params, log_x, log_d)


def to_raw(form: str, params: dict, scale: float, scale_d: float = 1.0) -> dict:
    """Parameters for X in base units (params, FLOP, tokens) instead of fit units (X/scale)."""
    if form == "pure":  # (beta * X/scale)^alpha: beta_raw = beta/scale; a_raw = a * scale^-b
        return {**params, "beta": params["beta"] / scale, "a": params["a"] * scale ** -params["b"]}
    if form == "floor":  # (X0/(X/scale))^alpha = (X0*scale / X)^alpha
        return {**params, "X0": params["X0"] * scale, "A": params["A"] * scale ** params["alpha"]}
    return {**params, "A": params["A"] * scale ** params["a"], "B": params["B"] * scale_d ** params["b"]}


def equation(form: str, params: dict, x_symbol: str = "X", y_name: str = "L", digits: int = 4) -> str:
    """The fitted law in its paper notation, e.g. 'L_mean = (2.31·N)^-0.2'."""
    from .units import fmt

    p = {k: fmt(v, digits) for k, v in params.items()}
    if form == "pure":
        return f"{y_name} = ({p['beta']}·{x_symbol})^{p['alpha']}"
    if form == "floor":
        return f"{y_name} = {p['E']} + ({p['X0']}/{x_symbol})^{p['alpha']}"
    return f"{y_name} = {p['E']} + {p['A']}/N^{p['a']} + {p['B']}/D^{p['b']}"
