"""The small statistics behind the drift detector, checked against textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.drift.stats import (
    FACTOR_FLOOR,
    Mahalanobis,
    benjamini_hochberg,
    binom_sf,
    chi2_sf,
    conformal_p_values,
    g_test,
    holm,
    ledoit_wolf,
)


@pytest.mark.parametrize(("stat", "df", "p"), [(3.841459, 1, 0.05), (18.307038, 10, 0.05),
                                               (6.634897, 1, 0.01), (0.0, 3, 1.0), (124.342, 100, 0.05)])
def test_chi2_sf_matches_critical_values(stat: float, df: int, p: float) -> None:
    """chi2_sf reproduces tabulated chi-square critical values."""
    assert chi2_sf(stat, df) == pytest.approx(p, rel=1e-4, abs=1e-12)


def test_g_test_identical_shares_is_not_significant() -> None:
    """A window with the baseline's shares gives a p-value near 1."""
    _, df, p = g_test(np.array([100, 200, 300]), np.array([10, 20, 30]))
    assert df == 2 and p > 0.99


def test_g_test_detects_a_moved_share() -> None:
    """A label share moving from 10% to 50% is highly significant."""
    _, _, p = g_test(np.array([900, 100]), np.array([100, 100]))
    assert p < 1e-10


def test_g_test_ignores_categories_empty_in_both() -> None:
    """Empty categories do not add degrees of freedom."""
    assert g_test(np.array([5, 0, 5]), np.array([5, 0, 5]))[1] == 1


def test_binom_sf_matches_direct_sum() -> None:
    """The exact binomial tail equals the sum of the pmf."""
    n, p = 30, 0.1
    direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(7, n + 1))
    assert binom_sf(7, n, p) == pytest.approx(direct, rel=1e-10)


def test_benjamini_hochberg_rejects_step_up_set() -> None:
    """BH rejects every hypothesis up to the largest p_(i) <= q i / m."""
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True] + [False] * 8
    assert benjamini_hochberg(np.array([0.01, 0.02, 0.03]), 0.05).all()


def test_holm_is_step_down() -> None:
    """Holm stops at the first p-value above alpha / (m - rank)."""
    assert holm(np.array([0.01, 0.04, 0.03, 0.005]), 0.05).tolist() == [True, False, False, True]


def test_ledoit_wolf_is_well_conditioned_when_features_exceed_samples() -> None:
    """With more features than samples the shrunk covariance is still positive definite."""
    z = np.random.default_rng(0).normal(size=(20, 50))
    cov, shrinkage = ledoit_wolf(z - z.mean(axis=0))
    assert 0.0 < shrinkage <= 1.0
    assert np.linalg.eigvalsh(cov).min() > 0


def test_mahalanobis_contributions_sum_to_distance() -> None:
    """Per-feature contributions add up to the squared distance."""
    x = np.random.default_rng(1).normal(size=(300, 8))
    m = Mahalanobis.fit(x)
    c = m.contributions(x[:5])
    assert np.allclose(c.sum(axis=1), m.distance2(x[:5]))


def test_mahalanobis_constant_feature_is_inactive_and_finite() -> None:
    """A constant feature is left out instead of dividing by zero."""
    x = np.random.default_rng(2).normal(size=(200, 4))
    x[:, 2] = 7.0
    m = Mahalanobis.fit(x)
    probe = x[:3].copy()
    probe[0, 2] = 1e6
    assert not m.active[2] and np.all(np.isfinite(m.distance2(probe)))


