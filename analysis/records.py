"""Load training-run records (docs/record_format.md) from a sweep directory or from W&B into one table.

A `Run` holds one record with its evaluation history normalised: every evaluation point carries
step, images, tokens, FLOPs under each named convention, the annealed flag and the test metrics,
whether or not the record spelled all of them out. `RunTable` is the list of runs plus what was
skipped while loading; it filters by status and sweep and flattens into one row per evaluation.

W&B runs are turned into the same record dicts first (see `record_from_wandb`), so everything
downstream sees one format.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .units import METRICS, PARAM_KINDS, Axis

WANDB_STATES = {"finished": "complete", "crashed": "failed", "failed": "failed", "killed": "failed"}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Run:
    name: str
    source: str
    status: str
    sweep: str | None
    model: dict
    tokens_per_image: float | None
    flops_per_image: dict
    batch_size: int | None
    evals: list[dict]
    final: dict | None
    error: str | None = None
    config: dict = field(default_factory=dict)
    # A WSD cooldown branch of another run ({"of": run name, "step": branch step, ...}): its own annealed
    # endpoint at its own tokens/FLOPs, one more data point of the same size.
    branch: dict | None = None

    @classmethod
    def from_record(cls, rec: dict, source: str) -> Run:
        model = dict(rec.get("model") or {})
        run = cls(
            name=str(rec.get("run_name") or source),
            source=source,
            status=str(rec.get("status") or "unknown"),
            sweep=rec.get("sweep"),
            model=model,
            tokens_per_image=rec.get("tokens_per_image"),
            flops_per_image=dict(rec.get("flops_per_image") or {}),
            batch_size=rec.get("batch_size"),
            evals=[],
            final=None,
            error=rec.get("error"),
            config=rec.get("config") or {},
            branch=rec.get("branch") if isinstance(rec.get("branch"), dict) else None,
        )
        evals = [e for e in rec.get("evals") or [] if e.get("split", "test") == "test"]
        run.evals = sorted((run._point(e) for e in evals), key=lambda p: p["step"] or 0)
        if rec.get("final"):
            run.final = run._final_point(rec["final"], rec.get("progress") or {})
        return run

    def _point(self, ev: dict, annealed: bool | None = None) -> dict:
        """Fill the counters a record may leave out from step x batch x tokens/FLOPs per image."""
        step = ev.get("step")
        images = ev.get("images_seen")
        if images is None and step is not None and self.batch_size:
            images = step * self.batch_size
        tokens = ev.get("tokens_seen")
        if tokens is None and images is not None and self.tokens_per_image:
            tokens = images * self.tokens_per_image
        flops = dict(ev.get("flops") or {})
        for conv, per_image in self.flops_per_image.items():
            if conv not in flops and images is not None and per_image is not None:
                flops[conv] = per_image * images
        point = {
            "step": step,
            "images_seen": images,
            "tokens_seen": tokens,
            "flops": flops,
            "annealed": bool(ev.get("annealed", False) if annealed is None else annealed),
        }
        for m in METRICS:
            point[m] = ev.get(m)
        return point

    def _final_point(self, final: dict, progress: dict) -> dict:
        same_step = [e for e in self.evals if e["step"] == final.get("step")]
        counters = {}
        if same_step:
            counters = {k: same_step[-1][k] for k in ("images_seen", "tokens_seen", "flops")}
        elif progress.get("step") == final.get("step"):
            counters = {
                "images_seen": progress.get("images_seen"),
                "tokens_seen": progress.get("tokens_seen"),
                "flops": progress.get("flops_seen"),
            }
        return self._point({**counters, **final}, annealed=True)

    @property
    def depth(self):
        return self.model.get("depth")

    def endpoint(self) -> tuple[dict | None, bool]:
        """The annealed endpoint (`final`), else the last evaluation; second value: came from `final`."""
        if self.final is not None:
            return self.final, True
        return (self.evals[-1], False) if self.evals else (None, False)

    def x_value(self, axis: Axis, point: dict | None = None) -> float | None:
        """Raw (unscaled) value of an axis for this run at an evaluation point."""
        if axis.spec in PARAM_KINDS:
            return self.model.get(axis.spec)
        if point is None:
            return None
        if axis.spec == "tokens":
            return point.get("tokens_seen")
        return point["flops"].get(axis.convention)

    def conventions(self) -> set[str]:
        names = set(self.flops_per_image)
        for p in self.evals:
            names |= set(p["flops"])
        return names


@dataclass
class RunTable:
    runs: list[Run]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unreadable records
    excluded: dict[str, int] = field(default_factory=dict)  # status -> runs left out by `select`
    source: str = ""

    def __len__(self) -> int:
        return len(self.runs)

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.runs))

    def sweeps(self) -> list:
        return sorted({r.sweep for r in self.runs}, key=str)

    def select(self, status: Iterable[str] | None = ("complete",), sweep: str | None = None) -> RunTable:
        """Runs with one of the statuses (None: all) of one sweep (None: all); the rest is counted."""
        keep, excluded = [], Counter(self.excluded)
        for run in self.runs:
            if sweep is not None and run.sweep != sweep:
                excluded[f"sweep!={sweep}"] += 1
            elif status is not None and run.status not in set(status):
                excluded[run.status] += 1
            else:
                keep.append(run)
        return RunTable(keep, list(self.skipped), dict(excluded), self.source)

    def conventions(self) -> list[str]:
        """FLOP conventions every run reports, in the order the first run lists them."""
        if not self.runs:
            return []
        common = set.intersection(*(r.conventions() for r in self.runs))
        order = list(self.runs[0].flops_per_image) + sorted(common)
        return list(dict.fromkeys(c for c in order if c in common))

    def rows(self) -> list[dict]:
        """One flat row per evaluation point (plus the final point), for display or a DataFrame."""
        out = []
        for run in self.runs:
            points = [(p, False) for p in run.evals]
            if run.final is not None:
                points.append((run.final, True))
            for p, is_final in points:
                row = {"run": run.name, "sweep": run.sweep, "status": run.status, "depth": run.depth,
                       "branch_of": (run.branch or {}).get("of")}
                row.update({k: run.model.get(k) for k in PARAM_KINDS})
                row.update({k: p[k] for k in ("step", "images_seen", "tokens_seen", "annealed")})
                row.update({f"flops:{c}": v for c, v in p["flops"].items()})
                row.update({m: p[m] for m in METRICS})
                row["final"] = is_final
                out.append(row)
        return out

    def endpoints(self, x: Axis, y: str, warnings: list[str] | None = None) -> dict:
        """One point per run at its endpoint: raw x, y, run names, and whether `final` was missing."""
        xs, ys, names, tokens, from_last_eval, unusable = [], [], [], [], [], []
        for run in self.runs:
            point, from_final = run.endpoint()
            xv = run.x_value(x, point) if point is not None else None
            yv = point.get(y) if point is not None else None
            if not (finite(xv) and finite(yv)) or xv <= 0 or yv <= 0:
                unusable.append(run.name)
                continue
            xs.append(float(xv))
            ys.append(float(yv))
            names.append(run.name)
            tokens.append(point.get("tokens_seen"))
            if not from_final:
                from_last_eval.append(run.name)
        if unusable:
            listed = ", ".join(unusable[:4]) + (", ..." if len(unusable) > 4 else "")
            _warn(warnings, f"{y} vs {x.spec}: {len(unusable)} run(s) without a usable value "
                            f"(NaN, missing or no evaluation), skipped: {listed}")
        if from_last_eval:
            _warn(warnings, f"{y}: {len(from_last_eval)} run(s) have no 'final': used their last evaluation")
        return {"x": xs, "y": ys, "runs": names, "tokens": tokens, "from_last_eval": from_last_eval}


def _warn(warnings: list[str] | None, message: str) -> None:
    if warnings is not None and message not in warnings:
        warnings.append(message)


# ---------------------------------------------------------------- loading


def load_dir(path: str | Path) -> RunTable:
    """Every record.json under `path` (searched recursively), or `path` itself if it is a record file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("record.json"))
    runs, skipped = [], []
    for file in files:
        try:
            rec = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append((str(file), f"unreadable: {exc}"))
            continue
        if not isinstance(rec, dict) or rec.get("schema", 1) != 1:
            skipped.append((str(file), f"unsupported schema {rec.get('schema') if isinstance(rec, dict) else rec!r}"))
            continue
        runs.append(Run.from_record(rec, source=str(file)))
    return RunTable(runs, skipped, source=str(path))


