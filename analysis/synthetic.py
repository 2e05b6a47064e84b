"""Synthetic sweeps: record.json files in the exact format of docs/record_format.md.

The losses follow a known surface L(N, D) = E + A/N^a + B/D^b (N total parameters, D tokens seen)
with log-normal noise, so demos, tests and the notebook have ground truth and a meaningful compute
frontier (every run carries an evaluation history along training). Model sizes and FLOPs use the
VAR architecture rule (width 64*d, heads d, 680 tokens per image, 4096 codes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TOKENS_PER_IMAGE = sum(p * p for p in PATCH_NUMS)  # 680
VOCAB = 4096
N_CLASSES = 1000
CODE_DIM = 32

# Ground-truth surfaces per metric (raw N in parameters, D in tokens).
DEMO_LAW = {
    "L_mean": {"E": 4.0, "A": 126.0, "a": 0.30, "B": 173.0, "b": 0.28},
    "L_last": {"E": 3.6, "A": 150.0, "a": 0.32, "B": 190.0, "b": 0.27},
}


def surface(law: dict, n, d):
    return law["E"] + law["A"] / np.power(n, law["a"]) + law["B"] / np.power(d, law["b"])


def model_counts(depth: int) -> dict:
    """Parameter counts of a VAR of this depth (biases approximated, embeddings/head exact)."""
    w = 64 * depth
    core = 73728 * depth**3  # attention 4w^2 + FFN 8w^2 + AdaLN 6w^2 per block
    block_biases = 15 * w * depth
    embeddings = (N_CLASSES + 1) * w + TOKENS_PER_IMAGE * w + len(PATCH_NUMS) * w + (CODE_DIM + 1) * w
    head_adaln = 2 * w * w + 2 * w
    head = w * VOCAB + VOCAB
    non_embedding = core + block_biases + head_adaln
    return {"depth": depth, "width": w, "heads": depth, "params_total": non_embedding + embeddings + head,
            "params_non_embedding": non_embedding, "params_core": core}


def flops_per_image(model: dict) -> dict:
    """Training FLOPs (3x forward) per image under the three named conventions."""
    w, d, n_tok = model["width"], model["depth"], TOKENS_PER_IMAGE
    ends = np.cumsum([p * p for p in PATCH_NUMS])
    ctx_block_causal = sum(p * p * e for p, e in zip(PATCH_NUMS, ends)) / n_tok  # ~421 tokens
    dense = 2 * 12 * w * w * d * n_tok + 2 * w * VOCAB * n_tok + 2 * CODE_DIM * w * n_tok
    per_image = 2 * 6 * w * w * d + 2 * 2 * w * w  # AdaLN runs once per image, not per token

    def attention(ctx):
        return 2 * 2 * ctx * w * d * n_tok

    return {
        "6NL": 6 * model["params_non_embedding"] * n_tok,
        "exact": 3 * (dense + per_image + attention(ctx_block_causal)),
        "exact_dense_attn": 3 * (dense + per_image + attention(n_tok)),
    }


def _per_scale(mean: float, last: float) -> list[float]:
    """Per-scale values whose token-weighted mean is `mean` and whose last entry is `last`."""
    weights = np.array([p * p for p in PATCH_NUMS], float)
    rest = (mean * weights.sum() - last * weights[-1]) / weights[:-1].sum()
    return [float(rest)] * (len(PATCH_NUMS) - 1) + [float(last)]


def _metrics(law: dict, n: float, tokens: float, noise: float, rng) -> dict:
    out = {}
    for name in ("L_mean", "L_last"):
        out[name] = float(surface(law[name], n, tokens) * math.exp(rng.normal(0.0, noise)))
    for src, name in (("L_mean", "err_mean"), ("L_last", "err_last")):  # monotone map loss -> error
        out[name] = float(min(0.999, 1.0 - 0.9 * math.exp(-0.08 * out[src] ** 1.5)))
    out["per_scale_loss"] = _per_scale(out["L_mean"], out["L_last"])
    out["per_scale_err"] = _per_scale(out["err_mean"], out["err_last"])
    return out


def make_record(depth: int, images: int, *, sweep: str, run_name: str, run_dir: str, law=None,
                noise=0.005, n_evals=12, batch_size=64, status="complete", seed=0,
                n_eval_images=512) -> dict:
    """One run's record: log-spaced test evaluations along training, the last one annealed."""
    law = law or DEMO_LAW
    rng = np.random.default_rng(seed)
    model = model_counts(depth)
    fpi = flops_per_image(model)
    max_steps = max(1, images // batch_size)
    steps = sorted({int(s) for s in np.geomspace(max(1, max_steps // 100), max_steps, n_evals).round()})
    if status != "complete":  # stopped part-way
        steps = steps[: max(1, len(steps) // 2)]
    evals = []
    for step in steps:
        seen = step * batch_size
        annealed = status == "complete" and step == max_steps
        m = _metrics(law, model["params_total"], seen * TOKENS_PER_IMAGE, noise, rng)
        evals.append({"step": step, "images_seen": seen, "tokens_seen": seen * TOKENS_PER_IMAGE,
                      "flops": {k: v * seen for k, v in fpi.items()}, "split": "test",
                      "annealed": annealed, **m, "n_images": n_eval_images})
    last = evals[-1]
    final = None
    if status == "complete":
        final = {"step": last["step"], **{k: last[k] for k in ("L_mean", "L_last", "err_mean", "err_last",
                                                                "per_scale_loss", "per_scale_err", "n_images")}}
    return {
        "schema": 1, "run_name": run_name, "run_dir": run_dir, "sweep": sweep, "status": status,
        "error": "RuntimeError: CUDA out of memory" if status == "failed" else None, "preemptions": 0,
        "started_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T01:00:00Z",
        "config": {"model": {"depth": depth}, "trainer": {"max_steps": max_steps}, "batch_size": batch_size,
                   "synthetic": True},
        "model": model, "tokens_per_image": TOKENS_PER_IMAGE, "flops_per_image": fpi, "batch_size": batch_size,
        "progress": {"step": last["step"], "images_seen": last["images_seen"], "tokens_seen": last["tokens_seen"],
                     "flops_seen": last["flops"]},
        "evals": evals, "final": final,
        "data_faults": {"skipped": 0, "seen": last["images_seen"]},
    }


def make_sweep(out_dir, depths=(2, 3, 4, 6, 8, 10, 12), *, sweep="scaling_demo", images=256_000,
               horizons=(1.0,), budgets=None, law=None, noise=0.005, n_evals=12, batch_size=64,
               failed=0, running=0, seed=0) -> list[Path]:
    """Write one record.json per run under out_dir/<run_name>/ and return their paths.

    Designs: every depth for `images` x each of `horizons` (a fixed-epoch grid when horizons=(1,));
    or, with `budgets` (6NL training FLOPs), every depth at each budget (an iso-FLOP grid).
    `failed`/`running` add that many extra runs stopped half-way, with those statuses.
    """
    out_dir = Path(out_dir)
    plan = []  # (depth, images, run_name, status)
    for depth in depths:
        if budgets:
            per_image = flops_per_image(model_counts(depth))["6NL"]
            plan += [(depth, int(c / per_image), f"depth={depth},budget={c:.0e}", "complete") for c in budgets]
        else:
            for h in horizons:
                name = f"depth={depth}" if len(horizons) == 1 else f"depth={depth},horizon={h:g}"
                plan.append((depth, int(images * h), name, "complete"))
    plan = [p for p in plan if p[1] >= 4 * batch_size]  # too short to train: not in the grid
    extra = [("failed", i) for i in range(failed)] + [("running", i) for i in range(running)]
    for status, i in extra:
        depth, n_images, name, _ = plan[i % len(plan)]
        plan.append((depth, n_images, f"{name},{status}={i}", status))
    paths = []
    for k, (depth, n_images, name, status) in enumerate(plan):
        run_dir = out_dir / name
        rec = make_record(depth, n_images, sweep=sweep, run_name=name, run_dir=str(run_dir), law=law,
                          noise=noise, n_evals=n_evals, batch_size=batch_size, status=status, seed=seed * 1000 + k)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "record.json"
        path.write_text(json.dumps(rec, indent=1))
        paths.append(path)
    return paths
