"""Compute frontier, lower envelope, iso-FLOP profiles and N_opt(C)."""

import numpy as np
import pytest

from analysis import compute
from analysis.compute import Curve, lower_envelope, pareto_front
from analysis.records import load_dir
from analysis.synthetic import DEMO_LAW, make_sweep


def _hand_made_curves():
    # Three runs: small is best early, medium in the middle, large at the end; large starts later.
    small = Curve("small", 1e6, np.array([1.0, 2.0, 4.0, 8.0]), np.array([5.0, 4.0, 3.5, 3.3]))
    medium = Curve("medium", 1e7, np.array([2.0, 4.0, 8.0, 16.0]), np.array([4.5, 3.4, 2.9, 2.6]))
    large = Curve("large", 1e8, np.array([8.0, 16.0, 32.0]), np.array([3.0, 2.5, 2.0]))
    return [small, medium, large]


def test_pareto_front_of_hand_made_curves():
    front = pareto_front(_hand_made_curves())
    # At C=2 the small run's 4.0 beats the medium's 4.5; at C=8 the medium's 2.9 beats 3.0 and 3.3;
    # at C=16 the large run's 2.5 beats 2.6.
    assert list(front["x"]) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert list(front["y"]) == [5.0, 4.0, 3.4, 2.9, 2.5, 2.0]
    assert front["runs"] == ["small", "small", "medium", "medium", "large", "large"]


def test_pareto_front_drops_points_beaten_at_lower_compute():
    flat = Curve("flat", 1e6, np.array([1.0, 10.0]), np.array([2.0, 2.5]))  # got worse: never C_min
    front = pareto_front([flat])
    assert list(front["y"]) == [2.0]


def test_lower_envelope_is_min_of_log_log_interpolants():
    curves = _hand_made_curves()
    grid = np.array([1.0, 2.0, 3.0, 8.0, 12.0, 32.0, 64.0])
    env, owners = lower_envelope(curves, grid)

    def interp(c, x):
        return np.exp(np.interp(np.log(x), np.log(c.c), np.log(c.y)))

    expected_3 = min(interp(curves[0], 3.0), interp(curves[1], 3.0))
    expected_12 = min(interp(curves[1], 12.0), interp(curves[2], 12.0))
    assert env[:6] == pytest.approx([5.0, 4.0, expected_3, 2.9, expected_12, 2.0])
    # At C=3 the small run, interpolated, is still ahead (3.70 vs 3.82); at C=12 the large one (2.70 vs 2.72).
    assert owners[:6] == ["small", "small", "small", "medium", "large", "large"]
    assert np.isnan(env[6]) and owners[6] is None  # beyond every curve


def test_frontier_fit_on_synthetic_sweep(tmp_path):
    make_sweep(tmp_path, depths=(2, 3, 4, 6, 8), noise=0.002)
    table = load_dir(tmp_path)
    fit, curves = compute.fit_frontier(table, "L_mean", "6NL", n_boot=20)
    assert len(curves) == 5
    assert fit.kind == "frontier" and fit.axis.unit == "PFLOP"
    assert fit.params["alpha"] < 0 and fit.quality["pearson_r"] < -0.95
    front = pareto_front(curves)
    assert np.all(np.diff(front["y"]) < 0) and np.all(np.diff(front["x"]) >= 0)


def test_isoflop_finds_compute_optimal_size(tmp_path):
    make_sweep(tmp_path, depths=(2, 3, 4, 5, 6, 8, 10), budgets=[3e14, 1e15, 3e15, 1e16], noise=0.0)
    table = load_dir(tmp_path)
    iso = compute.isoflop(table, "L_mean", "6NL", n_boot=20)
    assert iso is not None and len(iso["profiles"]) == 4
    assert all(p["valid"] for p in iso["profiles"][1:])
    law = DEMO_LAW["L_mean"]
    # Under C = 6ND the optimum scales as C^(b/(a+b)); a parabola in log N approximates it.
    assert iso["n_opt_exponent"] == pytest.approx(law["b"] / (law["a"] + law["b"]), abs=0.1)
    assert all(t > 0 for t in iso["tokens_per_param_at_opt"])


def test_isoflop_absent_with_one_budget(tmp_path):
    make_sweep(tmp_path, depths=(2, 3, 4))  # one horizon, sizes differ in compute
    assert compute.isoflop(load_dir(tmp_path), "L_mean", "6NL", n_boot=0) is None