def load_wandb(project: str, group: str | None = None, api=None) -> RunTable:
    """Runs of a W&B project ("entity/project"), optionally one group, through the public API.

    `api` is injectable (anything with `.runs(path, filters=...)`) so tests need no network.
    """
    if api is None:
        import wandb  # lazy: only this path needs it, and importing it is slow

        api = wandb.Api()
    filters = {"group": group} if group else None
    runs, skipped = [], []
    for wrun in api.runs(project, filters=filters):
        source = f"wandb:{project}/{getattr(wrun, 'id', wrun.name)}"
        try:
            runs.append(Run.from_record(record_from_wandb(wrun), source=source))
        except (KeyError, TypeError, ValueError) as exc:
            skipped.append((source, f"not a training record: {exc}"))
    where = f"wandb:{project}" + (f" group={group}" if group else "")
    return RunTable(runs, skipped, source=where)


def load(source: str, group: str | None = None, api=None) -> RunTable:
    """A directory/record path, or `wandb:ENTITY/PROJECT` (with `group`)."""
    if source.startswith("wandb:"):
        return load_wandb(source[len("wandb:"):], group=group, api=api)
    return load_dir(source)


def record_from_wandb(wrun) -> dict:
    """Rebuild a record dict from a W&B run that mirrors record.json.

    Accepted layouts (the training logger may use either): a whole record under summary or config
    key "record"; or the record's static fields (model, flops_per_image, tokens_per_image, sweep,
    status, batch_size) in config/summary, nested or flattened with "/" or "."; evaluation points
    are history rows holding a test metric, bare or under "test/" ("test/L_mean"; "val/..." is
    another split and is ignored); a final evaluation may be summary["final"] or "final/L_mean".
    """
    summary = _unflatten(_as_dict(getattr(wrun, "summary", {})))
    config = _unflatten(_as_dict(getattr(wrun, "config", {})))
    for holder in (summary, config):
        if isinstance(holder.get("record"), dict):
            rec = dict(holder["record"])
            rec.setdefault("run_name", wrun.name)
            if not rec.get("evals"):
                rec["evals"] = _history_evals(wrun)
            return rec
    merged = {**config, **summary}
    rec = {k: merged.get(k) for k in ("sweep", "model", "flops_per_image", "tokens_per_image", "batch_size",
                                     "progress", "error", "preemptions")}
    rec["run_name"] = merged.get("run_name") or wrun.name
    rec["sweep"] = rec["sweep"] or getattr(wrun, "group", None)
    rec["status"] = summary.get("status") or WANDB_STATES.get(getattr(wrun, "state", ""), "running")
    rec["config"] = config
    rec["evals"] = _history_evals(wrun)
    final = summary.get("final")
    rec["final"] = final if isinstance(final, dict) and any(m in final for m in METRICS) else None
    if not isinstance(rec["model"], dict) or not any(k in rec["model"] for k in PARAM_KINDS):
        raise KeyError("no model parameter counts in config or summary")
    return rec


