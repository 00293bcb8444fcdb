"""The trail's head kept outside its segments, so ``verify`` can see a cut tail.

A hash chain alone cannot show that its newest records were removed. After every fsync the
writer publishes the head, ``(writer, seq, hash, segment, ts)`` of the last durable record,
signed with the trail's HMAC key when it has one, to a :class:`HeadStore`. The head is only ever
published *after* the fsync that covers it, so ``head.seq <= last durable seq`` always holds on a
healthy trail; ``verify`` reads a head beyond the records it finds as lost records (cut tail,
dropped newest segment), and an unterminated tail *not* covered by the head as a torn write.

Stores: :class:`FileHeadStore` (a JSON file replaced atomically; the default, in the trail
folder: catches accidents such as a lost segment or a truncated copy) and
:class:`RedisHeadStore` (a key per writer; keeps the head away from whoever can edit the files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from monitor.audit.records import KeyRing, canonical_json
from monitor.errors import AuditError, AuditIntegrityError
from monitor.urls import is_backend_url, parse_url, strip_credentials

HEAD_FILE = "HEAD.json"

log = logging.getLogger("monitor.audit.writer")


@dataclass(frozen=True)
class Head:
    """The last durable record of a trail, as published outside it."""

    writer: str
    seq: int
    hash: str
    segment: str
    ts: str
    hmac: str | None = None

    def _body(self) -> str:
        return canonical_json({k: v for k, v in asdict(self).items() if k != "hmac"})

    def signed(self, keys: KeyRing | None) -> Head:
        """This head with its ``hmac`` set (unchanged when there is no key)."""
        if not keys:
            return self
        digest = hashlib.sha256(self._body().encode("ascii")).hexdigest()
        return Head(self.writer, self.seq, self.hash, self.segment, self.ts, keys.sign(digest))

    def check_signature(self, keys: KeyRing) -> str | None:
        """None when the signature is valid for ``keys``, else why not."""
        if self.hmac is None:
            return "the head is not signed"
        return keys.check(hashlib.sha256(self._body().encode("ascii")).hexdigest(), self.hmac)

    def to_json(self) -> str:
        """The head as canonical JSON."""
        return canonical_json({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str | bytes) -> Head:
        """Parse a head; raises AuditIntegrityError when it is not one (a damaged head)."""
        try:
            obj: Any = json.loads(text)
            head = cls(writer=obj["writer"], seq=obj["seq"], hash=obj["hash"], segment=obj["segment"],
                       ts=obj["ts"], hmac=obj.get("hmac"))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditIntegrityError(f"unreadable audit head: {exc}") from exc
        if type(head.seq) is not int or not isinstance(head.hash, str) or not isinstance(head.segment, str):
            raise AuditIntegrityError("unreadable audit head: bad seq, hash or segment")
        return head


@runtime_checkable
class HeadStore(Protocol):
    """Keeps each writer's head. ``publish`` is called by the writer after every fsync."""

    def publish(self, head: Head) -> None:
        """Store ``head`` as the writer's latest; raises AuditError when the backend fails."""

    def load(self, writer: str) -> Head | None:
        """The stored head of ``writer``, or None when there is none. Raises AuditIntegrityError
        when the stored head is damaged, AuditError when the backend cannot be reached."""

    def describe(self) -> str:
        """Where the heads live, without credentials (written into checkpoint records)."""

    def close(self) -> None:
        """Release connections."""


class FileHeadStore:
    """Heads as JSON files: ``path`` is the file itself, or with ``per_writer`` a folder of
    ``<writer>.head.json`` files. Each publish writes a temporary file, fsyncs it and renames it
    over the old one, so a crash leaves the old or the new head, never a torn one."""

    def __init__(self, path: str | os.PathLike[str], *, per_writer: bool = False, spec: str | None = None) -> None:
        self.path = Path(path)
        self.per_writer = per_writer
        self._spec = spec or ("file" if not per_writer else f"file:{self.path}")

    def _file(self, writer: str) -> Path:
        return self.path / f"{writer}.head.json" if self.per_writer else self.path

    def publish(self, head: Head) -> None:
        """Atomically replace the head file."""
        target = self._file(head.writer)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".head-", dir=target.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(head.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise AuditError(f"cannot write the audit head {target}: {exc.strerror or exc}") from exc

    def load(self, writer: str) -> Head | None:
        """Read the head file; None when it does not exist."""
        target = self._file(writer)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"cannot read the audit head {target}: {exc.strerror or exc}") from exc
        head = Head.from_json(data)
        if head.writer != writer:
            raise AuditIntegrityError(f"the audit head {target} belongs to writer {head.writer!r}, not {writer!r}")
        return head

    def describe(self) -> str:
        """``file`` (inside the trail) or ``file:DIR``."""
        return self._spec

    def close(self) -> None:
        """Nothing to release."""


