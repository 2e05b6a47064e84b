"""Power-law fitting: exact recovery, intervals, unit invariance, floor and joint forms, warnings."""

import numpy as np
import pytest

from analysis import fitting
from analysis.powerlaw import fit_joint, fit_law
from analysis.units import axis_for

# VAR's 12 sizes, 18M..2B (log-spaced stand-ins; the fitter only sees X and y).
SIZES = np.geomspace(18e6, 2e9, 12)
N_AXIS = axis_for("params_total")  # fitted in 1e6 params

# VAR's published laws L = (beta*X)^alpha (Tian et al. 2024), X in the fit unit.
VAR_LAWS = [(-0.23, 2.0), (-0.20, 2.5), (-0.016, 490.0), (-0.010, 650.0)]


@pytest.mark.parametrize("alpha,beta", VAR_LAWS)
def test_pure_law_exact_recovery(alpha, beta):
    x_fit = SIZES / N_AXIS.scale
    fit = fit_law(SIZES, (beta * x_fit) ** alpha, N_AXIS, n_boot=0)
    assert fit.params["alpha"] == pytest.approx(alpha, rel=1e-9, abs=1e-12)
    assert fit.params["beta"] == pytest.approx(beta, rel=1e-6)
    assert fit.params["b"] == fit.params["alpha"]
    assert fit.params["a"] == pytest.approx(beta**alpha, rel=1e-9)
    assert fit.quality["pearson_r"] == pytest.approx(-1.0, abs=1e-12)
    assert fit.quality["r2"] == pytest.approx(1.0, abs=1e-12)
    assert not any("curved" in w for w in fit.warnings)
    assert "1e6 params" in fit.headline() and "r=-1.0000" in fit.headline()


def test_unit_of_x_changes_beta_not_alpha():
    rng = np.random.default_rng(1)
    y = (2.0 * SIZES / 1e6) ** -0.2 * np.exp(rng.normal(0, 0.01, SIZES.size))
    in_millions = fit_law(SIZES, y, axis_for("params_total", 1e6), n_boot=0)
    in_billions = fit_law(SIZES, y, axis_for("params_total", 1e9), n_boot=0)
    assert in_billions.params["alpha"] == pytest.approx(in_millions.params["alpha"], rel=1e-12)
    assert in_billions.params["beta"] == pytest.approx(in_millions.params["beta"] * 1000, rel=1e-9)
    assert in_billions.params_raw["beta"] == pytest.approx(in_millions.params_raw["beta"], rel=1e-9)
    assert in_billions.params["beta"] != pytest.approx(in_millions.params["beta"])
    assert "1e9 params" in in_billions.headline()


def test_permuting_rows_changes_nothing():
    y = (2.0 * SIZES / 1e6) ** -0.2 * np.exp(np.random.default_rng(2).normal(0, 0.02, SIZES.size))
    order = np.random.default_rng(3).permutation(SIZES.size)
    a = fit_law(SIZES, y, N_AXIS, n_boot=0)
    b = fit_law(SIZES[order], y[order], N_AXIS, n_boot=0)
    assert a.params["alpha"] == pytest.approx(b.params["alpha"], rel=1e-12)


def test_noisy_recovery_inside_interval():
    rng = np.random.default_rng(0)
    y = (2.0 * SIZES / 1e6) ** -0.23 * np.exp(rng.normal(0, 0.02, SIZES.size))
    fit = fit_law(SIZES, y, N_AXIS, n_boot=300, ci_level=0.95)
    lo, hi = fit.ci["alpha"]
    assert lo < -0.23 < hi and hi - lo < 0.1
    lo, hi = fit.ci["beta"]
    assert lo < 2.0 < hi


def test_interval_coverage_over_many_seeds():
    hits = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        y = (2.5 * SIZES / 1e6) ** -0.20 * np.exp(rng.normal(0, 0.02, SIZES.size))
        lo, hi = fit_law(SIZES, y, N_AXIS, n_boot=200, ci_level=0.9, seed=seed).ci["alpha"]
        hits += lo <= -0.20 <= hi
    assert hits >= 32  # >= 80% for a nominal 90% interval


def test_floor_form_recovers_irreducible_term_and_pure_warns():
    x = np.geomspace(1e6, 1e10, 12)
    y = 2.0 + (5e7 / x) ** 0.3
    pure = fit_law(x, y, N_AXIS, form="pure", n_boot=0)
    assert any("curved" in w and "irreducible" in w for w in pure.warnings)
    floor = fit_law(x, y, N_AXIS, form="floor", n_boot=0)
    assert floor.converged
    assert floor.params["E"] == pytest.approx(2.0, rel=1e-6)
    assert floor.params["alpha"] == pytest.approx(0.3, rel=1e-6)
    assert floor.params_raw["X0"] == pytest.approx(5e7, rel=1e-5)
    assert floor.params["X0"] == pytest.approx(50.0, rel=1e-5)  # same law, N in millions


