"""Figures (matplotlib, Agg, PNG): scaling vs X, compute frontier, residuals, iso-FLOP profiles.

Conventions follow VAR's figures: log-log axes, points per model, the fitted line with its
equation and Pearson r in the legend, a shaded bootstrap band; on the compute plot one curve per
model size coloured by size, with the frontier fit dashed on top.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from .powerlaw import Fit  # noqa: E402

Y_LABELS = {"L_mean": "test loss, all scales [nats/token]", "L_last": "test loss, last scale [nats/token]",
            "err_mean": "token error, all scales", "err_last": "token error, last scale"}
FORM_STYLE = {"pure": "-", "floor": "--", "joint": ":"}


def _band(fit: Fit, xs: np.ndarray):
    """Pointwise bootstrap percentile band of the prediction, or None without a bootstrap."""
    boots = fit.boot_params()
    if not boots:
        return None
    preds = np.exp([fit.log_predict(xs, params=p) for p in boots])
    tail = 100 * (1 - fit.ci_level) / 2
    return np.percentile(preds, [tail, 100 - tail], axis=0)


def _label(fit: Fit) -> str:
    return f"{fit.form}: {fit.equation()}  (r={fit.quality['pearson_r']:.4f})"


def draw_fit(ax, fit: Fit, color, x_range=None, points=True) -> None:
    """Points, fitted line over the data range (extended a little), bootstrap band, equation."""
    x = np.asarray(fit.data["x"])
    lo, hi = x_range or (x.min() / 1.3, x.max() * 1.3)
    xs = np.geomspace(lo, hi, 200)
    if points:
        ax.scatter(x, fit.data["y"], color="black", s=18, zorder=3)
    ax.plot(xs, fit.predict(xs), FORM_STYLE[fit.form], color=color, label=_label(fit))
    band = _band(fit, xs)
    if band is not None:
        ax.fill_between(xs, band[0], band[1], color=color, alpha=0.15, lw=0)


def _log_axes(ax) -> None:
    """Log-log with plain tick labels (6, 7, 8 instead of 6x10^0) and a light grid."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 15 and hi < 1e4:  # losses within a decade: label the minor ticks, plainly
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(True, which="both", alpha=0.3)