class RedisHeadStore:
    """Heads in Redis, one string key per writer: ``key_prefix + writer`` holding the head JSON.

    Connections and timeouts are the process's (:mod:`monitor.backends.redis`): a Redis outage
    makes ``publish`` fail fast (the writer counts and logs it and keeps writing; the head then
    lags, which verification reads as a healthy trail)."""

    def __init__(self, url: str, *, key_prefix: str = "layerwatch:audit:head:", client: Any = None) -> None:
        from monitor.backends.redis import connect

        self.url = url
        self.key_prefix = key_prefix
        self._client = client if client is not None else connect(url)

    def key(self, writer: str) -> str:
        """The Redis key of ``writer``'s head."""
        return self.key_prefix + writer

    def publish(self, head: Head) -> None:
        """SET the writer's key."""
        from monitor.backends.redis import mapped_errors

        with mapped_errors(AuditError, f"cannot publish the audit head to {self.describe()}"):
            self._client.set(self.key(head.writer), head.to_json())

    def load(self, writer: str) -> Head | None:
        """GET the writer's key."""
        from monitor.backends.redis import mapped_errors

        with mapped_errors(AuditError, f"cannot read the audit head from {self.describe()}"):
            raw = self._client.get(self.key(writer))
        if raw is None:
            return None
        return Head.from_json(raw)

    def describe(self) -> str:
        """The URL without credentials, and the key prefix."""
        return f"{strip_credentials(self.url)} prefix {self.key_prefix}"

    def close(self) -> None:
        """Nothing to release: the pool is the process's (:mod:`monitor.backends.redis`)."""


def head_store_from_spec(spec: str, trail_dir: Path, *, key_prefix: str = "layerwatch:audit:head:",
                         client: Any = None) -> HeadStore | None:
    """Build the store an :class:`~monitor.audit.config.AuditConfig` ``head_store`` names
    (``client``: a Redis client of the composition root's backend, for a Redis spec)."""
    if spec == "none":
        return None
    if spec == "file":
        return FileHeadStore(trail_dir / HEAD_FILE)
    if spec.startswith("file:"):
        return FileHeadStore(Path(spec[5:]), per_writer=True)
    if is_backend_url(spec) and parse_url(spec, field="audit.head_store").kind == "redis":
        return RedisHeadStore(spec, key_prefix=key_prefix, client=client)
    raise AuditError(f"unknown head store {spec!r}: use 'file', 'file:DIR', 'redis://...' or 'none'")


class HeadPublisher:
    """Publishes the newest head on its own thread, so a sync waits for the fsync only, never
    for Redis or the head file. Latest wins: a head superseded before it was sent is skipped.
    The head lags the file by at most one publish, which verification reads as healthy."""

    def __init__(self, store: HeadStore, name: str) -> None:
        self._store = store
        self.errors = 0  # heads the store did not take
        self._failing = False
        self._cv = threading.Condition()
        self._pending: Head | None = None
        self._busy = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, head: Head) -> None:
        with self._cv:
            self._pending = head
            self._cv.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until the newest submitted head is published (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._cv.wait(left)
        return True

    def stop(self, *, flush: bool, timeout: float = 5.0) -> None:
        if flush:
            self.flush(timeout)
        with self._cv:
            self._stopped = True
            self._pending = None
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                head, self._pending, self._busy = self._pending, None, True
            try:
                assert head is not None
                self._store.publish(head)
            except Exception as exc:  # noqa: BLE001 - counted and logged, never raised into the writer
                self.errors += 1
                if not self._failing:
                    log.warning("audit head not published (%s); records stay durable, cut-tail detection lags", exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("audit head published again to %s", self._store.describe())
                self._failing = False
            with self._cv:
                self._busy = False
                self._cv.notify_all()


def head_loss(head: Head | None, seq: int, hash_: str) -> dict[str, Any] | None:
    """What a head kept outside the trail says about a trail that ends at ``seq``/``hash_``: a lost
    tail (the head is ahead), a mismatch (same seq, another hash), or nothing (None)."""
    lost: dict[str, Any] | None = None
    if head is not None and head.seq > seq:
        lost = {"reason": "tail_lost", "from_seq": seq + 1, "to_seq": head.seq,
                "head": {"seq": head.seq, "hash": head.hash, "segment": head.segment, "ts": head.ts},
                "detail": f"the head said seq {head.seq} was durable but the trail ends at seq {seq}"}
    elif head is not None and head.seq == seq and head.hash != hash_:
        lost = {"reason": "head_mismatch", "from_seq": head.seq, "to_seq": head.seq,
                "head": {"seq": head.seq, "hash": head.hash, "segment": head.segment, "ts": head.ts},
                "detail": f"the head's hash for seq {head.seq} differs from the record in the trail"}
    return lost
