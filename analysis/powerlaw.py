"""Power-law fits with their uncertainty and quality: the `Fit` object everything else reports.

`fit_law` fits y against one X (pure or floor form), `fit_joint` fits L(N, D). Both bootstrap over
runs (resample whole runs with replacement, refit, take percentiles) for an interval on every
parameter, compute Pearson r and R^2 in log-log, and attach warnings: few sizes, curved residuals
of the pure law, a collinear N/D design, an optimiser that did not converge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from . import fitting, forms
from .threads import one_blas_thread
from .units import Axis, fmt

MIN_SIZES = 5
CURVATURE_T = 3.0  # |t| of a quadratic term in the residuals that counts as systematic curvature
JOINT_COND_MAX = 30.0  # standardised design condition number; 30 <=> |corr(log N, log D)| > 0.998
NONNEGATIVE = {("floor", "alpha"), ("joint", "a"), ("joint", "b")}  # bounded at 0 in the optimiser
MUST_BE_FINITE = {"pure": ("alpha", "a"), "floor": ("E", "alpha", "A"), "joint": ("E", "A", "B", "a", "b")}
SCALE_PARAMS = {"pure": {"beta", "a"}, "floor": {"E", "X0", "A"}, "joint": {"E", "A", "B"}}  # positive


@dataclass
class Fit:
    form: str  # pure | floor | joint
    y_name: str
    axis: Axis  # X (N for the joint form)
    params: dict  # in fit units (axis.unit), unrounded
    params_raw: dict  # for X in base units (params, FLOP, tokens)
    data: dict  # raw x (and d), y, runs of the fitted points
    quality: dict
    optimizer: dict
    converged: bool
    axis_d: Axis | None = None
    ci: dict = field(default_factory=dict)  # name -> [lo, hi], fit units
    ci_level: float = 0.95
    boot: np.ndarray | None = None  # (n_ok, n_params) in PARAM_NAMES order, fit units
    n_boot_failed: int = 0
    extrapolation: dict | None = None
    warnings: list[str] = field(default_factory=list)
    kind: str = "endpoint"  # endpoint | frontier | joint | isoflop

    def log_predict(self, x_raw, d_raw=None, params: dict | None = None) -> np.ndarray:
        lx = np.log(np.asarray(x_raw, float) / self.axis.scale)
        ld = None if d_raw is None else np.log(np.asarray(d_raw, float) / self.axis_d.scale)
        return forms.log_predict(self.form, params or self.params, lx, ld)

    def predict(self, x_raw, d_raw=None) -> np.ndarray:
        return np.exp(self.log_predict(x_raw, d_raw))

    def boot_params(self) -> list[dict]:
        names = forms.PARAM_NAMES[self.form]
        return [] if self.boot is None else [dict(zip(names, row)) for row in self.boot]

    def equation(self) -> str:
        return forms.equation(self.form, self.params, self.axis.symbol, self.y_name)

    def units_note(self) -> str:
        note = f"{self.axis.symbol} in {self.axis.unit}"
        if self.axis.convention:
            note += f", {self.axis.convention} FLOPs"
        if self.axis_d is not None:
            note += f"; {self.axis_d.symbol} in {self.axis_d.unit}"
        return note

    def headline(self) -> str:
        q = self.quality
        text = f"{self.equation()}   [{self.units_note()}]"
        if self.form == "pure":
            text += f"  ≡ {fmt(self.params['a'])}·{self.axis.symbol}^{fmt(self.params['b'])}"
        text += f"  r={q['pearson_r']:.4f}  R²={q['r2']:.4f}  n={q['n_points']}"
        exponent = "alpha" if self.form != "joint" else "a"
        if exponent in self.ci:
            lo, hi = self.ci[exponent]
            text += f"  {exponent} {int(round(self.ci_level * 100))}% CI [{fmt(lo)}, {fmt(hi)}]"
        return text

    def to_dict(self) -> dict:
        return {
            "form": self.form, "kind": self.kind, "y": self.y_name, "equation": self.equation(),
            "units": self.units_note(), "x": self.axis.to_dict(),
            "d": self.axis_d.to_dict() if self.axis_d else None,
            "params": self.params, "params_raw_units": self.params_raw,
            "ci": self.ci, "ci_level": self.ci_level,
            "n_boot": 0 if self.boot is None else len(self.boot), "n_boot_failed": self.n_boot_failed,
            "quality": self.quality, "converged": self.converged, "optimizer": self.optimizer,
            "extrapolation": self.extrapolation, "warnings": self.warnings,
            "data": {k: list(v) for k, v in self.data.items()},
        }


# ---------------------------------------------------------------- one X


def _point_fit(form, lx, ly, delta, reduction, start=None):
    if form == "pure":
        return fitting.fit_pure(lx, ly), None
    if form == "floor":
        return fitting.fit_floor(lx, ly, delta, reduction, start)
    raise ValueError(f"unknown form {form!r} (pure | floor; use fit_joint for L(N, D))")


@one_blas_thread
def fit_law(x, y, axis: Axis, *, form="pure", y_name="L", runs=None, n_boot=1000, ci_level=0.95,
            delta=fitting.DEFAULT_DELTA, reduction="sum", holdout=0, seed=0,
            resample: Callable | None = None, kind="endpoint", progress=False, n_units=None) -> Fit:
    """Fit y against raw X (axis.spec units; rescaled by axis.scale inside).

    runs: the run each point belongs to (bootstrap unit). resample(rng) -> (x, y) replaces the default
    run bootstrap, e.g. to rebuild the compute frontier from resampled runs; n_units is then the
    number of resampled units (default: distinct runs).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    runs = list(runs) if runs is not None else [str(i) for i in range(len(x))]
    warnings: list[str] = []
    tag = f"{y_name} vs {axis.symbol}" + (f" ({axis.convention} FLOPs, {kind})" if axis.convention else "")
    n_sizes = len(np.unique(x))
    if n_sizes < 2 or (form == "floor" and n_sizes < 3):
        raise ValueError(f"{tag}: {n_sizes} distinct X value(s), too few for a {form} fit")
    lx, ly = np.log(x / axis.scale), np.log(y)
    params, opt = _point_fit(form, lx, ly, delta, reduction)
    log_pred = forms.log_predict(form, params, lx)
    fit = Fit(form, y_name, axis, params, forms.to_raw(form, params, axis.scale),
              {"x": x, "y": y, "runs": runs}, _quality(lx, ly, log_pred), _optimizer_info(opt),
              opt is None or opt.converged, ci_level=ci_level, warnings=warnings, kind=kind)
    fit.quality["n_units"] = n_units or len(set(runs))
    if n_sizes < MIN_SIZES:
        warnings.append(f"{tag}, {form}: only {n_sizes} distinct {axis.symbol} values (< {MIN_SIZES}); "
                        "the exponent is weakly constrained")
    if not fit.converged:
        warnings.append(f"{tag}, {form}: optimiser did not converge ({opt.message})")
    if form == "pure":
        t = _curvature_t(lx, ly - log_pred)
        fit.quality["curvature_t"] = t
        if abs(t) > CURVATURE_T:
            warnings.append(f"{tag}: residuals of the pure power law are curved "
                            f"(t={t:.1f}); try the irreducible form L = E + (X0/X)^alpha")
    if form == "floor" and params["E"] < 1e-4 * y.min():
        warnings.append(f"{tag}, floor: E ~ 0, the data show no irreducible term")
    elif opt is not None and opt.at_bound:
        warnings.append(f"{tag}, {form}: {_bound_names(form, opt.at_bound)} at the optimiser's bound; "
                        "the form is degenerate on these data")

    def refit(xs, ys):
        if len(np.unique(xs)) < (3 if form == "floor" else 2):
            return None
        p, o = _point_fit(form, np.log(xs / axis.scale), np.log(ys), delta, reduction, start=params)
        return p if o is None or o.converged else None

    if resample is None:
        resample = _run_resampler(runs, x, y)
    _bootstrap(fit, lambda rng: refit(*resample(rng)), n_boot, seed, progress, tag)
    if form == "pure" and "alpha" in fit.ci and fit.ci["alpha"][0] < 0 < fit.ci["alpha"][1]:
        warnings.append(f"{tag}: the exponent's {int(round(ci_level * 100))}% interval contains 0: "
                        "no significant scaling")
    if holdout:
        fit.extrapolation = _extrapolation(x, y, runs, holdout, axis, form, y_name, delta, reduction,
                                           min(n_boot, 200), ci_level, seed)
    return fit


