"""The scorers of the drift ablation benchmark rank outliers above normal samples, without NaN."""

from __future__ import annotations

import numpy as np

from benchmarks.drift_eval import auroc, tail_normaliser
from benchmarks.drift_scorers import (
    concept_scores,
    factor_mixture,
    heldout_log_likelihood,
    knn_distance,
    pca_mahalanobis,
    supervised_ceiling,
)
from monitor.drift.stats import Mahalanobis
from monitor.drift.testing import synth


def _mix() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((12, 40))


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mix = _mix()
    rng = np.random.default_rng(1)
    base = rng.standard_normal((400, 12)) @ mix
    base[:, 5] = 3.0  # a constant feature
    normal = rng.standard_normal((200, 12)) @ mix
    normal[:, 5] = 3.0
    shifted = normal.copy()
    shifted[:, 7] += 6.0  # moves off the baseline's subspace
    return base, normal, shifted


def test_pca_mahalanobis_scores_shifted_samples_higher_and_stays_finite() -> None:
    """Off-subspace shifts score above every normal sample; constant features give no NaN."""
    base, normal, shifted = _data()
    f = pca_mahalanobis(base, 12)
    s_n, s_s = f(normal), f(shifted)
    assert np.isfinite(s_n).all() and np.isfinite(s_s).all()
    assert np.median(s_s) > np.quantile(s_n, 0.99)


def test_knn_distance_scores_shifted_samples_higher() -> None:
    """The k-NN distance in whitened components ranks samples moved along the data above normal ones."""
    base, normal, _ = _data()
    shifted = normal + 5.0 * _mix()[0]
    shifted[:, 5] = 3.0
    f = knn_distance(base, 5, components=12)
    assert np.median(f(shifted)) > np.quantile(f(normal), 0.99)


def test_supervised_ceiling_separates_a_learnable_shift_and_not_noise() -> None:
    """Out-of-fold logits rank a shift along one direction far above normal (AUROC > 0.99), and
    give chance level (AUROC near 0.5) when both sets come from the same distribution; a constant
    feature gives no NaN."""
    base, normal, shifted = _data()
    logit = supervised_ceiling(normal, shifted)
    assert np.all(np.isfinite(logit)) and auroc(logit[:200], logit[200:]) > 0.99
    same = supervised_ceiling(normal[:100], normal[100:])
    assert abs(auroc(same[:100], same[100:]) - 0.5) < 0.15


def _two_clusters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 10))
    x[: n // 2, :5] += 4.0  # the clusters differ in five features at once (a leading component)
    x[n // 2:, :5] -= 4.0
    return x


def test_factor_mixture_flags_the_gap_between_two_clusters_that_one_gaussian_calls_normal() -> None:
    """Samples halfway between two baseline clusters are far from both clusters' models, though a
    single Gaussian fitted to everything puts them at its centre."""
    base, normal = _two_clusters(600, 0), _two_clusters(400, 1)
    gap = np.random.default_rng(2).standard_normal((100, 10))  # halfway between the clusters
    mix = factor_mixture(base, 2, components=2, clip=None, pcs=4)
    single = Mahalanobis.fit(base, components=2).distance2
    assert auroc(mix(normal), mix(gap)) > 0.99
    assert auroc(single(normal), single(gap)) < 0.5
    assert np.isfinite(mix(gap)).all()


def test_heldout_log_likelihood_prefers_the_covariance_model_with_the_true_factors() -> None:
    """Data with 6 latent factors: a 6-factor model fits held-out samples better than 1 factor."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 30))
    fit, held = (rng.standard_normal((n, 6)) @ w + 0.3 * rng.standard_normal((n, 30)) for n in (800, 300))
    ll = {k: heldout_log_likelihood(Mahalanobis.fit(fit, components=k), held) for k in (1, 6)}
    assert ll[6] > ll[1] + 1.0


def test_concept_scores_rise_for_the_label_a_shift_pushes_and_not_for_others() -> None:
    """Synthetic readings pushed toward 'code' score high on topic=code; topic=news does not rise."""
    fit, normal, shifted = synth(400, seed=0), synth(300, seed=1), synth(300, seed=2, code=4.0)
    c_n, c_s = concept_scores(fit, normal), concept_scores(fit, shifted)
    assert set(c_n) == {"topic=prose", "topic=news", "topic=code"}
    assert auroc(c_n["topic=code"], c_s["topic=code"]) > 0.95
    assert auroc(c_n["topic=news"], c_s["topic=news"]) < 0.6  # softmax: news loses what code gains


def test_tail_normaliser_is_monotone_and_ranks_scores_beyond_every_fit_sample() -> None:
    """-log tail probability: increasing in the score, about -log(0.5) at the median, finite and
    still increasing above the largest fit score (exponential tail), so such scores stay ordered."""
    fit = np.random.default_rng(0).exponential(size=1000)
    u = tail_normaliser(fit)
    grid = np.linspace(0, 3 * fit.max(), 200)
    v = u(grid)
    assert np.all(np.diff(v) >= -1e-12) and np.isfinite(v).all()
    assert abs(float(u(np.array([np.median(fit)]))[0]) - np.log(2)) < 0.1
    assert u(np.array([2 * fit.max()]))[0] > u(np.array([1.2 * fit.max()]))[0] > np.log(1001)