def _finish(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(n: int):
    fig, axes = plt.subplots(1, n, figsize=(6.8 * n, 5.0), squeeze=False, layout="constrained")
    return fig, axes[0]


def plot_scaling(fits: list[Fit], path) -> Path:
    """One panel per metric: endpoints vs X with every form's fit; held-out sizes ringed."""
    metrics = list(dict.fromkeys(f.y_name for f in fits))
    fig, axes = _panels(len(metrics))
    for ax, y in zip(axes, metrics):
        group = [f for f in fits if f.y_name == y]
        for k, fit in enumerate(group):
            draw_fit(ax, fit, f"C{k}", points=k == 0)
            held = (fit.extrapolation or {}).get("points", [])
            if held and k == 0:
                ax.scatter([p["x"] for p in held], [p["y"] for p in held], s=90, facecolors="none",
                           edgecolors="red", label="held out in the extrapolation check")
        _log_axes(ax)
        ax.set(xlabel=f"{group[0].axis.symbol} [{group[0].axis.base_unit}] "
               f"({group[0].axis.spec}); fits use {group[0].axis.unit}", ylabel=Y_LABELS.get(y, y))
        ax.set_title(f"{y} vs {group[0].axis.symbol}")
        ax.legend(fontsize=7, loc="upper right")
    return _finish(fig, Path(path))


def plot_frontier(fits: list[Fit], curves: dict, path) -> Path:
    """One panel per metric: each run's curve coloured by log size, frontier points, L(C_min) fit."""
    metrics = list(dict.fromkeys(f.y_name for f in fits))
    fig, axes = _panels(len(metrics))
    for ax, y in zip(axes, metrics):
        group = [f for f in fits if f.y_name == y]
        conv = group[0].axis.convention
        runs = curves[(y, conv)]
        sizes = np.log10([c.n_params for c in runs])
        norm = plt.Normalize(sizes.min(), sizes.max() if sizes.max() > sizes.min() else sizes.min() + 1)
        for c, s in zip(runs, sizes):
            ax.plot(c.c, c.y, color=plt.cm.viridis(norm(s)), lw=1.2, alpha=0.85)
        ax.scatter(group[0].data["x"], group[0].data["y"], color="black", s=12, zorder=3, label="frontier")
        for k, fit in enumerate(group):
            draw_fit(ax, fit, ("red", "orange")[k % 2], points=False)
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
        bar.set_label("log10 params")
        _log_axes(ax)
        ax.set(xlabel=f"C [FLOP] ({conv} convention); fits use {group[0].axis.unit}",
               ylabel=Y_LABELS.get(y, y), title=f"{y} vs compute: frontier L(C_min)")
        ax.legend(fontsize=7, loc="upper right")
    return _finish(fig, Path(path))


def plot_residuals(fits: list[Fit], path) -> Path:
    """log(y) - log(fit) per point for every fit: a curved pattern asks for another form."""
    cols = min(4, len(fits))
    rows = -(-len(fits) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax, fit in zip(axes.flat, fits):
        x = np.asarray(fit.data["x"])
        d = fit.data.get("d")
        resid = np.log(fit.data["y"]) - fit.log_predict(x, d)
        ax.axhline(0, color="gray", lw=0.8)
        ax.scatter(x, resid, s=12, color="C0")
        conv = f", {fit.axis.convention}" if fit.axis.convention else ""
        ax.set(xscale="log", xlabel=f"{fit.axis.symbol} [{fit.axis.base_unit}{conv}]", ylabel="log residual")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{fit.y_name} {fit.kind} {fit.form}", fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(fits):]:
        ax.axis("off")
    return _finish(fig, Path(path))


def plot_isoflop(iso: dict, path) -> Path:
    """Loss vs N per budget with the parabola and its minimum; N_opt(C) with its fit."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    budgets = [p["budget"] for p in iso["profiles"]]
    norm = plt.matplotlib.colors.LogNorm(min(budgets), max(budgets) * 1.0001)
    for prof in iso["profiles"]:
        color = plt.cm.plasma(norm(prof["budget"]))
        n = np.array([p["n"] for p in prof["points"]])
        ax.scatter(n, [p["y"] for p in prof["points"]], color=color, s=14)
        us = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.plot(np.exp(us), np.polyval(prof["coef"], us), color=color, lw=1, label=f"C={prof['budget']:.2g} FLOP")
        if prof["valid"]:
            ax.scatter([prof["n_opt"]], [prof["y_opt"]], marker="*", s=80, color=color, edgecolors="black")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log axis collide
    ax.set(xscale="log", xlabel="N [params]", ylabel=Y_LABELS.get(iso["y"], iso["y"]),
           title=f"iso-FLOP profiles ({iso['convention']} FLOPs)")
    ax.legend(fontsize=7)
    fit = iso.get("n_opt_fit")
    if fit is not None:
        draw_fit(ax2, fit, "C3")
        _log_axes(ax2)
        ax2.set(xlabel=f"C [FLOP] ({iso['convention']})", ylabel="N_opt [params]",
                title="compute-optimal model size")
        ax2.legend(fontsize=7)
    return _finish(fig, Path(path))


def plot_joint(fits: list[Fit], path) -> Path:
    """L(N, D): loss vs tokens per model size (colour), with the fitted surface's curve for each."""
    fig, axes = _panels(len(fits))
    for ax, fit in zip(axes, fits):
        n, d, y = (np.asarray(fit.data[k]) for k in ("x", "d", "y"))
        sizes = np.unique(n)
        norm = plt.Normalize(np.log10(sizes.min()), np.log10(sizes.max()) + 1e-9)
        for size in sizes:
            color = plt.cm.viridis(norm(np.log10(size)))
            sel = n == size
            ax.scatter(d[sel], y[sel], color=color, s=14)
            ds = np.geomspace(d[sel].min() / 1.5, d[sel].max() * 1.5, 50)
            ax.plot(ds, fit.predict(np.full_like(ds, size), ds), color=color, lw=1)
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
        bar.set_label("log10 params")
        _log_axes(ax)
        ax.set(xlabel="D [tokens]", ylabel=Y_LABELS.get(fit.y_name, fit.y_name),
               title=f"{fit.equation()}\n[{fit.units_note()}]")
    return _finish(fig, Path(path))