def _run_resampler(runs, *arrays):
    """Resample whole runs with replacement (all points of a drawn run come along)."""
    names = sorted(set(runs))
    index = {name: np.flatnonzero(np.asarray(runs) == name) for name in names}

    def draw(rng):
        picks = rng.integers(0, len(names), len(names))
        idx = np.concatenate([index[names[i]] for i in picks])
        return tuple(a[idx] for a in arrays)

    return draw


def _bootstrap(fit: Fit, refit: Callable, n_boot: int, seed: int, progress: bool, tag: str) -> None:
    rng = np.random.default_rng(seed)
    names = forms.PARAM_NAMES[fit.form]
    rows, failed = [], 0
    draws = range(n_boot)
    if progress:
        from tqdm import tqdm

        draws = tqdm(draws, desc=f"bootstrap {tag} {fit.form}", leave=False)
    for _ in draws:
        p = refit(rng)
        # beta = a^(1/alpha) and X0 overflow when alpha ~ 0: a valid fit, so only the free
        # parameters must be finite.
        if p is None or not all(math.isfinite(p[k]) for k in MUST_BE_FINITE[fit.form]):
            failed += 1
            continue
        rows.append([p[k] for k in names])
    fit.n_boot_failed = failed
    if not rows:
        return
    fit.boot = np.array(rows)
    n_units = fit.quality.get("n_units", len(set(fit.data["runs"])))
    factor = _small_sample_factor(n_units, len(forms.PARAM_NAMES_FITTED[fit.form]), fit.ci_level)
    fit.quality["ci_small_sample_factor"] = factor
    tail = 100 * (1 - fit.ci_level) / 2
    for k, name in enumerate(names):
        est, column = fit.params[name], fit.boot[:, k]
        scale_param = name in SCALE_PARAMS[fit.form]
        if scale_param:  # prefactors and floors are positive: widen them in log space
            est = math.log(min(max(est, 1e-300), 1e300)) if not math.isnan(est) else est
            column = np.log(np.clip(column, 1e-300, 1e300))
        lo, hi = np.percentile(column, [tail, 100 - tail])
        if math.isfinite(est):
            lo, hi = est + factor * (lo - est), est + factor * (hi - est)
        if (fit.form, name) in NONNEGATIVE:  # widening must not cross the optimiser's bound
            lo = max(lo, 0.0)
        fit.ci[name] = [forms._exp(lo), forms._exp(hi)] if scale_param else [float(lo), float(hi)]
    if failed > 0.1 * n_boot:
        fit.warnings.append(f"{tag}, {fit.form}: {failed}/{n_boot} bootstrap refits failed or were "
                            "degenerate; intervals are less reliable")


