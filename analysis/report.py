"""Write the results: fits.json (machine-readable, unrounded) and report.md (tables + plots).

Every number that depends on a unit is written next to that unit. Printed/markdown values are
rounded for reading; fits.json keeps full precision, since rounded parameters bias predictions
(Besiroglu et al. on Chinchilla's rounded table).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .pipeline import Results, options_dict
from .units import fmt

# VAR (Tian et al. 2024), exponents alpha of L = (beta*X)^alpha; compare exponents and r, not
# prefactors (their units are not stated; see the reference notes).
VAR_PUBLISHED = {
    ("L_last", "N"): -0.23, ("L_mean", "N"): -0.20, ("err_last", "N"): -0.016, ("err_mean", "N"): -0.010,
    ("L_last", "C"): -0.13, ("L_mean", "C"): -0.16, ("err_last", "C"): -0.0067, ("err_mean", "C"): -0.011,
}
VAR_R = {"N": -0.998, "C": -0.99}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None  # JSON has no NaN/inf
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _iso_dict(iso: dict) -> dict:
    out = {k: v for k, v in iso.items() if k != "n_opt_fit"}
    out["profiles"] = [{k: v for k, v in p.items()} for p in iso["profiles"]]
    if iso.get("n_opt_fit") is not None:
        out["n_opt_fit"] = iso["n_opt_fit"].to_dict()
    return out


def var_comparison(res: Results) -> list[dict]:
    rows = []
    for fit in res.headline_fits():
        key = (fit.y_name, fit.axis.symbol)
        if key in VAR_PUBLISHED:
            rows.append({"y": fit.y_name, "x": fit.axis.spec, "alpha": fit.params["alpha"],
                         "alpha_ci": fit.ci.get("alpha"), "r": fit.quality["pearson_r"],
                         "var_alpha": VAR_PUBLISHED[key], "var_r": VAR_R[fit.axis.symbol]})
    return rows


def results_dict(res: Results, plots: dict | None = None) -> dict:
    return _jsonable({
        "source": res.source,
        "options": options_dict(res.options),
        "runs": {"loaded_by_status": res.loaded, "used": len(res.table.runs), "excluded": res.table.excluded,
                 "unreadable": [{"source": s, "reason": r} for s, r in res.table.skipped]},
        "warnings": res.warnings,
        "notes": res.notes,
        "headline": [f.headline() for f in res.headline_fits()],
        "fits": [f.to_dict() for f in res.fits],
        "isoflop": [_iso_dict(iso) for iso in res.isoflop],
        "var_comparison": var_comparison(res),
        "plots": {k: str(v) for k, v in (plots or {}).items()},
    })


def write_json(res: Results, path, plots: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results_dict(res, plots), indent=1, allow_nan=False))
    return path


def _ci(fit, name) -> str:
    ci = fit.ci.get(name)
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "—"


def markdown(res: Results, plots: dict | None = None, out_dir: Path | None = None) -> str:
    lvl = int(round(res.options.ci_level * 100))
    lines = [f"# Scaling-law fits: `{res.source}`", ""]
    loaded = ", ".join(f"{v} {k}" for k, v in sorted(res.loaded.items())) or "none"
    lines += [f"Runs loaded: {loaded}; used: {len(res.table.runs)} (status filter: "
              f"{', '.join(res.options.status) if res.options.status else 'all'}"
              f"{', sweep ' + res.options.sweep if res.options.sweep else ''}).", ""]
    if res.notes:
        lines += [f"- {n}" for n in res.notes] + [""]
    if res.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in res.warnings] + [""]
    lines += ["## Headline laws", "", "VAR notation L = (β·X)^α; equivalently L = a·X^b with a = β^α, b = α.", ""]
    lines += [f"- `{h.headline()}`" for h in res.headline_fits()] + [""]
    lines += ["## All fits", "",
              f"Parameters in the units shown (fit units); {lvl}% bootstrap intervals over runs "
              f"({res.options.n_boot} resamples). Full precision in fits.json.", "",
              "| metric | kind | form | equation | units | parameters (CI) | r | R² | n | converged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f in res.fits:
        params = "; ".join(f"{k}={fmt(v)} {_ci(f, k)}" for k, v in f.params.items())
        lines.append(f"| {f.y_name} | {f.kind} | {f.form} | {f.equation()} | {f.units_note()} | {params} | "
                     f"{f.quality['pearson_r']:.4f} | {f.quality['r2']:.4f} | {f.quality['n_points']} | "
                     f"{'yes' if f.converged else 'NO'} |")
    lines.append("")
    extra = [f for f in res.fits if f.extrapolation and "points" in f.extrapolation]
    if extra:
        lines += ["## Extrapolation check", "", "Fit without the largest size(s), predict them.", "",
                  "| metric | form | held-out X [base units] | observed | predicted | rel. error | inside CI |",
                  "|---|---|---|---|---|---|---|"]
        for f in extra:
            for p in f.extrapolation["points"]:
                inside = {True: "yes", False: "no"}.get(p.get("inside"), "—")
                lines.append(f"| {f.y_name} | {f.form} | {fmt(p['x'])} {f.axis.base_unit} | {fmt(p['y'])} | "
                             f"{fmt(p['y_pred'])} | {p['rel_error']:+.2%} | {inside} |")
        lines.append("")
    joint = [f for f in res.fits if f.form == "joint"]
    for f in joint:
        q = f.quality
        lines += [f"## Joint {f.y_name}(N, D)", "", f"`{f.equation()}`  [{f.units_note()}]", "",
                  f"Design condition number {fmt(q['design_condition'])}, corr(log N, log D) = "
                  f"{fmt(q['corr_logN_logD'])}. Compute-optimal exponents under C = 6ND: "
                  f"N_opt ∝ C^{fmt(q['N_opt_exponent'])}, D_opt ∝ C^{fmt(q['D_opt_exponent'])}.", ""]
    for iso in res.isoflop:
        if iso.get("n_opt_fit") is None:
            continue
        ci = iso.get("n_opt_exponent_ci")
        ci_text = f" ({lvl}% CI [{fmt(ci[0])}, {fmt(ci[1])}])" if ci else ""
        tpp = ", ".join(fmt(t) for t in iso["tokens_per_param_at_opt"] if t is not None)
        lines += [f"## Iso-FLOP {iso['y']} ({iso['convention']} FLOPs)", "",
                  f"N_opt ∝ C^{fmt(iso['n_opt_exponent'])}{ci_text} over {len(iso['profiles'])} budgets; "
                  f"tokens per parameter at the optimum: {tpp or '—'}.", ""]
    comp = var_comparison(res)
    if comp:
        lines += ["## Compared with VAR (Tian et al. 2024)", "",
                  "Exponents and r only: VAR's prefactors have no stated unit.", "",
                  "| metric | X | α (ours) | CI | r (ours) | α (VAR) | r (VAR) |", "|---|---|---|---|---|---|---|"]
        for row in comp:
            ci = row["alpha_ci"]
            ci_text = f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "—"
            lines.append(f"| {row['y']} | {row['x']} | {fmt(row['alpha'])} | {ci_text} | {row['r']:.4f} | "
                         f"{row['var_alpha']} | ≈{row['var_r']} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for name, path in plots.items():
            rel = Path(path).relative_to(out_dir) if out_dir else Path(path)
            lines += [f"![{name}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def write_markdown(res: Results, path, plots: dict | None = None) -> Path:
    path = Path(path)
    path.write_text(markdown(res, plots, path.parent))
    return path