def test_factor_precision_inverts_the_factor_covariance_and_keeps_contributions_exact() -> None:
    """components=k: the precision is the inverse of W W^T + diag(psi), W the k leading principal
    directions of the standardised data scaled by their root variance, psi what each feature has
    left (floored); contributions still sum to the distance."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12)) + 3.0
    m = Mahalanobis.fit(x, components=4)
    z = (x - x.mean(0)) / x.std(0)
    w, v = np.linalg.eigh(z.T @ z / len(z))
    load = v[:, ::-1][:, :4] * np.sqrt(w[::-1][:4])
    psi = np.maximum(1.0 - (load**2).sum(1), FACTOR_FLOOR)
    np.testing.assert_allclose(m.precision, np.linalg.inv(load @ load.T + np.diag(psi)), rtol=1e-6, atol=1e-8)
    assert m.estimator == "factor4" and m.shrinkage == pytest.approx(psi.sum() / 12)
    c = m.contributions(x[:7])
    assert np.allclose(c.sum(axis=1), m.distance2(x[:7]))


def test_factor_model_from_parameters_refuses_mismatched_or_non_positive_residuals() -> None:
    """Stored factors that do not fit the active features, or a residual variance <= 0, are
    refused rather than inverted into a broken precision."""
    m = Mahalanobis.fit(np.random.default_rng(0).normal(size=(200, 6)), components=2)
    assert m.loadings is not None and m.psi is not None
    with pytest.raises(ValueError, match="psi"):
        Mahalanobis.from_factors(m.mean, m.scale, m.active, m.loadings, np.zeros(6), m.shrinkage)
    with pytest.raises(ValueError, match="loadings"):
        Mahalanobis.from_factors(m.mean, m.scale, m.active, m.loadings[:4], m.psi, m.shrinkage)


def test_factor_model_catches_a_broken_correlation_like_ledoit_wolf() -> None:
    """Features driven by one common factor: samples where a few of them move together off
    that factor are caught by the factor model (its per-feature residual variances are small
    there), as by Ledoit-Wolf."""
    rng = np.random.default_rng(7)

    def draw(n: int, shift: float = 0.0) -> np.ndarray:
        latent = rng.normal(size=(n, 1))
        x = np.hstack([latent + 0.3 * rng.normal(size=(n, 12)), rng.normal(size=(n, 60))])
        x[:, 4:8] += shift
        return x

    base, normal, odd = draw(1000), draw(2000), draw(200, shift=2.5)
    for k in (0, 4):
        m = Mahalanobis.fit(base, components=k)
        thr = np.quantile(m.distance2(normal), 0.99)
        assert np.mean(m.distance2(odd) > thr) > 0.9, k


def test_factor_model_with_more_components_than_data_stays_finite() -> None:
    """components >= samples or features, and constant features, give finite distances."""
    x = np.random.default_rng(6).normal(size=(10, 30))
    x[:, 5] = 1.0
    for k in (1, 9, 50):
        m = Mahalanobis.fit(x, components=k)
        assert np.all(np.isfinite(m.distance2(x))) and np.all(np.isfinite(m.precision))


def test_conformal_p_values_control_false_positive_rate() -> None:
    """On exchangeable null scores, P(p < alpha) stays at about alpha."""
    rng = np.random.default_rng(3)
    cal = np.sort(rng.chisquare(5, 2000))
    p = conformal_p_values(rng.chisquare(5, 20000), cal)
    assert abs(np.mean(p < 0.05) - 0.05) < 0.01
    assert p.min() >= 1 / 2001


def test_clipped_distance_stops_growing_once_a_feature_is_beyond_the_clip() -> None:
    """With clip=4 one exploding feature adds no more than it would at 4 SD; unclipped it keeps growing."""
    x = np.random.default_rng(3).normal(size=(400, 6))
    clipped, plain = Mahalanobis.fit(x, clip=4.0), Mahalanobis.fit(x)
    probe = np.repeat(x.mean(axis=0, keepdims=True), 3, axis=0)
    sd = x.std(axis=0)
    probe[0, 1] += 4.5 * sd[1]
    probe[1, 1] += 1e6 * sd[1]
    probe[2, 1] += 3.0 * sd[1]  # inside the clip: still scored by its value
    d_c, d_p = clipped.distance2(probe), plain.distance2(probe)
    assert np.isclose(d_c[0], d_c[1]) and d_c[2] < d_c[0]
    assert d_p[1] > 1e6 * d_p[0] and np.all(np.isfinite(d_c))


def test_clip_must_be_positive() -> None:
    """A clip of zero or below is refused with the value named."""
    with pytest.raises(ValueError, match="clip must be > 0"):
        Mahalanobis.fit(np.random.default_rng(4).normal(size=(50, 3)), clip=0.0)