def _small_sample_factor(n_units: int, n_params: int, level: float) -> float:
    """Widening of percentile intervals when few runs carry the fit.

    Resampling n runs underestimates the spread of a p-parameter fit by about sqrt((n-p)/n) (the
    HC0-vs-HC1 correction) and normal tails are too thin with n-p degrees of freedom; without this
    a nominal 90% interval from 12 sizes covers the truth only ~85% of the time.
    """
    dof = n_units - n_params
    if dof < 1:
        return 1.0
    q = 0.5 + level / 2
    return float(math.sqrt(n_units / dof) * stats.t.ppf(q, dof) / stats.norm.ppf(q))


def _quality(lx, ly, log_pred) -> dict:
    resid = ly - log_pred
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r = float(np.corrcoef(lx, ly)[0, 1]) if np.std(lx) > 0 and np.std(ly) > 0 else math.nan
    return {
        "n_points": int(len(ly)), "n_sizes": int(len(np.unique(lx))),
        "pearson_r": r,  # of log X and log y: VAR's headline statistic, whatever the form
        "r2": 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan,
        "rmse_log": float(np.sqrt(np.mean(resid**2))),
        "max_abs_log_resid": float(np.abs(resid).max()),
    }


def _curvature_t(lx, resid) -> float:
    """t statistic of a quadratic term fitted to the residuals of a straight log-log line."""
    n = len(lx)
    if n < 5 or np.sqrt(np.mean(resid**2)) < 1e-9:  # noise-free straight line: nothing to test
        return 0.0
    u = lx - lx.mean()
    design = np.stack([np.ones(n), u, u**2], axis=1)
    coef, *_ = np.linalg.lstsq(design, resid, rcond=None)
    res = resid - design @ coef
    sigma2 = float(res @ res) / (n - 3)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    if cov[2, 2] <= 0 or sigma2 <= 0:  # the quadratic explains the residuals exactly
        return math.copysign(math.inf, coef[2])
    return float(coef[2] / np.sqrt(cov[2, 2]))


def _bound_names(form: str, indices: list[int]) -> str:
    theta_names = {"floor": ("E", "A", "alpha"), "joint": ("E", "A", "B", "a", "b")}[form]
    return ", ".join(theta_names[i] for i in indices)


def _optimizer_info(opt) -> dict:
    if opt is None:
        return {"method": "ordinary least squares in log-log", "converged": True}
    return {"method": "L-BFGS-B on summed Huber of log residuals", "objective": opt.objective,
            "relative_grad_norm": opt.grad_norm, "n_starts": opt.n_starts, "message": opt.message,
            "parameters_at_bound": opt.at_bound, "converged": opt.converged}