def _history_evals(wrun) -> list[dict]:
    rows = wrun.scan_history() if hasattr(wrun, "scan_history") else wrun.history(pandas=False)
    evals = []
    for row in rows:
        flat = _unflatten(_as_dict(row))
        if isinstance(flat.get("test"), dict):  # the test split only: "val/..." rows are another split
            flat = {**flat, **flat["test"]}
        if not any(finite(flat.get(m)) for m in METRICS):
            continue
        ev = {k: flat.get(k) for k in ("step", "images_seen", "tokens_seen", "annealed", *METRICS)}
        ev["step"] = ev["step"] if ev["step"] is not None else flat.get("trainer", {}).get("step", flat.get("_step"))
        ev["flops"] = flat.get("flops") or flat.get("flops_seen") or {}
        evals.append({k: v for k, v in ev.items() if v is not None})
    return evals


def _as_dict(obj) -> dict:
    if isinstance(obj, dict):
        return obj
    for attr in ("_json_dict", "items"):
        if hasattr(obj, attr):
            value = getattr(obj, attr)
            return dict(value() if callable(value) else value)
    return {}


def _unflatten(flat: dict) -> dict:
    """{"model/params_total": 1, "a.b": 2} -> {"model": {"params_total": 1}, "a": {"b": 2}}; W&B config
    values wrapped as {"value": v} are unwrapped."""
    out: dict = {}
    for key, value in flat.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        if isinstance(value, dict):
            value = _unflatten(value)
        parts = str(key).replace("/", ".").split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out
