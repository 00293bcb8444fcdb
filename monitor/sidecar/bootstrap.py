"""The sidecar's composition root: every collaborator built from the settings, in one place.

:func:`build_parts` reads :class:`~monitor.sidecar.config.SidecarSettings` once and returns
:class:`SidecarParts`: the lens bank, the token decoder, the backend's transport and ledger, the
audit trail (with its head store on the backend), the baseline store, the scoring stage and the
metrics recorder. :class:`~monitor.sidecar.service.Sidecar` receives them and keeps only its
consumer loop. Tests and the embedded demo pass ready collaborators as keyword overrides.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from monitor.backends import Backend, open_backend
from monitor.backends.ledger import Ledger
from monitor.drift.baseline import Baseline
from monitor.drift.store import BaselineStore
from monitor.errors import LayerwatchError
from monitor.metrics import SidecarMetrics
from monitor.narratives import TokenDecoder, default_decoder, tokenizer_decoder
from monitor.pipeline import LensReader
from monitor.pipeline.scoring import ScoringConfig, ScoringStage, watchable_labels
from monitor.sidecar.config import SidecarSettings
from monitor.sidecar.recent import RecentNarratives
from monitor.sidecar.recorder import SidecarRecorder
from monitor.transport import Transport
from monitor.urls import is_backend_url

log = logging.getLogger("layerwatch.sidecar")


class AuditSink(Protocol):
    """What the sidecar needs from the audit trail (:class:`monitor.audit.writer.AuditWriter`)."""

    def append(self, kind: str, payload: dict[str, Any]) -> Any:
        """Append one record."""
        ...

    def append_many(self, items: list[tuple[str, dict[str, Any]]]) -> Any:
        """Append records in one write."""
        ...

    def sync(self) -> Any:
        """Make every appended record durable."""
        ...

    def close(self) -> Any:
        """Flush and release the trail."""
        ...


@dataclass
class SidecarParts:
    """Everything one sidecar replica works with, built by :func:`build_parts`."""

    settings: SidecarSettings
    model_label: str
    bank: LensReader
    decode_token: TokenDecoder
    backend: Backend
    transport: Transport
    ledger: Ledger
    audit: AuditSink
    baselines: BaselineStore | None  # shared baselines (Redis); None on memory://
    scoring: ScoringStage
    metrics: SidecarMetrics
    recorder: SidecarRecorder
    recent: RecentNarratives


def build_parts(
    settings: SidecarSettings,
    *,
    bank: LensReader | None = None,
    transport: Transport | None = None,
    audit: AuditSink | None = None,
    tokenizer: Any = None,
    registry: CollectorRegistry | None = None,
    ledger: Ledger | None = None,
    baseline: Baseline | None = None,
) -> SidecarParts:
    """Build a replica's collaborators from ``settings``; the keywords replace single parts."""
    metrics = SidecarMetrics(registry)
    bank = bank if bank is not None else load_bank(settings)
    apply_probe_bar(bank, settings)
    tok = tokenizer if tokenizer is not None else getattr(bank, "tokenizer", None)
    if tok is None and settings.tokenizer is not None:
        tok = load_tokenizer(settings.tokenizer)
    backend = open_backend(settings.transport, redis=settings.redis)
    client = backend.client()
    # The label is fixed at start-up (series never move): configured, else the bank's model name.
    model_label = settings.model_name or getattr(bank, "model_name", None) or "unknown"
    metrics.allow_models([model_label, *settings.metric_models])  # a sample's own name is the producer's
    recorder = SidecarRecorder(metrics, model_label)
    baselines = BaselineStore(model_label, redis=client) if client is not None else None
    if baseline is None:
        baseline = find_baseline(settings, baselines)
    b = settings.baseline
    scoring = ScoringStage(ScoringConfig(alpha=b.alpha, window=b.window, learn_samples=b.learn_samples,
                                         watch=tuple(b.watch), local_score=b.local_score),
                           model=model_label, fingerprint=bank.fingerprint, bundle_id=bank.bundle_id,
                           probe_labels=watchable_labels(bank), baseline=baseline)
    return SidecarParts(
        settings=settings, model_label=model_label, bank=bank,
        decode_token=tokenizer_decoder(tok) if tok is not None else default_decoder,
        backend=backend,
        transport=transport or backend.transport(stream=settings.stream, maxlen=settings.stream_maxlen,
                                                 dead_maxlen=settings.dead_letter_maxlen,
                                                 dead_payload_max_bytes=settings.dead_letter_payload_max_bytes),
        ledger=ledger or backend.ledger(key_prefix=f"{settings.stream}:ledger:{settings.group}",
                                        ttl_s=settings.ledger_ttl_s),
        audit=audit if audit is not None else open_audit(settings, metrics, client, model_label),
        baselines=baselines, scoring=scoring, metrics=metrics, recorder=recorder,
        recent=RecentNarratives(settings.recent_narratives),
    )


