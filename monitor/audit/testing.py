"""Helpers for tests of the audit trail and of its callers (the sidecar): a settable clock and
realistic sample payloads in the shape the sidecar writes."""

from __future__ import annotations

import random
from typing import Any

from monitor.audit.records import sample_fields

_TOKENS = (" the", " Paris", " capital", " France", " a", " city", "\n", " of", " is", " London", " Berlin",
           " def", "(", " return", " 42", " —", " café")


class FakeClock:
    """A clock for :class:`~monitor.audit.writer.AuditWriter` that moves only when told."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


def example_narrative(n_layers: int = 6, *, seed: int = 0, k: int = 3, probes: bool = True) -> dict[str, Any]:
    """A narrative shaped like the sidecar's: per-layer top-k, entropy, KL, rank, probes, sentence."""
    rng = random.Random(seed)
    layers = []
    for layer in range(n_layers):
        toks = rng.sample(_TOKENS, k)
        if layer >= n_layers - 2:
            toks[0] = " Paris"
        raw = sorted((rng.random() for _ in range(k)), reverse=True)
        scale = (0.2 + 0.7 * layer / max(n_layers - 1, 1)) / sum(raw)
        top = [[t, round(p * scale, 4)] for t, p in zip(toks, raw, strict=True)]
        entry: dict[str, Any] = {
            "layer": layer, "top": top, "entropy": round(6.0 - 5.0 * layer / max(n_layers - 1, 1), 3),
            "kl_to_final": round(8.0 * (1 - layer / max(n_layers - 1, 1)), 3),
            "final_top1_rank": max(0, n_layers - 2 - layer) * 3,
            "sentence": f"L{layer}: leaning {top[0][0]!r} ({top[0][1]:.2f})",
        }
        if probes:
            p = round(0.5 + 0.45 * layer / max(n_layers - 1, 1), 3)
            label = "geography" if layer > n_layers // 2 else "code"
            other = "code" if label == "geography" else "geography"
            entry["probes"] = {"topic": {"label": label, "p": p, "probs": {label: p, other: round(1 - p, 3)}}}
            entry["sentence"] += f", topic={label} {p:.2f}"
        layers.append(entry)
    return {
        "layers": layers,
        "final": {"top": [[" Paris", 0.6], [" the", 0.1], [" a", 0.05]]},
        "prediction_depth": n_layers - 2,
        "changes_of_mind": [n_layers - 3, n_layers - 2] if n_layers > 3 else [],
    }


def example_sample(i: int, *, flagged: bool | None = None, n_layers: int = 6, model: str = "smollm2",
                   redelivered: bool = False, text: str | None = None) -> dict[str, Any]:
    """The fields of the ``i``-th example ``sample`` record (every 5th is flagged by default)."""
    flagged = (i % 5 == 0) if flagged is None else flagged
    flags = [{"kind": "entropy_shift", "layers": [2, 3], "reading": "entropy",
              "detail": "entropy at layers 2-3 above the baseline's 99th percentile"}] if flagged else []
    return sample_fields(
        sample_id=f"s-{i:05d}", request_id=f"req-{i:05d}", model=model, model_fingerprint="fp" + "ab12" * 15,
        bundle_id="bundle-1", baseline_id="baseline-1", narrative=example_narrative(n_layers, seed=i),
        score={"value": 3.1 if flagged else 0.8, "p_value": 0.004 if flagged else 0.41, "flagged": flagged,
               "contributions": {str(layer): round(0.1 * layer, 2) for layer in range(n_layers)}},
        flags=flags, redelivered=redelivered, text=text,
    )


def crash(writer: Any, torn: bytes = b"") -> None:
    """Simulate the writer's process dying: no closing checkpoint, no fsync, the lock released as
    the kernel would; ``torn`` bytes are left at the end of the segment as a partial write."""
    sink = writer._sink  # noqa: SLF001 - a crash does not go through the public API
    path = sink.path
    sink.close()
    if torn and path is not None:
        with open(path, "ab") as f:
            f.write(torn)
    writer._closed = True  # noqa: SLF001
    writer._stop.set()  # noqa: SLF001
    if writer._publisher is not None:  # noqa: SLF001
        writer._publisher.flush(5.0)  # noqa: SLF001 - what was published before the crash
        writer._publisher.stop(flush=False)  # noqa: SLF001
    if writer._head_store is not None:  # noqa: SLF001
        writer._head_store.close()  # noqa: SLF001
    writer._trail_lock.release()  # noqa: SLF001
