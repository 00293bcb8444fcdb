"""The local anomaly score: a short foreign segment anywhere inside a prompt (issue 19).

The whole-text score reads the last token and the prompt mean, which dilute a segment of a few
percent of the prompt. This score reads the tap's prompt *windows* (:mod:`monitor.windows`) of a
few layers and asks whether any contiguous run of windows is unlike the baseline's windows.

Per window and layer ``l`` (raw states, not the lens: the lens is the sidecar's main cost): the
window mean minus the baseline's mean, projected on the top ``k`` principal axes of the
baseline's windows at that layer and whitened (a Mahalanobis distance per axis, ``m2 / k``), plus
the squared residual off those axes relative to its baseline mean (``spe``, what the axes miss);
the window's statistic is the mean over the layers of ``(m2/k + spe) / 2``.

Scales: runs of ``span`` = 1, 2, 4, 8, 16 adjacent windows (:func:`monitor.windows.merge_adjacent`
in exact, length-weighted form; the projection is linear, so runs are merged after projecting).

Position effects, measured on SmolLM2's held-out prose (620 baseline prompts of 5-1,024 tokens,
9,257 windows): a window's ``log(statistic)`` falls with its length in tokens (mean 0.13 for 4-5
tokens, -0.32 for 8-11, -0.72 for 12-15: a mean over more tokens is less noisy), the first window
(next to the attention sink) reads differently from the others, and the last one (ending at the
prompt's last token) lower than the middle ones (z -0.46 vs 0.18 when standardised without its
own class). So ``log(statistic)`` is standardised by the baseline's mean and spread for its
length class and place (first, last, other): ``z``.

Per sample: at each scale, the largest ``z``, turned into a tail probability by that scale's
distribution of window ``z`` in the baseline, times the number of windows at that scale
(Bonferroni over windows, so long and short prompts are on one footing); the local statistic is
``max over scales of -log`` of that. Fitting uses the baseline's fit split only, in two halves
(principal axes on one, standardisation and tails on the other, so both see out-of-sample
distances).

Combined with the whole-text score into one statistic, calibrated like it: each is put on one
scale by its upper-tail probability among the fit split's values (the whole-text distance ``d2``,
the local statistic) divided by its share of alpha (:data:`LOCAL_SHARE`),
``T = max(-log(tail(d2) / 0.75), -log(tail(local) / 0.25))``, and ``T``'s conformal p-value
against the calibration split (which neither saw) is the sample's. So ``alpha`` is one
false-positive rate for both, with no Bonferroni factor (a conformal p-value is at least
``1/(n_cal+1)``, which a factor 2 would push past ``alpha = 0.01`` for baselines under 200
calibration samples), and the whole-text score keeps at least ~75% of alpha. A sample without windows gets the whole-text score's own p-value (whether it
has windows is fixed by its capture, not by its scores, so this stays valid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.drift.codec import decode_array, encode_array
from monitor.drift.prompt_windows import WindowStates
from monitor.drift.stats import conformal_p_values
from monitor.errors import BaselineError
from monitor.windows import FIRST_POSITION

LOCAL_VERSION = 2  # 2: the last window is a class of its own
DEFAULT_LOCAL_LAYERS = 8
DEFAULT_LOCAL_COMPONENTS = 32
SCALES = (1, 2, 4, 8, 16)
LENGTH_EDGES = (6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)  # window length classes (tokens)
N_PLACES = 3  # other, first, last window (see window_class)
MIN_CLASS_WINDOWS = 50  # a length class with fewer baseline windows borrows the pooled statistics
EIGEN_FLOOR = 1e-4  # smallest axis variance, relative to the largest
TAIL_SHARE = 0.05
# The share of alpha the local part may spend: the combined statistic is the larger of
# ``u_whole + log(1 - LOCAL_SHARE)`` and ``u_local + log(LOCAL_SHARE)`` (a weighted minimum of
# the two tail probabilities), so where the two parts are independent the whole-text score keeps
# at least 75% of alpha (where a shift moves both, as a whole-text shift moves every window, it
# loses nothing).
LOCAL_SHARE = 0.25  # beyond this upper share, tails are exponential (peaks over threshold)


def local_layers(layers: tuple[int, ...], n: int = DEFAULT_LOCAL_LAYERS) -> tuple[int, ...]:
    """``n`` states spread evenly over ``layers`` (first and last included)."""
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, min(n, len(layers)))).astype(int))
    return tuple(layers[i] for i in idx)


@dataclass(frozen=True)
class Tail:
    """Upper-tail probabilities of a statistic: empirical quantiles in the bulk, an exponential
    beyond the top ``TAIL_SHARE`` (so values beyond every baseline value still rank)."""

    quantiles: np.ndarray  # [Q] at levels linspace(0, 1, Q)
    threshold: float
    beta: float
    n: int

    @classmethod
    def fit(cls, values: np.ndarray, n_levels: int = 201) -> Tail:
        v = np.sort(np.asarray(values, dtype=np.float64))
        if len(v) == 0:
            raise BaselineError("local score: no baseline windows to fit a tail on")
        t = float(np.quantile(v, 1.0 - TAIL_SHARE))
        excess = v[v > t] - t
        beta = max(float(excess.mean()) if len(excess) else 1.0, 1e-6)
        return cls(np.quantile(v, np.linspace(0, 1, n_levels)), t, beta, len(v))

    def log_sf(self, x: np.ndarray) -> np.ndarray:
        """``log P(X >= x)`` under the baseline."""
        x = np.asarray(x, dtype=np.float64)
        levels = np.linspace(0, 1, len(self.quantiles))
        emp = np.maximum(1.0 - np.interp(x, self.quantiles, levels), 1.0 / (self.n + 1))
        return np.where(x > self.threshold, np.log(TAIL_SHARE) - (x - self.threshold) / self.beta, np.log(emp))

    def to_json(self) -> dict[str, Any]:
        return {"quantiles": self.quantiles.tolist(), "threshold": self.threshold, "beta": self.beta, "n": self.n}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tail:
        return cls(np.asarray(d["quantiles"], dtype=np.float64), float(d["threshold"]), float(d["beta"]), int(d["n"]))


@dataclass(frozen=True)
class LocalFinding:
    """The most unusual run of windows of one sample."""

    statistic: float  # -log of the scale-corrected tail probability (0 = nothing unusual)
    start: int  # token offsets [start, end) of the run in the prompt
    end: int
    span: int  # windows in the run (the scale)
    layer_strength: dict[int, float]  # layer -> the run's statistic at that layer (~1 normal)


@dataclass(frozen=True)
class LocalModel:
    """What the local score needs from the baseline (stored in the baseline document)."""

    layers: tuple[int, ...]
    mean: np.ndarray  # [L, d]
    basis: np.ndarray  # [L, d, k] principal axes of baseline windows
    inv_sd: np.ndarray  # [L, k] 1 / sd along each axis
    spe_scale: np.ndarray  # [L] baseline mean of the squared residual off the axes
    class_mean: np.ndarray  # [3, C] mean of log(statistic) per (place: other/first/last, length class)
    class_sd: np.ndarray  # [3, C]
    tails: tuple[Tail, ...]  # per scale: window z
    score_tail: Tail  # the whole-text d2 on the fit split
    local_tail: Tail  # the local statistic on the fit split's standardisation half
    calibration_scores: np.ndarray  # sorted combined statistics T of the calibration split
    local_calibration: np.ndarray  # sorted local statistics of the calibration split (local_p_value)
    n_windows: int  # baseline windows the axes were fitted on

    # --- scoring ------------------------------------------------------------------------------
    def window_stats(self, means: np.ndarray, bounds: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per scale: ``(statistic per layer [W_s, L], bounds [W_s, 2], z [W_s])`` of one sample's
        windows ``means [W, L, d]`` (of :attr:`layers`)."""
        b = np.asarray(bounds, dtype=np.int64)
        w = len(b)
        if w == 0:
            return []
        lens = (b[:, 1] - b[:, 0]).astype(np.float32)
        # per layer, length-weighted deviations [L, W, d]: a run's mean deviation is a sum of
        # consecutive rows over the run's length
        y = np.swapaxes(np.asarray(means, dtype=np.float32), 0, 1) - self.mean[:, None, :]
        y *= lens[None, :, None]
        proj = np.matmul(y, self.basis)  # [L, W, k] (linear: a run's projection is a sum too)
        gram = np.matmul(y, np.swapaxes(y, 1, 2))  # [L, W, W]: squared norms of any run's sum
        cp = np.concatenate([np.zeros((proj.shape[0], 1, proj.shape[2]), np.float32), np.cumsum(proj, axis=1)], axis=1)
        cg = np.zeros((gram.shape[0], w + 1, w + 1), np.float64)
        cg[:, 1:, 1:] = np.cumsum(np.cumsum(gram, axis=1, dtype=np.float64), axis=2)
        cl = np.concatenate([[0.0], np.cumsum(lens, dtype=np.float64)])
        out = []
        for span in SCALES:
            if span > w:
                break
            lo, hi = np.arange(w - span + 1), np.arange(span, w + 1)
            tot = (cl[hi] - cl[lo])[None, :]  # [1, W_s]
            pm = (cp[:, hi] - cp[:, lo]) / tot[..., None].astype(np.float32)  # [L, W_s, k]
            norm2 = (cg[:, hi, hi] - cg[:, lo, hi] - cg[:, hi, lo] + cg[:, lo, lo]) / np.square(tot)  # [L, W_s]
            m2 = np.square(pm * self.inv_sd[:, None, :]).mean(axis=2)
            spe = np.maximum(norm2 - np.square(pm).sum(axis=2), 0.0) / self.spe_scale[:, None]
            per_layer = (0.5 * (m2 + spe)).T  # [W_s, L]
            sb = np.stack([b[: w - span + 1, 0], b[span - 1:, 1]], axis=1)
            out.append((per_layer, sb, self._z(per_layer.mean(axis=1), sb)))
        return out

    def _z(self, stat: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        place, cls = window_class(bounds)
        return (np.log(np.maximum(stat, 1e-12)) - self.class_mean[place, cls]) / self.class_sd[place, cls]

    def find(self, means: np.ndarray, bounds: np.ndarray) -> LocalFinding | None:
        """The sample's local statistic and where it comes from (None: no windows)."""
        best: LocalFinding | None = None
        for i, (per_layer, sb, z) in enumerate(self.window_stats(means, bounds)):
            j = int(np.argmax(z))
            stat = float(-min(0.0, np.log(len(z)) + float(self.tails[i].log_sf(z[j]))))
            if best is None or stat > best.statistic:
                best = LocalFinding(stat, int(sb[j, 0]), int(sb[j, 1]), SCALES[i],
                                    {layer: float(v) for layer, v in zip(self.layers, per_layer[j], strict=True)})
        return best

    def statistics(self, win: WindowStates) -> tuple[np.ndarray, list[LocalFinding | None]]:
        """Local statistic per sample [n] (0 where a sample has no windows) and the findings."""
        self.check(win)
        found = [self.find(*win.sample(i)) for i in range(win.n)]
        return np.array([0.0 if f is None else f.statistic for f in found]), found

    def parts(self, d2: np.ndarray, stat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The whole-text and the local parts of the combined statistic: ``-log`` of each tail
        probability divided by its share of alpha."""
        return (-self.score_tail.log_sf(d2) + np.log1p(-LOCAL_SHARE),
                -self.local_tail.log_sf(stat) + np.log(LOCAL_SHARE))

    def combined(self, d2: np.ndarray, stat: np.ndarray) -> np.ndarray:
        """``T = max`` of the two parts."""
        u, v = self.parts(d2, stat)
        return np.asarray(np.maximum(u, v))

    def p_values(self, d2: np.ndarray, stat: np.ndarray) -> np.ndarray:
        """Conformal p-values of the combined statistic against the calibration split."""
        return conformal_p_values(self.combined(d2, stat), self.calibration_scores)

    def local_p_values(self, stat: np.ndarray) -> np.ndarray:
        """The local statistic's own conformal p-values (reported beside the combined one)."""
        return conformal_p_values(stat, self.local_calibration)

    def check(self, win: WindowStates) -> None:
        if win.layers != self.layers:
            raise BaselineError(f"window states of layers {list(win.layers)}, the local model reads {list(self.layers)}")

    # --- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, win: WindowStates, fit_idx: np.ndarray, cal_idx: np.ndarray, fit_d2: np.ndarray,
            cal_d2: np.ndarray, components: int = DEFAULT_LOCAL_COMPONENTS) -> LocalModel:
        """Fit on the baseline's fit split (axes on its even half, standardisation and tails on
        the odd half), calibrate on its calibration split; ``fit_d2``/``cal_d2``: the whole-text
        distances of those splits. ``win`` holds every baseline sample; samples without windows
        are left out of each step."""
        has = win.present()
        fit_d2 = np.asarray(fit_d2)[has[fit_idx]]
        cal_d2 = np.asarray(cal_d2)[has[cal_idx]]
        fit_idx, cal_idx = fit_idx[has[fit_idx]], cal_idx[has[cal_idx]]
        axes_idx, std_idx = fit_idx[0::2], fit_idx[1::2]
        rows = np.concatenate([np.arange(win.offsets[i], win.offsets[i + 1]) for i in axes_idx] or [np.zeros(0, int)])
        if len(rows) < 2 * components:
            raise BaselineError(f"local score: {len(rows)} baseline windows, need at least {2 * components}")
        n_l, d = win.means.shape[1], win.means.shape[2]
        k = min(components, d // 2)  # leave a residual: what the axes miss is half the statistic
        mean = np.zeros((n_l, d), np.float64)
        basis = np.zeros((n_l, d, k), np.float32)
        inv_sd = np.zeros((n_l, k), np.float32)
        spe_scale = np.zeros(n_l, np.float32)
        for layer in range(n_l):
            x = np.asarray(win.means[rows, layer], dtype=np.float64)
            mu = x.mean(axis=0)
            xc = x - mu
            cov = xc.T @ xc / max(1, len(x) - 1)
            vals, vecs = np.linalg.eigh(cov)
            top = np.argsort(vals)[::-1][:k]
            mean[layer] = mu
            basis[layer] = vecs[:, top].astype(np.float32)
            # an axis with almost no variance would turn float noise into distance: floor it
            inv_sd[layer] = (1.0 / np.sqrt(np.maximum(vals[top], EIGEN_FLOOR * max(vals.max(), 1e-30)))
                             ).astype(np.float32)
            p = xc @ vecs[:, top]
            spe_scale[layer] = max(float(np.mean(np.square(xc).sum(1) - np.square(p).sum(1))),
                                   EIGEN_FLOOR * float(vals.sum()), 1e-30)
        n_cls = len(LENGTH_EDGES) + 1
        flat = Tail(np.zeros(2), 0.0, 1.0, 1)
        proto = cls(tuple(win.layers), mean.astype(np.float32), basis, inv_sd, spe_scale,
                    np.zeros((N_PLACES, n_cls)), np.ones((N_PLACES, n_cls)), (), flat, flat, np.zeros(0), np.zeros(0),
                    len(rows))
        # standardisation by (place, length class), on the other half
        per_scale: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in SCALES]
        for i in std_idx:
            for s, (per_layer, sb, _) in enumerate(proto.window_stats(*win.sample(int(i)))):
                per_scale[s].append((np.log(np.maximum(per_layer.mean(axis=1), 1e-12)), sb))
        logs = np.concatenate([v for sc in per_scale for v, _ in sc] or [np.zeros(0)])
        if len(logs) == 0:
            raise BaselineError("local score: the baseline's samples carry no windows to standardise with")
        places, classes = (np.concatenate(x) for x in zip(*[window_class(b) for sc in per_scale for _, b in sc],
                                                           strict=True))
        class_mean, class_sd = _class_statistics(logs, places, classes, n_cls)
        proto = cls(proto.layers, proto.mean, basis, inv_sd, spe_scale, class_mean, class_sd, (), flat, flat,
                    np.zeros(0), np.zeros(0), len(rows))
        tails = []
        for sc in per_scale:
            z = np.concatenate([proto._z(np.exp(v), b) for v, b in sc]) if sc else np.zeros(0)
            tails.append(Tail.fit(z) if len(z) else flat)
        proto = cls(proto.layers, proto.mean, basis, inv_sd, spe_scale, class_mean, class_sd, tuple(tails), flat,
                    flat, np.zeros(0), np.zeros(0), len(rows))
        std_stat, _ = proto.statistics(win.subset(std_idx))
        proto = cls(proto.layers, proto.mean, basis, inv_sd, spe_scale, class_mean, class_sd, tuple(tails),
                    Tail.fit(fit_d2), Tail.fit(std_stat), np.zeros(0), np.zeros(0), len(rows))
        cal_stat, _ = proto.statistics(win.subset(cal_idx))
        return cls(proto.layers, proto.mean, basis, inv_sd, spe_scale, class_mean, class_sd, tuple(tails),
                   proto.score_tail, proto.local_tail, np.sort(proto.combined(cal_d2, cal_stat)), np.sort(cal_stat),
                   len(rows))

    # --- stored form --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": LOCAL_VERSION, "layers": list(self.layers), "scales": list(SCALES), "share": LOCAL_SHARE,
            "length_edges": list(LENGTH_EDGES), "mean": encode_array(self.mean, "float32"),
            "basis": encode_array(self.basis, "float32"), "inv_sd": encode_array(self.inv_sd, "float32"),
            "spe_scale": encode_array(self.spe_scale, "float32"),
            "class_mean": self.class_mean.tolist(), "class_sd": self.class_sd.tolist(),
            "tails": [t.to_json() for t in self.tails], "score_tail": self.score_tail.to_json(),
            "local_tail": self.local_tail.to_json(), "calibration_scores": self.calibration_scores.tolist(),
            "local_calibration": self.local_calibration.tolist(), "n_windows": self.n_windows,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LocalModel:
        if d.get("version") != LOCAL_VERSION or d.get("scales") != list(SCALES) \
                or d.get("length_edges") != list(LENGTH_EDGES) or d.get("share") != LOCAL_SHARE:
            raise BaselineError(f"local score model version {d.get('version')} with other scales, length "
                                f"classes or alpha share than this layerwatch's (version {LOCAL_VERSION}); "
                                "rebuild the baseline")
        return cls(tuple(int(x) for x in d["layers"]), decode_array(d["mean"]), decode_array(d["basis"]),
                   decode_array(d["inv_sd"]), decode_array(d["spe_scale"]),
                   np.asarray(d["class_mean"], dtype=np.float64), np.asarray(d["class_sd"], dtype=np.float64),
                   tuple(Tail.from_json(t) for t in d["tails"]), Tail.from_json(d["score_tail"]),
                   Tail.from_json(d["local_tail"]), np.asarray(d["calibration_scores"], dtype=np.float64),
                   np.asarray(d["local_calibration"], dtype=np.float64), int(d["n_windows"]))


def _class_statistics(logs: np.ndarray, places: np.ndarray, classes: np.ndarray, n_cls: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD of ``logs`` per (place, length class); a class with fewer than
    MIN_CLASS_WINDOWS windows is interpolated between its place's populated length classes
    (the nearest one past either end; the "other" place's when its own has none, the pooled
    values when no class has enough)."""
    mean = np.full((N_PLACES, n_cls), np.nan)
    sd = np.full((N_PLACES, n_cls), np.nan)
    for f in range(N_PLACES):
        for c in range(n_cls):
            sel = logs[(places == f) & (classes == c)]
            if len(sel) >= MIN_CLASS_WINDOWS:
                mean[f, c], sd[f, c] = float(sel.mean()), float(max(sel.std(), 1e-6))
    for f in (0, *range(1, N_PLACES)):  # "other" first: the other places fall back on it
        have = np.flatnonzero(~np.isnan(mean[f]))
        for c in range(n_cls):
            if not np.isnan(mean[f, c]):
                continue
            if len(have):
                mean[f, c], sd[f, c] = np.interp(c, have, mean[f, have]), np.interp(c, have, sd[f, have])
            elif f and not np.isnan(mean[0, c]):
                mean[f, c], sd[f, c] = mean[0, c], sd[0, c]
            else:
                mean[f, c], sd[f, c] = float(logs.mean()), float(max(logs.std(), 1e-6))
    return mean, sd


def window_class(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(place, length class) of each of one sample's windows ``[start, end)`` (or runs): place 1
    for the first (next to the attention sink), 2 for the last (ending at the prompt's end), 0
    for the others."""
    b = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    place = np.where(b[:, 0] == FIRST_POSITION, 1, np.where(b[:, 1] == b[:, 1].max(initial=0), 2, 0))
    return place.astype(np.int64), np.searchsorted(np.asarray(LENGTH_EDGES), b[:, 1] - b[:, 0], side="right")
