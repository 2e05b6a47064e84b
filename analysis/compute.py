"""Compute-side analysis: the C_min frontier, iso-FLOP profiles and the compute-optimal N(C).

Frontier (Kaplan's C_min, VAR's Fig. 6): pool every evaluation of every run as a (compute, loss)
point; a point is on the frontier when no point at lower or equal compute has a lower loss. Its
loss is then reached first at that compute, which is what L(C_min) describes. `lower_envelope`
gives the same curve continuously (curves interpolated in log-log, minimum over runs) for plots
and checks. Intermediate (non-annealed) evaluations are fine here and only here.

Iso-FLOP (Chinchilla approach 2): annealed endpoints grouped by training budget; a parabola of
loss against log N per budget gives N_opt(C), then a power law through the minima. Approach 2 is
biased by off-centre or wide sampling grids (see the reference notes), so compare it with the
joint L(N, D) fit rather than trusting it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import fitting
from .powerlaw import fit_law
from .records import RunTable, finite
from .units import Axis, axis_for


@dataclass
class Curve:
    run: str
    n_params: float
    c: np.ndarray  # raw compute at each evaluation, increasing
    y: np.ndarray


def curves(table: RunTable, y: str, axis: Axis, size: str = "params_total") -> list[Curve]:
    """Each run's evaluation history (plus its final point) as a compute/metric curve."""
    out = []
    for run in table.runs:
        points = list(run.evals)
        if run.final is not None and all(p["step"] != run.final["step"] for p in points):
            points.append(run.final)
        pairs = sorted((run.x_value(axis, p), p.get(y)) for p in points
                       if finite(run.x_value(axis, p)) and finite(p.get(y)) and run.x_value(axis, p) > 0)
        if pairs:
            c, v = (np.array(col, float) for col in zip(*pairs))
            out.append(Curve(run.name, float(run.model.get(size) or math.nan), c, v))
    return out


def pareto_front(curve_list: list[Curve]) -> dict:
    """Points not beaten by any point at lower or equal compute, in increasing compute."""
    if not curve_list:
        return {"x": np.array([]), "y": np.array([]), "runs": []}
    c = np.concatenate([cv.c for cv in curve_list])
    v = np.concatenate([cv.y for cv in curve_list])
    runs = np.concatenate([[cv.run] * len(cv.c) for cv in curve_list])
    order = np.lexsort((v, c))  # by compute, ties by loss
    keep, best = [], math.inf
    for i in order:
        if v[i] < best:
            keep.append(i)
            best = v[i]
    keep = np.array(keep, int)
    return {"x": c[keep], "y": v[keep], "runs": list(runs[keep])}


def lower_envelope(curve_list: list[Curve], grid: np.ndarray) -> tuple[np.ndarray, list]:
    """min over runs of each curve linearly interpolated in log-log, on a compute grid.

    A curve only counts inside the compute range it covers; returns (values, run at each point),
    NaN/None where no curve covers the grid point.
    """
    values = np.full((len(curve_list), len(grid)), np.inf)
    lg = np.log(grid)
    for k, cv in enumerate(curve_list):
        inside = (grid >= cv.c[0]) & (grid <= cv.c[-1])
        if len(cv.c) == 1:
            values[k, inside] = cv.y[0]
        else:
            values[k, inside] = np.exp(np.interp(lg[inside], np.log(cv.c), np.log(cv.y)))
    best = values.argmin(axis=0)
    env = values[best, np.arange(len(grid))]
    owners = [curve_list[b].run if np.isfinite(e) else None for b, e in zip(best, env)]
    return np.where(np.isfinite(env), env, np.nan), owners


def fit_frontier(table: RunTable, y: str, convention: str, *, form="pure", n_boot=1000, ci_level=0.95,
                 delta=fitting.DEFAULT_DELTA, seed=0, scale=None, progress=False):
    """L(C_min) fitted to the Pareto frontier; the bootstrap resamples runs and rebuilds the frontier."""
    axis = axis_for(f"flops:{convention}", scale)
    all_curves = curves(table, y, axis)
    front = pareto_front(all_curves)
    if len(np.unique(front["x"])) < 3:
        raise ValueError(f"frontier of {y} vs {convention} FLOPs has {len(front['x'])} point(s): too few")

    def resample(rng):
        picks = rng.integers(0, len(all_curves), len(all_curves))
        sub = pareto_front([all_curves[i] for i in picks])
        return sub["x"], sub["y"]

    # The bootstrap unit is the run, so degrees of freedom come from all runs, not frontier points.
    fit = fit_law(front["x"], front["y"], axis, form=form, y_name=y, runs=front["runs"], n_boot=n_boot,
                  ci_level=ci_level, delta=delta, seed=seed, resample=resample, kind="frontier",
                  progress=progress, n_units=len(all_curves))
    fit.quality["n_runs"] = len(all_curves)
    fit.quality["n_runs_on_frontier"] = len(set(front["runs"]))
    return fit, all_curves


# ---------------------------------------------------------------- iso-FLOP


