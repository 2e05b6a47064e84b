"""Learning-rate and progressive-training schedules, as pure functions of the step.

- ``official``: VAR's ``lin0``: linear warmup from 0.005x peak, a short plateau (5% of the post-warmup
  span), then linear decay to ``end_ratio`` x peak. One properly annealed endpoint per run.
- ``wsd``: warmup, constant, then a cooldown over the last ``cooldown_fraction`` of steps
  (``1-sqrt`` or ``linear``; Hägele et al. 2024). Constant-LR checkpoints can be branched into
  cooldowns of their own, so one run can give several annealed points.
- ``cosine`` and ``constant`` for completeness.
"""

from __future__ import annotations

import math


def lr_factor(step: int, max_steps: int, kind: str = "official", warmup_steps: int = 0,
              end_ratio: float = 0.01, cooldown_fraction: float = 0.2, cooldown_shape: str = "1-sqrt",
              warmup_start: float = 0.005) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(max_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)  # progress after warmup, in [0, 1]
    if kind == "official":
        plateau = 0.05
        if t < plateau:
            return 1.0
        return 1.0 - (1.0 - end_ratio) * (t - plateau) / (1 - plateau)
    if kind == "cosine":
        return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "wsd":
        start = 1.0 - cooldown_fraction
        if t < start:
            return 1.0
        c = (t - start) / max(cooldown_fraction, 1e-12)
        drop = math.sqrt(c) if cooldown_shape == "1-sqrt" else c
        return 1.0 - (1.0 - end_ratio) * drop
    raise ValueError(f"unknown schedule {kind!r}")


def warmup_steps_of(schedule: dict, max_steps: int) -> int:
    """Warmup length of a run of ``max_steps``: ``warmup_steps`` if set, else ``warmup_fraction`` of the run
    (official: ep/50). The training module counts it the same way."""
    return int(schedule.get("warmup_steps") or round(schedule.get("warmup_fraction", 0.02) * max_steps))


def wsd_branch_length(branch_step: int, warmup_steps: int, cooldown_fraction: float) -> int:
    """Total steps ``S`` of the wsd run whose cooldown starts at ``branch_step``: a constant-LR checkpoint at
    that step, cooled down over ``cooldown_fraction`` of S's post-warmup steps, is S's annealed endpoint."""
    span = (branch_step - warmup_steps) / (1.0 - cooldown_fraction)
    return warmup_steps + math.ceil(round(span, 9))  # round: 40 / 0.8 must give 50, not 51


def is_annealed(step: int, max_steps: int, kind: str) -> bool:
    """True where the learning rate has finished its decay: the only valid points for L(N) fits."""
    if kind == "constant":
        return False
    return step >= max_steps


def progressive_scale(step: int, max_steps: int, num_scales: int, fraction: float, start_scale: int = 4,
                      warmup_steps: int = 0) -> int | None:
    """Index of the last scale trained at ``step`` under progressive training, or None (all scales).

    For the first ``fraction`` of training the sequence grows from ``start_scale`` to the last scale,
    linearly from the end of warmup on (VAR's ``pg``/``pg0``).
    """
    if fraction <= 0:
        return None
    end = fraction * max_steps
    if step >= end:
        return None
    start_scale = min(start_scale, num_scales - 1)
    if step < warmup_steps:
        return start_scale
    t = (step - warmup_steps) / max(end - warmup_steps, 1)
    return min(num_scales - 1, round(start_scale + t * (num_scales - 1 - start_scale)))
