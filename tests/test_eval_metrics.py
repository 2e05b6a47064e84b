"""Distribution metrics on plain feature sets: Fréchet distance, KID, precision/recall, IS (no network)."""

from __future__ import annotations

import numpy as np
import pytest

from var.eval import frechet


def gaussian(n=600, d=16, seed=0, shift=0.0, scale=1.0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d) * scale + shift


def fd(a, b):
    return frechet.frechet_distance(*frechet.feature_stats(a), *frechet.feature_stats(b))


def test_frechet_distance_of_a_set_to_itself_is_zero():
    x = gaussian()
    assert fd(x, x) == pytest.approx(0.0, abs=1e-8)
    # Rank-deficient covariance (fewer samples than dimensions): still finite and ~0.
    y = gaussian(n=10, d=32)
    assert fd(y, y) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_monotonically_with_perturbation():
    x = gaussian(seed=0)
    noise = np.random.RandomState(1).randn(*x.shape)
    dists = [fd(x, x + s * noise + s) for s in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert dists[0] == pytest.approx(0.0, abs=1e-8)
    assert all(b > a for a, b in zip(dists, dists[1:])), dists


def test_frechet_distance_matches_the_closed_form():
    # Diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.0])
    got = frechet.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2))
    assert got == pytest.approx(5.0 + 1.0 + 0.0 + 4.0, rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    a, b = gaussian(seed=0), gaussian(seed=1)
    same, _ = frechet.kid(a, b, num_subsets=20, subset_size=300)
    apart, _ = frechet.kid(a, gaussian(seed=2, shift=0.5), num_subsets=20, subset_size=300)
    assert abs(same) < 0.02 and apart > 10 * max(abs(same), 1e-3)


def test_kid_std_is_none_when_every_subset_is_both_sets_whole():
    a, b = gaussian(n=200, seed=0), gaussian(n=200, seed=2, shift=0.5)
    whole, std = frechet.kid(a, b, num_subsets=20, subset_size=1000)
    assert std is None
    assert whole == pytest.approx(frechet.kid(a, b, num_subsets=1, subset_size=200)[0], rel=1e-12)
    _, sub_std = frechet.kid(a, b, num_subsets=20, subset_size=100)
    assert sub_std > 0


def test_precision_recall():
    real = gaussian(n=400, d=8, seed=0)
    assert frechet.precision_recall(real, gaussian(n=400, d=8, seed=1)) > (0.8, 0.8)
    # Fake samples collapsed onto a small region of the real manifold: precise, but poor recall.
    collapsed = gaussian(n=400, d=8, seed=3, scale=0.1)
    p, r = frechet.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.3
    # Fake samples far away: neither.
    p, r = frechet.precision_recall(real, gaussian(n=400, d=8, seed=4, shift=10))
    assert p == 0.0 and r == 0.0


def test_inception_score_and_class_accuracy():
    k, n = 10, 1000
    uniform = np.zeros((n, k))
    assert frechet.inception_score(uniform)[0] == pytest.approx(1.0)
    labels = np.arange(n) % k
    confident = np.full((n, k), -20.0)
    confident[np.arange(n), labels] = 20.0
    assert frechet.inception_score(confident)[0] == pytest.approx(k, rel=1e-3)
    assert frechet.class_accuracy(confident, labels) == 1.0
    assert frechet.class_accuracy(confident, (labels + 1) % k) == 0.0