def test_floor_form_noisy_interval_covers_truth():
    x = np.geomspace(1e6, 1e10, 12)
    rng = np.random.default_rng(4)
    y = (2.0 + (5e7 / x) ** 0.3) * np.exp(rng.normal(0, 0.003, x.size))
    fit = fit_law(x, y, N_AXIS, form="floor", n_boot=100, ci_level=0.95)
    assert fit.ci["E"][0] < 2.0 < fit.ci["E"][1]
    assert fit.ci["alpha"][0] < 0.3 < fit.ci["alpha"][1]


def test_extrapolation_check_reports_error_on_held_out_sizes():
    rng = np.random.default_rng(5)
    y = (2.0 * SIZES / 1e6) ** -0.23 * np.exp(rng.normal(0, 0.01, SIZES.size))
    fit = fit_law(SIZES, y, N_AXIS, n_boot=50, holdout=2)
    ext = fit.extrapolation
    assert ext["holdout_sizes"] == pytest.approx(list(SIZES[-2:]))
    assert len(ext["points"]) == 2
    assert all(abs(p["rel_error"]) < 0.05 and "inside" in p for p in ext["points"])
    assert ext["mean_abs_rel_error"] < 0.05


def test_few_sizes_warning():
    x = SIZES[:4]
    fit = fit_law(x, (2 * x / 1e6) ** -0.2, N_AXIS, n_boot=0)
    assert any("only 4 distinct N" in w for w in fit.warnings)


def _isoflop_design(E=1.69, A=406.4, B=410.7, a=0.34, b=0.28):
    """8 budgets 1e17..1e22 FLOP x 16 sizes around the optimum, D = C/(6N) (as in vpnls' tests)."""
    g = (a * A / (b * B)) ** (1 / (a + b))
    n, d = [], []
    for c in np.geomspace(1e17, 1e22, 8):
        n_opt = g * (c / 6) ** (b / (a + b))
        sizes = n_opt * np.geomspace(0.1, 10, 16)
        n += list(sizes)
        d += list(c / (6 * sizes))
    n, d = np.array(n), np.array(d)
    return n, d, E + A / n**a + B / d**b


CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "a": 0.34, "b": 0.28}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chinchilla_surface_exact_recovery(reduction):
    n, d, y = _isoflop_design()
    params, opt = fitting.fit_joint(np.log(n / 1e6), np.log(d / 1e9), np.log(y), reduction=reduction)
    assert opt.converged
    from analysis.forms import to_raw

    raw = to_raw("joint", params, 1e6, 1e9)
    for name, value in CHINCHILLA.items():
        assert raw[name] == pytest.approx(value, rel=1e-6), name


def test_mean_and_sum_objectives_reach_the_same_optimum_on_noisy_data():
    n, d, y = _isoflop_design()
    y = y * np.exp(np.random.default_rng(6).normal(0, 0.01, y.size))
    args = (np.log(n / 1e6), np.log(d / 1e9), np.log(y))
    p_sum, o_sum = fitting.fit_joint(*args, reduction="sum")
    p_mean, o_mean = fitting.fit_joint(*args, reduction="mean")
    assert o_sum.converged and o_mean.converged
    for name in CHINCHILLA:
        assert p_mean[name] == pytest.approx(p_sum[name], rel=1e-4), name


def test_joint_fit_with_bootstrap_and_no_conditioning_warning():
    n, d, y = _isoflop_design()
    y = y * np.exp(np.random.default_rng(7).normal(0, 0.005, y.size))
    fit = fit_joint(n, d, y, axis_for("params_total"), axis_for("tokens"), n_boot=20)
    assert fit.converged
    assert fit.ci["a"][0] < 0.34 < fit.ci["a"][1] and fit.ci["b"][0] < 0.28 < fit.ci["b"][1]
    assert not any("ill-conditioned" in w for w in fit.warnings)
    assert fit.quality["N_opt_exponent"] == pytest.approx(0.28 / 0.62, abs=0.05)


def test_collinear_design_is_flagged_ill_conditioned():
    n = np.repeat(np.geomspace(1e7, 1e10, 10), 1)
    d = 20 * n  # one tokens-per-parameter ratio for every run
    y = 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28
    y = y * np.exp(np.random.default_rng(8).normal(0, 0.005, y.size))
    fit = fit_joint(n, d, y, axis_for("params_total"), axis_for("tokens"), n_boot=20)
    assert any("ill-conditioned" in w for w in fit.warnings)
    assert fit.quality["design_condition"] > 1e6 or not np.isfinite(fit.quality["design_condition"])