def _extrapolation(x, y, runs, holdout, axis, form, y_name, delta, reduction, n_boot, ci_level, seed):
    """Fit without the `holdout` largest sizes, predict them; relative error and interval check.

    "inside" asks whether the observed value lies in the bootstrap band of the prediction, which
    carries parameter uncertainty only (not the scatter of a single run).
    """
    sizes = np.unique(x)
    if len(sizes) - holdout < (3 if form == "floor" else 2) or holdout < 1:
        return {"skipped": f"{len(sizes)} sizes: too few to hold out {holdout}"}
    held = x >= sizes[-holdout]
    sub = fit_law(x[~held], y[~held], axis, form=form, y_name=y_name, runs=np.asarray(runs)[~held],
                  n_boot=n_boot, ci_level=ci_level, delta=delta, reduction=reduction, seed=seed + 1)
    pred = sub.predict(x[held])
    out = {"holdout_sizes": [float(s) for s in sizes[-holdout:]], "fit_params": sub.params,
           "points": [], "mean_abs_rel_error": float(np.mean(np.abs(pred / y[held] - 1)))}
    bands = None
    if sub.boot is not None:
        preds = np.exp([sub.log_predict(x[held], params=p) for p in sub.boot_params()])
        tail = 100 * (1 - ci_level) / 2
        bands = np.percentile(preds, [tail, 100 - tail], axis=0)
    for i, (xv, yv, pv) in enumerate(zip(x[held], y[held], pred)):
        point = {"x": float(xv), "y": float(yv), "y_pred": float(pv), "rel_error": float(pv / yv - 1)}
        if bands is not None:
            point["interval"] = [float(bands[0, i]), float(bands[1, i])]
            point["inside"] = bool(bands[0, i] <= yv <= bands[1, i])
        out["points"].append(point)
    return out


# ---------------------------------------------------------------- L(N, D)


@one_blas_thread
def fit_joint(n, d, y, axis_n: Axis, axis_d: Axis, *, y_name="L", runs=None, n_boot=1000, ci_level=0.95,
              delta=fitting.DEFAULT_DELTA, reduction="sum", seed=0, progress=False) -> Fit:
    """Chinchilla's L(N, D) = E + A/N^a + B/D^b, with a design-conditioning check."""
    n, d, y = (np.asarray(v, float) for v in (n, d, y))
    runs = list(runs) if runs is not None else [str(i) for i in range(len(n))]
    if len(y) < 6:
        raise ValueError(f"{y_name}(N, D): {len(y)} points, too few for 5 parameters")
    ln, ld, ly = np.log(n / axis_n.scale), np.log(d / axis_d.scale), np.log(y)
    params, opt = fitting.fit_joint(ln, ld, ly, delta, reduction)
    log_pred = forms.joint_log_predict(params, ln, ld)
    quality = _quality(log_pred, ly, log_pred)  # r of predicted vs observed log L
    quality["n_sizes"] = int(len(np.unique(n)))
    cond = fitting.design_condition(ln, ld)
    quality["design_condition"] = cond
    quality["corr_logN_logD"] = float(np.corrcoef(ln, ld)[0, 1]) if np.std(ln) > 0 and np.std(ld) > 0 else math.nan
    raw = forms.to_raw("joint", params, axis_n.scale, axis_d.scale)
    a, b = params["a"], params["b"]
    # Compute-optimal allocation under C = 6ND (Chinchilla): N_opt ~ C^(b/(a+b)), D_opt ~ C^(a/(a+b)).
    quality["n_units"] = len(set(runs))
    quality["N_opt_exponent"] = b / (a + b) if a + b > 0 else math.nan
    quality["D_opt_exponent"] = a / (a + b) if a + b > 0 else math.nan
    fit = Fit("joint", y_name, axis_n, params, raw, {"x": n, "d": d, "y": y, "runs": runs}, quality,
              _optimizer_info(opt), opt.converged, axis_d=axis_d, ci_level=ci_level, kind="joint")
    if not math.isfinite(cond) or cond > JOINT_COND_MAX:
        fit.warnings.append(f"{y_name}(N, D): ill-conditioned design (condition number {cond:.3g} of "
                            "standardised log N, log D; D/N nearly constant): A, B, a, b are not "
                            "separately identified; vary tokens per parameter")
    if not opt.converged:
        fit.warnings.append(f"{y_name}(N, D): optimiser did not converge ({opt.message})")
    if opt.at_bound:
        fit.warnings.append(f"{y_name}(N, D): {_bound_names('joint', opt.at_bound)} at the optimiser's bound")
    if len(np.unique(n)) < MIN_SIZES:
        fit.warnings.append(f"{y_name}(N, D): only {len(np.unique(n))} sizes (< {MIN_SIZES})")
    draw = _run_resampler(runs, n, d, y)

    def refit(rng):
        ns, ds, ys = draw(rng)
        if len(np.unique(ns)) < 2 or len(ys) < 6:
            return None
        p, o = fitting.fit_joint(np.log(ns / axis_n.scale), np.log(ds / axis_d.scale), np.log(ys),
                                 delta, reduction, start=params)
        return p if o.converged else None

    _bootstrap(fit, refit, n_boot, seed, progress, f"{y_name}(N, D)")
    return fit
