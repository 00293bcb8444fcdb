"""What both tap front ends share: layers, sampling, sample ids, counters, metrics and export.

A front end (Hugging Face hooks in :mod:`monitor.tap.hf`, the vLLM plugin in
:mod:`monitor.tap.vllm`) decides where hidden states come from; :class:`TapCore` decides which
requests are sampled, names the samples, offers finished captures to the exporter and keeps the
counters that ride in every sample header. Both front ends therefore ship the same wire format
and the sidecar cannot tell them apart.

Threading contract: :meth:`decide`, :meth:`new_ids` and :meth:`finish` run on the serving
thread; they never block (a short, uncontended lock at most) and never raise into it.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from monitor.config import TapSettings
from monitor.errors import ConfigError
from monitor.metrics import TapMetrics
from monitor.tap.exporter import CapturedRequest, CapturedStep, Exporter
from monitor.tap.recorder import SKIP_REASONS, TapRecorder
from monitor.tap.sampler import Sampler, read_key
from monitor.transport import Transport, open_transport
from monitor.urls import parse_url
from monitor.wire import SCHEMA_VERSION

__all__ = ["SKIP_REASONS", "TapCore", "watched_layers"]


def watched_layers(settings: TapSettings, n_blocks: int) -> tuple[int, ...]:
    """The states a tap captures: every one, or the configured ones plus state N (always)."""
    if settings.layers == "all":
        return tuple(range(n_blocks + 1))
    bad = [i for i in settings.layers if i > n_blocks]
    if bad:
        raise ConfigError(f"layers: indices {bad} out of range 0..{n_blocks} for a {n_blocks}-block model")
    return tuple(sorted(set(settings.layers) | {n_blocks}))


class TapCore:
    """Sampling, naming, counting and exporting for one front end (one model in one process)."""

    def __init__(
        self,
        settings: TapSettings,
        *,
        model_name: str,
        fingerprint: str,
        n_blocks: int,
        registry: CollectorRegistry | None = None,
        transport: Transport | None = None,
        header: dict[str, Any] | None = None,
        hidden_size: int | None = None,
    ) -> None:
        self.settings = settings
        self.layers = watched_layers(settings, n_blocks)
        if hidden_size is not None:
            check_window_budget(settings, len(self.layers), hidden_size)
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.wire_dtype = getattr(torch, settings.wire_dtype)
        self.metrics = TapMetrics(registry)
        self.registry = self.metrics.registry
        self.recorder = TapRecorder(self.metrics, model_name)
        self.sampler = Sampler(settings.sample_rate, settings.max_samples_per_s, key=read_key(settings))
        self._new_instance()
        self.base_header: dict[str, Any] = {
            "schema": SCHEMA_VERSION, "model": model_name, "model_fingerprint": fingerprint,
            "layers": list(self.layers), "n_states": n_blocks + 1, "positions": settings.positions,
            **(header or {}),
        }
        factory: Callable[[], Transport] = (
            (lambda: transport) if transport is not None else (lambda: open_tap_transport(settings)))
        self.exporter = Exporter(
            factory, self.recorder,
            max_items=settings.queue_max_items, max_bytes=settings.queue_max_bytes,
            batch_size=settings.export_batch, max_payload_bytes=settings.max_payload_bytes,
            backoff_initial_s=settings.backoff_initial_s, backoff_max_s=settings.backoff_max_s,
            counters=self.tap_counters, owns_transport=transport is None,
            interval_s=settings.export_interval_s,
        )
        self.closed = False
        self._fork_hooks: list[Callable[[], None]] = []
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())
        self._metrics_server: Any = None
        if settings.metrics_port:
            self.serve_metrics(settings.metrics_port, settings.metrics_host)

    # ------------------------------------------------------------------------- sampling
    def decide(self, request_id: str, force: bool = False) -> str | None:
        """None when ``request_id`` is sampled (counted), else the skip reason (counted)."""
        reason = self.sampler.decide(request_id, force)
        if reason is None:
            self.recorder.sampled()
        else:
            self.skip(reason)
        return reason

    def count_sampled(self, n: int) -> None:
        """Count ``n`` sampled requests decided elsewhere (another process of the same server)."""
        self.recorder.sampled(n)

    def skip(self, reason: str) -> None:
        self.recorder.skipped(reason)

    def new_ids(self, n: int) -> list[str]:
        """``n`` fresh sample ids: a random per-process instance id plus a sequence number."""
        if self._pid != os.getpid():  # a fork that bypassed os.register_at_fork: ids must not collide
            self._after_fork_in_child()
        return [f"{self.instance}-{next(self._seq):x}" for _ in range(n)]

    # ------------------------------------------------------------------------- export
    def finish(
        self,
        sample_ids: list[str],
        request_ids: list[str],
        metadata: list[dict[str, Any]],
        steps: list[CapturedStep],
        *,
        events: list[Any],
        nbytes: int,
        started: float,
        drop_reason: str | None = None,
    ) -> None:
        """Offer one finished capture to the exporter (or count it dropped). Never raises."""
        try:
            if drop_reason is not None:
                self.recorder.dropped(drop_reason, len(sample_ids))
            elif steps:
                self.exporter.offer(CapturedRequest(
                    self.base_header, sample_ids, request_ids, metadata, steps, events, nbytes, started))
        except Exception:
            self.recorder.dropped("hook_error", len(sample_ids) or 1)

    def hook_failed(self) -> None:
        self.recorder.hook_error()

    # ------------------------------------------------------------------------- state
    @property
    def sampled(self) -> int:
        return self.recorder.stats.sampled

    @property
    def skipped(self) -> dict[str, int]:
        return self.recorder.stats.skipped

    @property
    def hook_errors(self) -> int:
        return self.recorder.stats.hook_errors

    def stats(self) -> dict[str, Any]:
        """Counters of this process's tap (the same numbers ride in every sample header)."""
        return {
            "model": self.model_name, "instance": self.instance, "sampled": self.sampled,
            "skipped": self.skipped, "hook_errors": self.hook_errors,
            "exported": self.exporter.exported, "drops": self.exporter.drops,
            "queue_depth": self.exporter.queue_depth, "queue_bytes": self.exporter.queued_bytes,
            "layers": list(self.layers),
        }

    def tap_counters(self) -> dict[str, Any]:
        return {
            "instance": self.instance, "pid": self._pid, "sampled": self.sampled,
            "skipped": self.skipped, "exported": self.exporter.exported, "drops": self.exporter.drops,
        }

    def serve_metrics(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve this tap's registry on ``http://addr:port/metrics`` (a bounded server: two handler
        threads, a 5 s deadline per request, idle connections cost no thread in the serving process)."""
        from monitor.httpserver import serve_registry

        self._metrics_server = serve_registry(self.registry, addr, port)

    def on_fork(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in a forked child after the core has reset itself."""
        self._fork_hooks.append(fn)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush within ``timeout`` and stop the exporter (and the metrics server). Idempotent."""
        if self.closed:
            return True
        self.closed = True
        ok = self.exporter.close(timeout)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        return ok

    def _new_instance(self) -> None:
        self.instance = uuid.uuid4().hex[:16]
        self._pid = os.getpid()
        self._seq = itertools.count()
        self.started = time.time()

    def _after_fork_in_child(self) -> None:
        # A forked worker is a new tap instance: fresh id, counters and locks.
        self._new_instance()
        self.recorder.stats.reset()
        self.sampler.after_fork()
        for fn in self._fork_hooks:
            fn()


def check_window_budget(settings: TapSettings, n_layers: int, hidden_size: int) -> None:
    """Refuse, at attach, window settings whose samples could never be published: the window
    means alone (``windows x layers x d`` in the wire dtype) past ``max_payload_bytes``."""
    if settings.windows == 0:
        return
    nbytes = settings.windows * n_layers * hidden_size * (2 if settings.wire_dtype == "float16" else 4)
    if nbytes > settings.max_payload_bytes:
        raise ConfigError(
            f"windows: {settings.windows} windows x {n_layers} states x {hidden_size} x {settings.wire_dtype} "
            f"are {nbytes} bytes per sample, more than max_payload_bytes ({settings.max_payload_bytes}): "
            "lower windows (or layers), or raise max_payload_bytes")


def open_tap_transport(settings: TapSettings) -> Transport:
    """The exporter's transport (called on the exporter thread). A Redis URL gets the tap's own
    short timeouts and the ``redis`` section's credentials and TLS files; redis is imported only
    then."""
    options: dict[str, Any] = {"stream": settings.stream, "maxlen": settings.stream_maxlen}
    if parse_url(settings.transport).kind == "redis":
        from monitor.backends.redis import Timeouts, connect

        t = settings.transport_timeout_s
        options.update(socket_timeout=t, connect_timeout=t,
                       client=connect(settings.transport, Timeouts(connect_s=t, command_s=t), settings.redis))
    return open_transport(settings.transport, **options)
