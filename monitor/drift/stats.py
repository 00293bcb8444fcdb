"""Small, dependency-free statistics used by the drift detector (numpy and the standard library).

* :func:`ledoit_wolf` shrunk covariance (Ledoit & Wolf 2004) and :class:`Mahalanobis`, a squared
  distance with per-feature contributions that add up to the total;
* :func:`conformal_p_values`: split-conformal p-values against held-out calibration scores;
* :func:`chi2_sf` (regularised upper incomplete gamma), :func:`g_test` (two-sample G-test on a
  2 x K contingency table), :func:`binom_sf` (exact binomial upper tail);
* :func:`benjamini_hochberg` and :func:`holm` multiple-testing control.

scipy would do all of this, but the sidecar image stays smaller without it and each piece here is
a few lines that the tests check against textbook values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# covariance and Mahalanobis distance
# ---------------------------------------------------------------------------------------------


def ledoit_wolf(z: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of centred data ``z`` [n, p] and the shrinkage used.

    The target is the scaled identity ``mu * I``. The estimator stays well conditioned when
    p is close to or above n, which is our case (hundreds of per-layer features, a few thousand
    baseline samples).
    """
    n, p = z.shape
    s = (z.T @ z) / n
    mu = float(np.trace(s)) / p
    z2 = z * z
    # beta_: sum_ij sum_k z_ki^2 z_kj^2 ; delta_: ||S||_F^2 (sklearn's ledoit_wolf_shrinkage)
    beta_ = float(np.sum(z2.T @ z2))
    delta_ = float(np.sum(s * s))
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(s)) + p * mu * mu) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else float(max(0.0, beta / delta))
    shrunk = (1.0 - shrinkage) * s
    shrunk[np.diag_indices(p)] += shrinkage * mu
    return shrunk, shrinkage


FACTOR_FLOOR = 0.05  # least residual variance of a standardised feature in the factor model


