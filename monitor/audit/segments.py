"""Trail layout on disk: segment files, lines with their exact location, the writer lock.

A trail is one folder per writer::

    <directory>/<writer_id>/
        segment-000000000001.jsonl    records 1 .. ; the name is the first record's seq
        segment-000000000734.jsonl    every segment starts with a checkpoint record
        HEAD.json                     the head, when head_store is "file"
        LOCK                          flock()ed by the one writer; says who holds it
        quarantine/                   torn tails moved aside at start-up
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.audit.records import RecordFormatError, parse_and_hash
from monitor.errors import AuditError, AuditIntegrityError, AuditLockedError

SEGMENT_RE = re.compile(r"^segment-(\d{12,})\.jsonl$")
LOCK_FILE = "LOCK"
QUARANTINE_DIR = "quarantine"


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has ``first_seq``."""
    return f"segment-{first_seq:012d}.jsonl"


def segment_first_seq(name: str) -> int:
    """The first seq a segment's file name promises."""
    m = SEGMENT_RE.match(name)
    if m is None:
        raise ValueError(f"not a segment file name: {name}")
    return int(m.group(1))


def list_segments(trail: Path) -> list[Path]:
    """The segment files of a trail, oldest first."""
    try:
        names = [p for p in trail.iterdir() if SEGMENT_RE.match(p.name) and p.is_file()]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda p: segment_first_seq(p.name))


def is_trail(path: Path) -> bool:
    """Whether ``path`` is a trail folder (has segments, a head file or a lock)."""
    if not path.is_dir():
        return False
    return bool(list_segments(path)) or (path / "HEAD.json").exists() or (path / LOCK_FILE).exists()


def discover_trails(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Trail folders named by ``paths``: each is a trail or a root holding trails (one level)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise AuditError(f"{path}: no such file or directory")
        if path.is_file() and SEGMENT_RE.match(path.name):
            path = path.parent
        if is_trail(path):
            found.append(path)
            continue
        subs = sorted(p for p in path.iterdir() if is_trail(p)) if path.is_dir() else []
        if not subs:
            raise AuditError(f"{path}: no audit trail here (expected segment-*.jsonl files, or folders of them)")
        found.extend(subs)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


@dataclass(frozen=True)
class Line:
    """One line of a segment: 1-based number, byte offset, content without the newline."""

    number: int
    offset: int
    data: bytes
    terminated: bool


def split_lines(data: bytes) -> list[Line]:
    """Split segment bytes into lines; a last line without ``\\n`` has ``terminated=False``."""
    lines: list[Line] = []
    offset = 0
    number = 1
    size = len(data)
    while offset < size:
        end = data.find(b"\n", offset)
        if end < 0:
            lines.append(Line(number, offset, data[offset:], False))
            break
        lines.append(Line(number, offset, data[offset:end], True))
        offset = end + 1
        number += 1
    return lines


def _parses(line: Line) -> bool:
    if not line.terminated:
        return False
    try:
        return isinstance(json.loads(line.data), dict)
    except ValueError:
        return False


def torn_suffix_start(lines: list[Line]) -> int:
    """Index of the first line of the torn tail: the longest run of lines at the end that are
    unterminated or not JSON objects at all (what a crash leaves: a partial write, zero-filled
    blocks). ``len(lines)`` when there is none. A line that parses but fails its hash is never
    torn: that is an edit, not a crash."""
    i = len(lines)
    while i > 0 and not _parses(lines[i - 1]):
        i -= 1
    return i


def fsync_dir(path: Path) -> None:
    """fsync a directory so created, renamed or removed entries are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrailLock:
    """An exclusive ``flock`` on ``<trail>/LOCK`` held for the writer's lifetime.

    ``flock`` locks belong to the open file, so a second writer in another process *or* in the
    same process fails at once, and the lock is released by the kernel if the holder dies.
    (``flock`` is not reliable on NFS; keep trails on local or block storage.)"""

    def __init__(self, trail: Path, writer_id: str) -> None:
        self.path = trail / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown holder"
            finally:
                os.close(fd)
            raise AuditLockedError(
                f"audit trail {trail} is already being written ({holder}). Only one writer may write a "
                "trail: give each sidecar replica its own writer_id, or stop the other writer first."
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        info = f"writer {writer_id!r}, pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        os.pwrite(fd, info.encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the file releases the flock


def iter_segment_lines(path: Path) -> Iterator[Line]:
    """Lines of one segment file."""
    yield from split_lines(path.read_bytes())


def quarantine_tail(trail_dir: Path, seg: Path, data: bytes, offset: int, *, whole: bool, now: float) -> dict[str, Any]:
    """Move a torn tail (``data[offset:]``) of ``seg`` to the quarantine folder, fsynced, and cut the
    segment there (or remove it when ``whole``); returns what the recovery record says."""
    qdir = trail_dir / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    tail = data[offset:]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    target = qdir / f"{seg.stem}.offset-{offset}.{stamp}.torn"
    n = 1
    while target.exists():
        target = qdir / f"{seg.stem}.offset-{offset}.{stamp}.{n}.torn"
        n += 1
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(tail)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:  # disk still full: leave no partial copy behind; the caller retries later
        target.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(qdir)
    if whole:
        seg.unlink()
    else:
        fd = os.open(seg, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(trail_dir)
    return {"segment": seg.name, "offset": offset, "bytes": len(tail), "sha256": hashlib.sha256(tail).hexdigest(),
            "quarantined_to": f"{QUARANTINE_DIR}/{target.name}", "segment_removed": whole}


def recover_tail(trail_dir: Path, writer_id: str, *, now: float) -> tuple[dict[str, Any] | None, str | None, list[dict[str, Any]]]:
    """Start-up recovery of a trail: quarantine torn tails (newest segments first) and return the
    newest intact record, its segment name, and what was quarantined. AuditIntegrityError when
    the newest record is damaged, edited, or another writer's."""
    segments = list_segments(trail_dir)
    quarantined: list[dict[str, Any]] = []
    last: dict[str, Any] | None = None
    last_segment: str | None = None
    while segments:
        seg = segments[-1]
        data = seg.read_bytes()
        lines = split_lines(data)
        start = torn_suffix_start(lines)
        if start < len(lines) or not lines:
            offset = lines[start].offset if lines else 0
            quarantined.append(quarantine_tail(trail_dir, seg, data, offset, whole=start == 0, now=now))
            if start == 0:
                segments.pop()
                continue
        line = lines[start - 1]
        try:
            rec, digest = parse_and_hash(line.data)
        except RecordFormatError as exc:
            raise AuditIntegrityError(
                f"{seg} line {line.number}: the newest record is damaged ({exc.reason}); the trail was "
                "modified. Run `layerwatch audit verify`; to start afresh, use a new directory.") from exc
        if digest != rec["hash"]:
            raise AuditIntegrityError(
                f"{seg} line {line.number}: the newest record does not match its hash (edited after it was "
                "written). Run `layerwatch audit verify`; to start afresh, use a new directory.")
        if rec["writer"] != writer_id:
            raise AuditIntegrityError(f"{trail_dir} holds the trail of writer {rec['writer']!r}, not {writer_id!r}")
        last, last_segment = rec, seg.name
        break
    return last, last_segment, quarantined