def apply_probe_bar(bank: LensReader, settings: SidecarSettings) -> None:
    """Tighten the bank's probe bars by ``narratives.min_probe_margin`` / ``min_probe_confidence``
    (a value below the bundle's own fails start-up naming the setting; unset: the bundle's bar).
    Always from the bundle's own bars, so a bank shared by several sidecars (tests, the demo)
    carries only the last one's settings, never a mix."""
    bars = getattr(bank, "probe_bars", None)
    if not bars:
        return
    from monitor.lenses.trust import stricter

    base = getattr(bank, "bundle_probe_bars", None) or bars
    n = settings.narratives
    tightened = stricter(base, min_margin=n.min_probe_margin, min_confidence=n.min_probe_confidence)
    bank.bundle_probe_bars = base  # type: ignore[attr-defined]
    bank.probe_bars = tightened  # type: ignore[attr-defined]


def load_bank(settings: SidecarSettings) -> LensReader:
    """The ONNX lens bank of ``settings.bundle`` (onnxruntime is imported here, sidecar side only)."""
    if settings.bundle is None:
        raise LayerwatchError("bundle: no lens bundle configured (set LAYERWATCH_BUNDLE or pass bank=)")
    from monitor.lenses import LensBank

    return LensBank.load(settings.bundle, threads=settings.ort_threads)  # type: ignore[no-any-return]


def open_audit(settings: SidecarSettings, metrics: SidecarMetrics, client: Any, model_label: str | None = None) -> AuditSink:
    """This replica's audit writer, ``audit.directory/<consumer>/``; with ``head_store: auto`` the
    head lives in the backend's Redis when there is one, else beside the trail."""
    from monitor.audit.heads import RedisHeadStore, head_store_from_spec
    from monitor.audit.writer import AuditWriter

    writer_id = re.sub(r"[^A-Za-z0-9._-]", "-", settings.consumer)[:64].lstrip("._-") or "sidecar"
    config = settings.audit.writer_config(writer_id, auto_head_store=settings.transport if client is not None else "file")
    spec = settings.audit.head_store
    if spec == "auto":
        head_store = (RedisHeadStore(settings.transport, key_prefix=config.head_key_prefix, client=client)
                      if client is not None else head_store_from_spec("file", config.trail_dir))
    else:  # a Redis of its own authenticates with the same redis section (credentials, TLS)
        own = open_backend(spec, field="audit.head_store", redis=settings.redis).client() if is_backend_url(spec) else None
        head_store = head_store_from_spec(spec, config.trail_dir, key_prefix=config.head_key_prefix, client=own)
    return AuditWriter(config, head_store=head_store, metrics=metrics,  # type: ignore[return-value]
                       model=model_label or settings.model_name or "unknown")


def find_baseline(settings: SidecarSettings, store: BaselineStore | None) -> Baseline | None:
    """The configured baseline: a file, else the configured or active id in the shared store;
    None (learning mode) when there is none or the store cannot be read."""
    b = settings.baseline
    if b.file is not None:
        return Baseline.loads(b.file.read_text())
    if store is None:
        return None
    try:
        return store.load(b.id) if b.id else store.active()
    except LayerwatchError as exc:
        log.warning("no baseline loaded from Redis: %s", exc)
        return None


def load_tokenizer(path: Any) -> Any:
    """A tokenizer for printing tokens in narratives, from a Hugging Face tokenizer directory.

    ``tokenizer.json`` is read with the ``tokenizers`` library (Rust, no torch): the sidecar stays
    free of torch and transformers, which would add ~250 MB of RSS for decoding token ids. A
    directory without ``tokenizer.json`` (slow tokenizers only) falls back to transformers."""
    p = Path(path)
    try:
        if (p / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(p / "tokenizer.json"))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # noqa: BLE001 - tokenizers/transformers raise many types
        raise LayerwatchError(f"tokenizer: cannot load a tokenizer from {p}: {exc}") from exc