@dataclass(frozen=True)
class Mahalanobis:
    """Squared Mahalanobis distance on standardised features with a shrunk covariance.

    ``mean``/``scale`` standardise each feature; features whose baseline spread is zero
    (constant readings) are left out (``active`` False), so they cannot divide by zero.
    """

    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F] (1.0 where inactive)
    active: np.ndarray  # bool [F]
    precision: np.ndarray  # [Fa, Fa] inverse shrunk covariance of the active standardised features
    shrinkage: float  # Ledoit-Wolf: the shrinkage used; factor model: the variance share left to psi
    components: int = 0  # 0: Ledoit-Wolf; k > 0: a k-factor model
    clip: float | None = None  # standardised features are winsorised to [-clip, clip] (None: not)
    # A factor model's own parameters (None for Ledoit-Wolf): ``precision`` is computed from them,
    # and they are what a baseline stores (Fa x (k + 1) numbers instead of Fa x Fa).
    loadings: np.ndarray | None = None  # [Fa, k] W
    psi: np.ndarray | None = None  # [Fa] residual variances

    @classmethod
    def from_factors(cls, mean: np.ndarray, scale: np.ndarray, active: np.ndarray, loadings: np.ndarray,
                     psi: np.ndarray, shrinkage: float, clip: float | None = None) -> Mahalanobis:
        """A factor model from its parameters (the precision by the Woodbury identity)."""
        loadings = np.asarray(loadings, dtype=np.float64)
        psi = np.asarray(psi, dtype=np.float64)
        n_active = int(np.sum(active))
        if loadings.ndim != 2 or loadings.shape[0] != n_active or psi.shape != (n_active,) or not np.all(psi > 0):
            raise ValueError("factor model: loadings and psi do not match the active features, or psi <= 0")
        return cls(mean, scale, active, factor_precision(loadings, psi), shrinkage, loadings.shape[1], clip,
                   loadings, psi)

    def rounded(self) -> Mahalanobis:
        """The same model with its stored parameters rounded to float32, as a baseline stores
        them, so that distances computed before and after a save/load round trip are equal."""
        def f32(a: np.ndarray) -> np.ndarray:
            return np.asarray(a, dtype=np.float32).astype(np.float64)

        if self.loadings is not None and self.psi is not None:
            return Mahalanobis.from_factors(self.mean, self.scale, self.active, f32(self.loadings),
                                            f32(self.psi), self.shrinkage, self.clip)
        return Mahalanobis(self.mean, self.scale, self.active, f32(self.precision), self.shrinkage,
                           self.components, self.clip)

    @property
    def estimator(self) -> str:
        return f"factor{self.components}" if self.components else "ledoit-wolf"

    @classmethod
    def fit(cls, x: np.ndarray, ridge: float = 1e-6, components: int = 0,
            clip: float | None = None) -> Mahalanobis:
        """Fit mean, scale and a shrunk precision matrix to ``x`` [n, F].

        ``clip``: winsorise each standardised feature to ``[-clip, clip]`` before the covariance
        is fitted and before every distance. Narrative features are heavy-tailed (a rare token's
        surprisal, a KL that explodes on one odd text): unclipped, one extreme reading of an
        otherwise normal sample decides its distance, and those samples set the 99th percentile
        that a shift has to beat. Clipped at 4 standard deviations a reading can still push a
        sample out (16 per feature, correlated features together), but no longer alone.

        ``components=0``: Ledoit-Wolf shrinkage towards a scaled identity. ``components=k``: a
        k-factor model, ``W W^T + diag(psi)``: the k leading principal directions of the
        standardised features plus each feature's own left-over variance (at least
        :data:`FACTOR_FLOOR`). Per-layer narrative features are many and strongly correlated
        within a layer and across neighbours; Ledoit-Wolf shrinks all of that correlation
        towards the identity alike, a factor model keeps the main directions of normal traffic
        and still weights each feature's own noise. On the drift benchmark it raised mean TPR at
        1% FPR from 0.55 to 0.65 (``python -m benchmarks.drift_eval --components 0|16``); a
        probabilistic PCA with one pooled residual variance scored the same on real traffic but
        missed a shift that breaks a tight correlation (synthetic entropy shift: TPR 0.38 vs 1.00).
        It is still a precision matrix, so per-feature contributions add up to the distance.
        """
        if components < 0:
            raise ValueError(f"components must be >= 0, got {components}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or Inf")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        active = std > 1e-9 * (1.0 + np.abs(mean))
        scale = np.where(active, std, 1.0)
        z = ((x - mean) / scale)[:, active]
        if clip is not None:
            z = np.clip(z, -clip, clip)
        if z.shape[1] == 0:
            return cls(mean, scale, active, np.zeros((0, 0)), 1.0, components, clip)
        if components:
            loadings, psi, share = factor_model(z, components, FACTOR_FLOOR)
            return cls.from_factors(mean, scale, active, loadings, psi, share, clip)
        cov, shrinkage = ledoit_wolf(z)
        cov[np.diag_indices_from(cov)] += ridge
        # eigh is stable for symmetric PSD matrices; clip tiny eigenvalues before inverting.
        w, v = np.linalg.eigh(cov)
        w = np.maximum(w, ridge)
        precision = (v / w) @ v.T
        return cls(mean, scale, active, precision, shrinkage, 0, clip)

    @property
    def n_active(self) -> int:
        return int(self.active.sum())

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Active standardised features [n, Fa] (winsorised to ``[-clip, clip]`` when set)."""
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale)[:, self.active]
        return z if self.clip is None else np.clip(z, -self.clip, self.clip)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Per-feature terms ``z_i (P z)_i`` [n, F] (zero for inactive features); rows sum to d^2."""
        x = np.atleast_2d(x)
        out = np.zeros((x.shape[0], self.mean.shape[0]))
        if self.n_active == 0:
            return out
        z = self.standardise(x)
        z = np.nan_to_num(z, nan=0.0, posinf=1e6, neginf=-1e6)
        out[:, self.active] = z * (z @ self.precision)
        return out

    def distance2(self, x: np.ndarray) -> np.ndarray:
        """Squared distances [n]."""
        return self.contributions(x).sum(axis=1)


