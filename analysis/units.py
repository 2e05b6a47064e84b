"""Axes of a scaling fit (what X is, and in which unit it is fitted) and number formatting.

Fits run on rescaled inputs (parameters in millions, tokens in billions, FLOPs in PFLOP) so the
optimiser sees numbers of order one; every reported prefactor carries the unit it belongs to,
because a prefactor without its unit is meaningless (VAR's printed prefactors are an example).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PARAM_KINDS = ("params_total", "params_non_embedding", "params_core")
METRICS = ("L_mean", "L_last", "err_mean", "err_last")
PFLOP = 1e15
PF_DAY = 1e15 * 86400


@dataclass(frozen=True)
class Axis:
    """One independent variable: its record field, its symbol and the unit the fit uses."""

    spec: str  # "params_total", "flops:6NL", "tokens"
    symbol: str  # N, C or D
    scale: float  # fitted value = raw value / scale
    unit: str  # e.g. "1e6 params"
    base_unit: str  # unit of the raw value: "params", "FLOP", "tokens"

    @property
    def convention(self) -> str | None:
        return self.spec.split(":", 1)[1] if self.spec.startswith("flops:") else None

    @property
    def label(self) -> str:
        what = self.convention and f"training compute, {self.convention}" or self.spec
        return f"{self.symbol} [{self.unit}] ({what})"

    def to_dict(self) -> dict:
        return asdict(self)


def axis_for(spec: str, scale: float | None = None) -> Axis:
    """Axis for a CLI/X spec: params_total | params_non_embedding | params_core | tokens | flops:<conv>."""
    if spec in PARAM_KINDS:
        scale = scale or 1e6
        return Axis(spec, "N", scale, f"{_scale_name(scale)} params", "params")
    if spec == "tokens":
        scale = scale or 1e9
        return Axis(spec, "D", scale, f"{_scale_name(scale)} tokens", "tokens")
    if spec.startswith("flops:") and len(spec) > len("flops:"):
        scale = scale or PFLOP
        unit = "PFLOP" if scale == PFLOP else "PF-days" if scale == PF_DAY else f"{_scale_name(scale)} FLOP"
        return Axis(spec, "C", scale, unit, "FLOP")
    raise ValueError(
        f"unknown X '{spec}': use one of {', '.join(PARAM_KINDS)}, tokens or flops:<convention>"
    )


def _scale_name(scale: float) -> str:
    return "1" if scale == 1 else f"{scale:.0e}".replace("e+0", "e").replace("e+", "e")


def fmt(value: float, digits: int = 4) -> str:
    """Compact human formatting for printed lines (files keep the unrounded values)."""
    if value is None or not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"
