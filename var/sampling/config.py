"""Sampling settings in one place, with the file-name tag that records them next to the images."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CFG_SCHEDULES = {"linear": "lin", "constant": "const"}


def _num(x: float) -> str:
    """1.5 -> '1.5', 1 -> '1.0', 0.96 -> '0.96' (stable, readable file names)."""
    return repr(float(x))


@dataclass(frozen=True)
class SamplingConfig:
    """Everything that changes a sample besides the model and the class.

    cfg:           classifier-free guidance strength; 0 turns guidance off (no null-class forward at all).
    cfg_schedule:  ``linear`` (official: 0 at the first scale, cfg at the last) or ``constant``.
    top_k, top_p:  nucleus filters with the official semantics; 0 turns either off.
    temperature:   logits are divided by it before the filters (the official code has none, i.e. 1.0).
    gumbel_smooth: 0 off; > 0 is the base temperature tau0 of the official ``more_smooth`` option, which
                   feeds a Gumbel-softmax mix of codes (tau = max(tau0 * (1 - 0.95 * ratio), 0.005)) to the
                   next scale instead of the hard code. The official value is 0.27. Visualisation only.
    seed:          base seed; the tasks derive one seed per image from it.
    """

    cfg: float = 1.5
    cfg_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    gumbel_smooth: float = 0.0
    seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every impossible value."""
        out = []
        if self.cfg_schedule not in CFG_SCHEDULES:
            out.append(("cfg_schedule", f"expected one of {', '.join(CFG_SCHEDULES)}"))
        if self.cfg < 0:
            out.append(("cfg", "must be >= 0"))
        if self.top_k < 0:
            out.append(("top_k", "must be >= 0 (0: off)"))
        if not 0 <= self.top_p <= 1:
            out.append(("top_p", "must be in [0, 1] (0: off)"))
        if self.temperature <= 0:
            out.append(("temperature", "must be > 0"))
        if self.gumbel_smooth < 0:
            out.append(("gumbel_smooth", "must be >= 0 (0: off)"))
        return out

    def validate(self, prefix: str = "") -> None:
        from var.errors import ConfigError

        for name, why in self.problems():
            raise ConfigError(f"{prefix}{name}={getattr(self, name)!r}: {why}")

    def kwargs(self) -> dict:
        """Keyword arguments of sample_tokens / sample_images / edit_image (everything but the seed)."""
        d = asdict(self)
        d.pop("seed")
        return d

    def tag(self) -> str:
        """e.g. ``cfg1.5-lin_topk900_topp0.96_t1.0_seed0`` (``_gum0.27`` when smoothing is on)."""
        parts = [f"cfg{_num(self.cfg)}-{CFG_SCHEDULES.get(self.cfg_schedule, self.cfg_schedule)}",
                 f"topk{int(self.top_k)}", f"topp{_num(self.top_p)}", f"t{_num(self.temperature)}"]
        if self.gumbel_smooth > 0:
            parts.append(f"gum{_num(self.gumbel_smooth)}")
        parts.append(f"seed{int(self.seed)}")
        return "_".join(parts)

    @classmethod
    def from_node(cls, node, seed: int = 0) -> SamplingConfig:
        """From a config node (``task.sampling``) holding any subset of the fields."""
        names = {f.name for f in fields(cls)}
        given = {k: node[k] for k in node if k in names}
        unknown = sorted(set(node) - names)
        if unknown:
            from var.errors import ConfigError

            raise ConfigError(f"task.sampling.{unknown[0]}: unknown sampling setting; known: {', '.join(sorted(names))}")
        types = {"cfg": float, "top_k": int, "top_p": float, "temperature": float, "gumbel_smooth": float,
                 "seed": int, "cfg_schedule": str}
        given = {k: types[k](v) for k, v in given.items()}
        given.setdefault("seed", int(seed))
        return cls(**given)