def factor_model(z: np.ndarray, k: int, floor: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A k-factor model of standardised data ``z`` [n, p]: loadings ``W`` [p, k], residual
    variances ``psi`` [p] and the share of the variance left to ``psi``.

    ``W`` holds the k leading principal directions scaled by the root of their variance; ``psi``
    each feature's variance left over, at least ``floor``."""
    n, _ = z.shape
    zc = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    k = min(k, len(s))
    w = vt[:k].T * (s[:k] / np.sqrt(n))  # [p, k]
    var = np.einsum("ij,ij->j", zc, zc) / n  # ~1 (standardised)
    psi = np.maximum(var - np.einsum("ik,ik->i", w, w), floor)
    share = float(psi.sum() / max(float(var.sum()), 1e-300))
    return w, psi, share


def factor_precision(w: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """The inverse of ``W W^T + diag(psi)`` by the Woodbury identity (a k x k solve)."""
    k = w.shape[1]
    wp = w / psi[:, None]  # Psi^-1 W
    inner = np.eye(k) + w.T @ wp
    precision = np.diag(1.0 / psi) - wp @ np.linalg.solve(inner, wp.T)
    return np.asarray(0.5 * (precision + precision.T))


# ---------------------------------------------------------------------------------------------
# conformal calibration
# ---------------------------------------------------------------------------------------------


def conformal_p_values(scores: np.ndarray, calibration_sorted: np.ndarray) -> np.ndarray:
    """Split-conformal p-values: ``(1 + #{cal >= s}) / (n_cal + 1)``.

    With exchangeable normal samples, ``P(p <= alpha) <= alpha``: a threshold on p is a
    false-positive rate.
    """
    cal = np.asarray(calibration_sorted, dtype=np.float64)
    n = cal.shape[0]
    s = np.asarray(scores, dtype=np.float64)
    n_ge = n - np.searchsorted(cal, s, side="left")
    return (1.0 + n_ge) / (n + 1.0)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def _gammainc_lower_series(a: float, x: float) -> float:
    term = 1.0 / a
    total = term
    ap = a
    for _ in range(10_000):
        ap += 1.0
        term *= x / ap
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gammainc_upper_cf(a: float, x: float) -> float:
    # Lentz's continued fraction (Numerical Recipes, gcf)
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(stat: float, df: int) -> float:
    """Survival function of the chi-square distribution, ``P(X >= stat)`` for ``X ~ chi2(df)``."""
    if df <= 0:
        return 1.0
    if not math.isfinite(stat):
        return 0.0 if stat > 0 else 1.0
    if stat <= 0:
        return 1.0
    a, x = df / 2.0, stat / 2.0
    if x < a + 1.0:
        return max(0.0, 1.0 - _gammainc_lower_series(a, x))
    return min(1.0, _gammainc_upper_cf(a, x))


def g_test(reference_counts: np.ndarray, window_counts: np.ndarray) -> tuple[float, int, float]:
    """Two-sample G-test of homogeneity on a 2 x K table; returns (G, df, p-value).

    Categories empty in both samples are dropped (they carry no information). G is the
    log-likelihood ratio statistic, chi-square with K-1 degrees of freedom under the null.
    """
    ref = np.asarray(reference_counts, dtype=np.float64)
    win = np.asarray(window_counts, dtype=np.float64)
    keep = (ref + win) > 0
    ref, win = ref[keep], win[keep]
    k = ref.shape[0]
    n_ref, n_win = ref.sum(), win.sum()
    if k < 2 or n_ref <= 0 or n_win <= 0:
        return 0.0, 0, 1.0
    table = np.stack([ref, win])
    col = table.sum(axis=0)
    expected = np.outer([n_ref, n_win], col) / (n_ref + n_win)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(table > 0, table * np.log(table / expected), 0.0)
    g = float(2.0 * terms.sum())
    df = k - 1
    return g, df, chi2_sf(g, df)


def binom_sf(k: int, n: int, p: float) -> float:
    """Exact ``P(X >= k)`` for ``X ~ Binomial(n, p)``."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k, n + 1)
    ]
    m = max(logs)
    return min(1.0, math.exp(m) * sum(math.exp(v - m) for v in logs))


def benjamini_hochberg(p_values: np.ndarray, q: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected by the Benjamini-Hochberg procedure at FDR ``q``.

    Under the global null (no drift anywhere), BH also controls the family-wise error, so a
    window raises with probability at most ``q`` when nothing moved.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[0]
    reject = np.zeros(m, dtype=bool)
    if m == 0:
        return reject
    order = np.argsort(p, kind="stable")
    thresh = q * np.arange(1, m + 1) / m
    below = p[order] <= thresh
    if below.any():
        last = int(np.max(np.nonzero(below)[0]))
        reject[order[: last + 1]] = True
    return reject


def holm(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected by Holm's step-down procedure (FWER ``alpha``)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.shape[0]
    reject = np.zeros(m, dtype=bool)
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] <= alpha / (m - rank):
            reject[i] = True
        else:
            break
    return reject


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins cut by interior ``edges`` (len(edges) + 1 bins)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1)
