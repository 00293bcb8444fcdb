"""A full disk under the real sidecar process (issue 17, Why 4 and "Must show").

The sidecar (``tests/sidecar_worker.py``, a separate process on the real Redis) writes its audit
trail to a small tmpfs. The test fills that filesystem, sends samples, and checks: nothing is
acknowledged while nothing can be made durable, ``/readyz`` is 503 at once and ``/healthz`` 503
after ``audit.unhealthy_after_s``; once space returns the sidecar processes again on its own and
every sample is in the trail exactly once, which still verifies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.audit import RedisHeadStore, verify_trail
from monitor.audit.segments import list_segments
from monitor.transport import open_transport
from tests.test_audit_faults import fill, tmpfs
from tests.test_sidecar import publish_samples

WORKER = Path(__file__).with_name("sidecar_worker.py")
pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]
BOUND_S = 5.0  # audit.unhealthy_after_s of the worker


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root to mount; skipped otherwise)."""
    with tmpfs(tmp_path / "disk", "2m") as mnt:
        yield mnt


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sample_records(trail_root: Path) -> list[dict[str, Any]]:
    out = []
    for trail in sorted(p for p in trail_root.iterdir() if p.is_dir()):
        for seg in list_segments(trail):
            out += [r for r in map(json.loads, seg.read_text().splitlines()) if r["kind"] == "sample"]
    return out


class FullFilesystem:
    """The trail's filesystem runs full (a real tmpfs filled by a file) until ``heal()``."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.filler: Path | None = None
        self.env: dict[str, str] = {}

    def break_(self) -> None:
        self.filler = fill(self.disk)

    def heal(self) -> None:
        assert self.filler is not None
        self.filler.unlink()


class FailingFsync:
    """Every fsync of the trail fails with EIO (injected in the worker) until ``heal()``."""

    def __init__(self, disk: Path) -> None:
        self.flag = disk.parent / "fsync-fails"
        self.env = {"LW_TEST_FSYNC_FAILS_WHILE": str(self.flag)}

    def break_(self) -> None:
        self.flag.touch()

    def heal(self) -> None:
        self.flag.unlink()


@pytest.fixture(params=["full_filesystem", "failing_fsync"])
def fault(request: pytest.FixtureRequest, tmp_path: Path) -> FullFilesystem | FailingFsync:
    if request.param == "full_filesystem":
        return FullFilesystem(request.getfixturevalue("small_disk"))
    (tmp_path / "disk").mkdir()
    return FailingFsync(tmp_path / "disk")


def test_a_full_disk_under_the_sidecar_process_loses_nothing_and_it_resumes_on_its_own(
        redis_url: str, stream_name: str, fault: FullFilesystem | FailingFsync) -> None:
    """Disk full (or fsync failing): entries stay pending (none acked), /readyz 503 at once,
    /healthz 503 after the bound; the disk back: the same process audits everything, each sample
    exactly once, /healthz 200, and the trail (and its head) verifies."""
    audit = fault.disk / "audit" if isinstance(fault, FullFilesystem) else fault.flag.parent / "audit"
    head_prefix = f"{stream_name}:audit-head:"  # deleted with the stream; no head of an earlier run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAYERWATCH_AUDIT__UNHEALTHY_AFTER_S": str(BOUND_S),
           "LAYERWATCH_AUDIT__RECOVER_INTERVAL_S": "0.2", "LAYERWATCH_AUDIT__HEAD_KEY_PREFIX": head_prefix, **fault.env}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--transport", redis_url, "--stream", stream_name,
                             "--consumer", "a", "--audit", str(audit)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    t = open_transport(redis_url, stream=stream_name)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"worker did not start: {line!r}"
        port = int(line.split()[1])

        before = publish_samples(redis_url, stream_name, 10, seed=1)
        wait_for(lambda: len(sample_records(audit)) == 10 and t.stats("g").pending == 0, 60, "the first samples")

        fault.break_()
        during = publish_samples(redis_url, stream_name, 12, seed=2)
        wait_for(lambda: get(port, "/readyz")[0] == 503, 30, "/readyz 503 while the trail cannot be written")
        status, health = get(port, "/healthz")
        assert health["audit"]["writable"] is False
        assert (status == 200) == (health["audit"]["failing_for_s"] < BOUND_S)  # live until the bound
        wait_for(lambda: get(port, "/healthz")[0] == 503, 30, "/healthz 503 after audit.unhealthy_after_s")
        stats = t.stats("g")
        if isinstance(fault, FailingFsync):  # nothing can be made durable, so nothing is acked
            assert stats.pending + stats.lag == len(during)
        else:  # a record may still fit in the last page of the segment; the rest stays pending
            assert stats.pending + stats.lag > 0
        # (an entry acked for a record later discarded would never come back: the exactly-once
        # check at the end would miss its sample)
        assert proc.poll() is None

        fault.heal()  # the disk works again; no restart
        wait_for(lambda: t.stats("g").pending == 0 and t.stats("g").lag == 0
                 and len({r["sample_id"] for r in sample_records(audit)}) == 22, 90, "every sample audited")
        assert get(port, "/healthz")[0] == 200
        wait_for(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 again")
        assert [(d.reason, d.detail) for d in t.dead_letters()] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        t.close()
    counts = Counter(r["sample_id"] for r in sample_records(audit))
    assert set(counts) == set(before) | set(during)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    report = verify_trail(audit / "a", head_store=RedisHeadStore(redis_url, key_prefix=head_prefix))
    assert report.status == "intact", report.first_break
    assert any("recovered from a failed write" in n for n in report.notes)
    assert report.head.endswith(")") and "matches" in report.head
