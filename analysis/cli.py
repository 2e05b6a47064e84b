"""`python -m analysis fit SOURCE`: load a sweep, fit, write fits.json, report.md and plots.

SOURCE is a sweep directory (searched recursively for record.json) or `wandb:ENTITY/PROJECT`
(with --wandb-group). The last lines printed are the headline laws and the main plot's path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import plots, report
from .pipeline import Options, Results, analyse
from .records import load
from .units import axis_for


def write_outputs(res: Results, out_dir) -> dict:
    """All plots, fits.json and report.md under out_dir; returns {name: path} (main plot first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    endpoint = res.select(kind="endpoint")
    if endpoint:
        written["scaling"] = plots.plot_scaling(endpoint, out_dir / f"scaling_{_safe(res.options.x)}.png")
    frontier = res.select(kind="frontier")
    for conv in dict.fromkeys(f.axis.convention for f in frontier):
        written[f"frontier_{conv}"] = plots.plot_frontier(res.select(kind="frontier", convention=conv),
                                                          res.curves, out_dir / f"frontier_{_safe(conv)}.png")
    joint = res.select(kind="joint")
    if joint:
        written["joint"] = plots.plot_joint(joint, out_dir / "joint_N_D.png")
    if res.fits:
        written["residuals"] = plots.plot_residuals(res.fits, out_dir / "residuals.png")
    for iso in res.isoflop:
        name = f"isoflop_{iso['y']}_{_safe(iso['convention'])}"
        written[name] = plots.plot_isoflop(iso, out_dir / f"{name}.png")
    written = {k: Path(v) for k, v in written.items()}
    report.write_json(res, out_dir / "fits.json", written)
    report.write_markdown(res, out_dir / "report.md", written)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit scaling laws to a sweep")
    fit.add_argument("source", help="sweep directory, a record.json, or wandb:ENTITY/PROJECT")
    fit.add_argument("--x", default="params_total",
                     help="params_total | params_non_embedding | params_core | flops:<convention>")
    fit.add_argument("--y", default="L_mean,L_last", help="comma list of L_mean, L_last, err_mean, err_last")
    fit.add_argument("--forms", default="pure,floor", help="comma list of pure, floor")
    fit.add_argument("--status", default="complete", help="comma list of statuses to keep, or 'all'")
    fit.add_argument("--sweep", default=None, help="keep only runs of this sweep")
    fit.add_argument("--out", default=None, help="output directory (default SOURCE/analysis)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over runs")
    fit.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals")
    fit.add_argument("--huber-delta", type=float, default=1e-3, help="Huber delta on log residuals")
    fit.add_argument("--holdout", type=int, default=None, help="largest sizes held out (default: auto)")
    fit.add_argument("--conventions", default=None, help="FLOP conventions for the frontier (default: all)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--wandb-project", default=None, help="W&B project to log to (ENTITY/PROJECT allowed)")
    fit.add_argument("--wandb-group", default=None, help="W&B group: runs to load, and group to log into")
    fit.add_argument("--log-wandb", action="store_true", help="log fits, table and plots as a W&B run")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        axis_for(args.x)
    except ValueError as exc:
        return _fail(str(exc))
    is_wandb = args.source.startswith("wandb:")
    if not is_wandb and not Path(args.source).exists():
        return _fail(f"no usable records: {args.source} does not exist")
    table = load(args.source, group=args.wandb_group)
    status = None if args.status == "all" else _csv(args.status)
    selected = table.select(status, args.sweep)
    if not selected.runs:
        found = ", ".join(f"{v} {k}" for k, v in table.status_counts().items()) or "no record.json"
        return _fail(f"no usable records in {args.source} ({found}; status filter: {args.status}"
                     f"{', sweep ' + args.sweep if args.sweep else ''})")
    conventions = _csv(args.conventions) if args.conventions else None
    wanted = ([axis_for(args.x).convention] if args.x.startswith("flops:") else []) + list(conventions or [])
    unknown = [c for c in wanted if c not in selected.conventions()]
    if unknown:
        return _fail(f"no FLOPs under {', '.join(unknown)} in {args.source} "
                     f"(available: {', '.join(selected.conventions()) or 'none'})")
    if args.log_wandb and not (args.wandb_project or is_wandb):
        return _fail("--log-wandb needs --wandb-project (or a wandb: SOURCE)")
    options = Options(x=args.x, y=_csv(args.y), forms=_csv(args.forms), status=status, sweep=args.sweep,
                      n_boot=args.bootstrap, ci_level=args.ci, delta=args.huber_delta, holdout=args.holdout,
                      conventions=conventions, seed=args.seed, progress=sys.stderr.isatty())
    res = analyse(table, options)
    if not res.fits:
        return _fail(f"no fit possible from the {len(res.table.runs)} runs in {args.source}: "
                     f"{res.warnings[0] if res.warnings else 'no usable points'}")
    if args.out:
        out_dir = Path(args.out)
    elif is_wandb:
        group = f"_{args.wandb_group}" if args.wandb_group else ""
        out_dir = Path("analysis_" + _safe(args.source[len("wandb:"):] + group))
    else:
        source = Path(args.source)
        out_dir = (source.parent if source.is_file() else source) / "analysis"
    written = write_outputs(res, out_dir)
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"runs used: {len(res.table.runs)} of {sum(res.loaded.values())}; wrote {out_dir / 'fits.json'}, "
          f"{out_dir / 'report.md'} and {len(written)} plots")
    if args.log_wandb:
        project = args.wandb_project or args.source[len("wandb:"):]
        entity, _, name = project.rpartition("/")
        group = args.wandb_group or (res.table.sweeps()[0] if len(res.table.sweeps()) == 1 else None)
        from .wandb_log import log_results

        url = log_results(res, written, name, group, entity or None)
        print(f"logged to W&B: {url}")
    for fit in res.headline_fits():
        print(fit.headline())
    print(f"main plot: {next(iter(written.values()))}")
    return 0
