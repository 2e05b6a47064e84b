"""The default analysis of a sweep, shared by the CLI and the notebook.

Fits, in order: y vs X (pure law and irreducible form, with an extrapolation check) on each run's
annealed endpoint; L(C_min) on the compute frontier under every FLOP convention; the joint
L(N, D) when runs give several D per N; iso-FLOP profiles and N_opt(C) when several budgets exist.
A fit that cannot be made (too few points) becomes a warning instead of an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import compute
from .powerlaw import Fit, fit_joint, fit_law
from .records import RunTable, finite
from .threads import one_blas_thread
from .units import PARAM_KINDS, axis_for


@dataclass
class Options:
    x: str = "params_total"
    y: tuple[str, ...] = ("L_mean", "L_last")
    forms: tuple[str, ...] = ("pure", "floor")
    status: tuple[str, ...] | None = ("complete",)
    sweep: str | None = None
    n_boot: int = 1000
    ci_level: float = 0.95
    delta: float = 1e-3
    holdout: int | None = None  # None: 2 when >= 7 sizes, 1 when >= 4, else none
    conventions: tuple[str, ...] | None = None  # None: every convention all runs report
    x_scale: float | None = None  # None: 1e6 params / 1e9 tokens / PFLOP
    seed: int = 0
    progress: bool = False


@dataclass
class Results:
    source: str
    options: Options
    table: RunTable  # the selected runs
    loaded: dict  # status -> count before selection
    fits: list[Fit] = field(default_factory=list)
    curves: dict = field(default_factory=dict)  # (y, convention) -> list[compute.Curve]
    isoflop: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # analyses skipped for lack of a suitable design

    def select(self, kind=None, form=None, y=None, convention="any") -> list[Fit]:
        return [f for f in self.fits if (kind is None or f.kind == kind) and (form is None or f.form == form)
                and (y is None or f.y_name == y) and (convention == "any" or f.axis.convention == convention)]

    def headline_fits(self) -> list[Fit]:
        """Pure laws vs X per metric, then the frontier laws under the first convention."""
        first = self.select(kind="frontier", form="pure")
        conv = first[0].axis.convention if first else None
        return self.select(kind="endpoint", form="pure") + self.select(kind="frontier", form="pure", convention=conv)


@one_blas_thread
def analyse(table: RunTable, options: Options | None = None) -> Results:
    opt = options or Options()
    selected = table.select(opt.status, opt.sweep)
    res = Results(table.source, opt, selected, table.status_counts())
    for source, reason in table.skipped:
        res.warnings.append(f"skipped {source}: {reason}")
    if selected.excluded:
        res.notes.append("left out by the filters: " + ", ".join(f"{v} {k}" for k, v in selected.excluded.items()))
    if not selected.runs:
        return res
    if len(selected.sweeps()) > 1:
        res.warnings.append(f"runs from {len(selected.sweeps())} sweeps are pooled "
                            f"({', '.join(map(str, selected.sweeps()))}); pass a sweep to analyse one")
    _fit_endpoints(res, selected, opt)
    conventions = list(opt.conventions or selected.conventions())
    if not conventions:
        res.notes.append("no FLOP conventions in the records: no compute frontier")
    for conv in conventions:
        _fit_frontier(res, selected, opt, conv)
    _fit_joint(res, selected, opt)
    # Iso-FLOP under the first convention only: budgets are grouped in it, and with the same sizes
    # in every budget another convention only rescales C, leaving the N_opt exponent unchanged.
    for conv in conventions[:1]:
        for y in opt.y:
            iso = compute.isoflop(selected, y, conv, n_boot=opt.n_boot, ci_level=opt.ci_level, seed=opt.seed)
            if iso is None:
                continue
            res.isoflop.append(iso)
            res.warnings += [w for w in iso["warnings"] if w not in res.warnings]
    if not res.isoflop:
        res.notes.append("iso-FLOP profiles skipped: no budget with >= 3 sizes among the annealed endpoints")
    for f in res.fits:
        res.warnings += [w for w in f.warnings if w not in res.warnings]
    return res


def _fit_endpoints(res: Results, table: RunTable, opt: Options) -> None:
    axis = axis_for(opt.x, opt.x_scale)
    for y in opt.y:
        pts = _longest_per_size(table.endpoints(axis, y, res.warnings), res.notes, y)
        n_sizes = len(set(pts["x"]))
        holdout = opt.holdout if opt.holdout is not None else (2 if n_sizes >= 7 else 1 if n_sizes >= 4 else 0)
        for form in opt.forms:
            try:
                res.fits.append(fit_law(pts["x"], pts["y"], axis, form=form, y_name=y, runs=pts["runs"],
                                        n_boot=opt.n_boot, ci_level=opt.ci_level, delta=opt.delta,
                                        holdout=holdout, seed=opt.seed, progress=opt.progress))
            except ValueError as exc:
                _warn(res, f"fit skipped: {exc}")


def _longest_per_size(pts: dict, notes: list[str], y: str) -> dict:
    """With several runs per size (several horizons or budgets), L(N) uses the longest-trained one:
    mixing horizons would fold the data dependence into the size exponent."""
    best: dict[float, int] = {}
    for i, (x, t) in enumerate(zip(pts["x"], pts["tokens"])):
        key = (t if t is not None else -1.0, -pts["y"][i])
        j = best.get(x)
        if j is None or key > (pts["tokens"][j] if pts["tokens"][j] is not None else -1.0, -pts["y"][j]):
            best[x] = i
    if len(best) == len(pts["x"]):
        return pts
    notes.append(f"{y} vs size: {len(pts['x'])} runs over {len(best)} sizes; each size's longest-trained "
                 "run is used")
    keep = sorted(best.values())
    return {k: [v[i] for i in keep] if isinstance(v, list) and len(v) == len(pts["x"]) else v
            for k, v in pts.items()}


def _fit_frontier(res: Results, table: RunTable, opt: Options, conv: str) -> None:
    for y in opt.y:
        for form in opt.forms:
            try:
                fit, curves = compute.fit_frontier(table, y, conv, form=form, n_boot=opt.n_boot,
                                                   ci_level=opt.ci_level, delta=opt.delta, seed=opt.seed,
                                                   progress=opt.progress)
            except ValueError as exc:
                _warn(res, f"frontier fit skipped: {exc}")
                continue
            res.fits.append(fit)
            res.curves[(y, conv)] = curves


def _fit_joint(res: Results, table: RunTable, opt: Options) -> None:
    size = opt.x if opt.x in PARAM_KINDS else "params_total"
    axis_n, axis_d = axis_for(size), axis_for("tokens")
    for y in opt.y:
        if not y.startswith("L_"):
            continue  # the E + A/N^a + B/D^b surface is a loss model
        pts = [p for p in compute.annealed_points(table, y, size) if finite(p["tokens"]) and p["tokens"] > 0]
        per_size: dict[float, set] = {}
        for p in pts:
            per_size.setdefault(p["n"], set()).add(round(float(np.log10(p["tokens"])), 3))
        if not per_size or max(len(v) for v in per_size.values()) < 2:
            res.warnings.append(f"joint {y}(N, D) skipped: one D per model size in the annealed endpoints "
                                "(needs several training horizons per size)")
            continue
        try:
            res.fits.append(fit_joint([p["n"] for p in pts], [p["tokens"] for p in pts], [p["y"] for p in pts],
                                      axis_n, axis_d, y_name=y, runs=[p["run"] for p in pts], n_boot=opt.n_boot,
                                      ci_level=opt.ci_level, delta=opt.delta, seed=opt.seed,
                                      progress=opt.progress))
        except ValueError as exc:
            _warn(res, f"joint fit skipped: {exc}")


def _warn(res: Results, message: str) -> None:
    if message not in res.warnings:
        res.warnings.append(message)


def options_dict(opt: Options) -> dict:
    return asdict(opt)