def budget_groups(points: list[dict], tol_dex: float = 0.05) -> list[list[dict]]:
    """Cluster points by log10 budget: a new group starts after a gap wider than `tol_dex`."""
    points = sorted(points, key=lambda p: p["budget"])
    groups: list[list[dict]] = []
    for p in points:
        if groups and math.log10(p["budget"]) - math.log10(groups[-1][-1]["budget"]) <= tol_dex:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def annealed_points(table: RunTable, y: str, size: str = "params_total") -> list[dict]:
    """Every annealed evaluation (final endpoints included): the valid points for iso-FLOP and L(N, D)."""
    out = []
    for run in table.runs:
        seen_steps = set()
        candidates = ([run.final] if run.final is not None else []) + [p for p in run.evals if p["annealed"]]
        for p in candidates:
            if p["step"] in seen_steps:
                continue
            seen_steps.add(p["step"])
            n, v = run.model.get(size), p.get(y)
            if finite(n) and finite(v) and n > 0 and v > 0:
                out.append({"run": run.name, "n": float(n), "y": float(v), "flops": p["flops"],
                            "tokens": p.get("tokens_seen")})
    return out


def isoflop(table: RunTable, y: str, convention: str, *, group_convention: str | None = None,
            min_sizes: int = 3, tol_dex: float = 0.05, size: str = "params_total",
            n_boot: int = 1000, ci_level: float = 0.95, seed: int = 0) -> dict | None:
    """Parabola in log N per budget, then N_opt = k*C^a through the minima (bootstrap over budgets).

    Returns None when no budget has `min_sizes` sizes.

    Budgets are grouped under `group_convention` (default: `convention`) because a grid is designed
    in one convention, and a scale-dependent one spreads a designed budget over the sizes.
    """
    group_convention = group_convention or convention
    points = []
    for p in annealed_points(table, y, size):
        budget, c = p["flops"].get(group_convention), p["flops"].get(convention)
        if finite(budget) and finite(c) and budget > 0 and c > 0:
            points.append({**p, "budget": float(budget), "c": float(c)})
    profiles = []
    for group in budget_groups(points, tol_dex):
        sizes = sorted({p["n"] for p in group})
        if len(sizes) < min_sizes:
            continue
        profile = _parabola_minimum(group)
        profile["points"] = group
        profiles.append(profile)
    valid = [p for p in profiles if p["valid"]]
    result = {"y": y, "convention": convention, "group_convention": group_convention,
              "profiles": profiles, "warnings": []}
    if len(valid) < 2:
        return None if not profiles else {**result, "warnings": [
            f"iso-FLOP {y}: {len(valid)} budget(s) with an interior minimum; N_opt(C) not fitted"]}
    for p in profiles:
        if not p["valid"]:
            result["warnings"].append(f"iso-FLOP {y}: budget {p['budget']:.3g} FLOP has no interior "
                                      "minimum (sampled sizes do not bracket N_opt); left out")
    axis = axis_for(f"flops:{convention}")
    c = np.array([p["budget"] for p in valid])
    n_opt = np.array([p["n_opt"] for p in valid])
    # N_opt = k * C^a is the pure form with y = N_opt: alpha = a.
    fit = fit_law(c, n_opt, axis, y_name=f"N_opt[{y}]", n_boot=n_boot, ci_level=ci_level, seed=seed,
                  kind="isoflop")
    result["n_opt_fit"] = fit
    result["n_opt_exponent"] = fit.params["alpha"]
    result["n_opt_exponent_ci"] = fit.ci.get("alpha")
    result["tokens_per_param_at_opt"] = [p.get("tokens_per_param_opt") for p in valid]
    result["warnings"] += fit.warnings
    return result


def _parabola_minimum(group: list[dict]) -> dict:
    """Fit y = q2*u^2 + q1*u + q0 with u = log N; the vertex is N_opt if it lies inside the samples."""
    n = np.array([p["n"] for p in group])
    u = np.log(n)
    yv = np.array([p["y"] for p in group])
    budget = float(np.exp(np.mean(np.log([p["c"] for p in group]))))
    q2, q1, q0 = np.polyfit(u, yv, 2)
    out = {"budget": budget, "n_sizes": len(set(n)), "coef": [float(q2), float(q1), float(q0)], "valid": False}
    if q2 <= 0:
        return out
    u_opt = -q1 / (2 * q2)
    out.update(n_opt=float(np.exp(u_opt)), y_opt=float(q0 - q1 * q1 / (4 * q2)),
               valid=bool(u.min() < u_opt < u.max()))
    with_tokens = [p for p in group if finite(p.get("tokens"))]
    if len(with_tokens) >= 2:  # tokens per parameter at the optimum, interpolated in log-log
        ratio = np.array([p["tokens"] / p["n"] for p in with_tokens])
        slope, icpt = np.polyfit(np.log([p["n"] for p in with_tokens]), np.log(ratio), 1)
        out["tokens_per_param_opt"] = float(np.exp(icpt + slope * u_opt))
    return out
