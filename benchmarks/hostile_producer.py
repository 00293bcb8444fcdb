"""Hostile producer: two sidecar replicas fed one malformed or hostile entry per four good samples.

    python -m benchmarks.hostile_producer [--good-per-hostile 4] [--rounds 1] [--redis URL] [--huge-mb 100]

Real Redis, two replicas as separate processes (``tests/sidecar_worker.py``: the tiny seeded
Llama's logit lens, the real audit writer, one trail each), good samples captured by the real tap
on the same model. Every hostile class of :func:`hostile_entries` (deep JSON, NaN/Infinity
anywhere, empty/huge/control-character ids, declared shape vs payload, a 100 MB entry, non-UTF-8,
duplicate ids, another model's fingerprint, ...) is published ``--rounds`` times, each followed
by ``--good-per-hostile`` good samples. Entries that reuse an audited sample's id are published in
a second phase, after the samples they copy are audited (a replay racing its original on the
other replica is audited by both: the ledger is checked before, and marked after, the fsync).

Checks what issue 17 asks and reports it: every hostile entry dead-lettered with its reason,
every good sample audited exactly once (both trails read), both replicas ready throughout
(``/readyz`` polled), peak RSS (``VmHWM``) per replica. Then :func:`run_crashing`: a message that
kills whichever replica reads it, replicas restarted as an orchestrator would, until Redis's
delivery count passes ``max_deliveries``. Prints a table, writes JSON to
``bench-results/hostile_producer.json``. ``tests/test_hostile_producer.py`` runs both.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "sidecar_worker.py"
RSS_BOUND_MB = 1200.0
MAX_CLASSES = 40  # good samples are captured for up to this many hostile classes per round


def _split(good: bytes) -> tuple[dict[str, Any], bytes]:
    hlen = struct.unpack_from("<I", good, 4)[0]
    return json.loads(good[8:8 + hlen]), good[8 + hlen:]


def _raw(header: bytes, payload: bytes) -> bytes:
    return b"LWS1" + struct.pack("<I", len(header)) + header + payload


def _with(good: bytes, payload: bytes | None = None, **changes: Any) -> bytes:
    """``good`` with header fields replaced (None removes one); json.dumps writes NaN as NaN, as a
    careless producer's would."""
    hdr, body = _split(good)
    for k, v in changes.items():
        if v is None:
            hdr.pop(k, None)
        else:
            hdr[k] = v
    return _raw(json.dumps(hdr).encode(), body if payload is None else payload)


def hostile_entries(good: bytes, tag: str, huge_mb: int) -> list[tuple[str, str, bytes]]:
    """(class, expected dead-letter reason, bytes) of every hostile class, ids unique per ``tag``."""
    import numpy as np

    hdr, body = _split(good)
    sid = lambda name: f"hostile-{tag}-{name}"  # noqa: E731
    nan_body = np.full(len(body) // 2, np.nan, dtype="<f2").tobytes()
    deep_meta: Any = 1
    for _ in range(12):
        deep_meta = {"k": deep_meta}
    return [
        ("deep_json_50k", "too_deep", _raw(b"[" * 50_000, b"")),
        ("deep_metadata", "too_deep", _with(good, sample_id=sid("deep"), metadata=deep_meta)),
        ("nan_metadata", "non_finite", _with(good, sample_id=sid("nan-meta"), metadata={"t": float("nan")})),
        ("inf_created_at", "non_finite", _with(good, sample_id=sid("inf-time"), created_at=float("inf"))),
        ("nan_final_topk", "non_finite", _with(good, sample_id=sid("nan-topk"),
                                               final_topk={"ids": [[1]], "logprobs": [[float("nan")]]})),
        ("nan_hidden_states", "non_finite", _with(good, nan_body, sample_id=sid("nan-hidden"))),
        ("empty_sample_id", "bad_id", _with(good, sample_id="")),
        ("huge_sample_id", "bad_id", _with(good, sample_id="x" * 20_000)),
        ("control_chars_in_request_id", "bad_id", _with(good, sample_id=sid("ctl"), request_id="r\x1b[2J\x07")),
        ("declared_shape_vs_payload", "shape_mismatch", _with(good, sample_id=sid("shape"),
                                                              shape=[hdr["shape"][0], 1, hdr["shape"][2] * 2])),
        ("truncated_payload", "shape_mismatch", _with(good, body[: len(body) // 2], sample_id=sid("trunc"))),
        ("hidden_size_vs_bundle", "shape_mismatch", _with(good, body[: len(body) // 2], sample_id=sid("hsize"),
                                                          shape=[hdr["shape"][0], 1, hdr["shape"][2] // 2])),
        (f"huge_entry_{huge_mb}mb", "oversized", good + b"\x00" * (huge_mb * 1024 * 1024)),
        ("non_utf8_header", "not_utf8", _raw(b'{"schema":1,"sample_id":"\xff\xfe"}', body)),
        ("lone_surrogate", "not_utf8", _raw(json.dumps({**hdr, "sample_id": sid("sur"), "request_id": "\ud800"},
                                                       ensure_ascii=True).encode(), body)),
        ("other_model_fingerprint", "fingerprint", _with(good, sample_id=sid("fp"), model_fingerprint="sha256:" + "0" * 64)),
        ("wrong_dtype", "dtype", _with(good, sample_id=sid("dtype"), dtype="int8")),
        ("missing_fields", "missing_field", _with(good, sample_id=sid("missing"), layers=None)),
        ("wrong_schema_version", "schema_version", _with(good, sample_id=sid("schema"), schema=2)),
        ("unknown_layers", "unknown_layer", _with(good, sample_id=sid("layers"), n_states=40,
                                                  layers=list(range(30, 30 + hdr["shape"][0])))),
        ("not_a_sample", "undecodable", b"GET / HTTP/1.1\r\n\r\n"),
        ("integer_past_digit_limit", "undecodable", _raw(b'{"schema":1,"n":' + b"9" * 5000 + b"}", body)),
        ("wrong_field_types", "bad_field", _with(good, sample_id=sid("types"), layers=["0", "1", "2"])),
        ("nested_metadata_value", "bad_field", _with(good, sample_id=sid("meta"), metadata={"k": [1, 2]})),
    ]


def replay_entries(audited: list[bytes], tag: str) -> list[tuple[str, str, bytes]]:
    """Entries reusing audited samples' ids: another payload (dead-lettered), the same bytes (a
    harmless re-delivery: acked as a duplicate, ``"-"`` as its reason)."""
    first_id = _split(audited[0])[0]["sample_id"]
    return [("duplicate_id_other_bytes", "duplicate_id", _with(audited[0], sample_id=first_id, request_id=f"evil-{tag}")),
            ("exact_replay", "-", audited[1])]


def capture_good(n: int, seed: int = 0) -> list[bytes]:
    """``n`` real samples of the tiny seeded Llama, captured by the tap."""
    import torch

    import monitor
    from monitor.transport import MemoryTransport
    from tests.conftest import make_tiny

    model = make_tiny("llama", seed=0)  # the workers' lens reads the same weights (fingerprint)
    url = f"memory://hostile-{uuid.uuid4().hex}"
    t = MemoryTransport(url, maxlen=n + 10)
    t.ensure_group("c")
    tap = monitor.attach(model, sample_rate=1.0, transport=url, queue_max_items=n + 10)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        with tap.request(f"req-{seed}-{i}"), torch.no_grad():
            model(input_ids=torch.randint(0, 128, (1, 5), generator=gen))
    assert tap.flush(30)
    tap.close()
    tap.detach()
    out = [e.data for e in t.read("c", "c", n + 10, 0)]
    t.close()
    return out


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[str]
    port: int
    not_ready: int = 0
    polls: int = 0
    peak_rss_mb: float = 0.0
    why: list[str] = field(default_factory=list)  # the answers of the polls that were not ready


def start_replica(url: str, stream: str, name: str, audit: Path, *extra: str) -> Replica:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(WORKER), "--transport", url, "--stream", stream, "--consumer", name,
                             "--audit", str(audit), "--claim-idle-ms", "5000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        raise RuntimeError(f"replica {name} did not start: {line!r}")
    return Replica(name, proc, int(line.split()[1]))


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the process's peak resident set
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _watch(replicas: list[Replica], stop: threading.Event) -> None:
    while not stop.is_set():
        for r in replicas:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{r.port}/readyz", timeout=5)
            except urllib.error.HTTPError as exc:
                r.not_ready += 1
                r.why.append(exc.read().decode(errors="replace")[:300])
            except (urllib.error.URLError, OSError) as exc:
                r.not_ready += 1
                r.why.append(repr(exc)[:300])
            r.polls += 1
            r.peak_rss_mb = max(r.peak_rss_mb, _peak_rss_mb(r.proc.pid))
        stop.wait(0.2)


def audit_samples(root: Path) -> Counter[str]:
    """Sample ids of every sample record in every trail under ``root``."""
    ids: Counter[str] = Counter()
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in (".jsonl", ".log", ""):
            for line in p.read_bytes().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("kind") == "sample":
                    ids[rec["sample_id"]] += 1
    return ids


@dataclass
class Result:
    """What one run did and measured."""

    good: int = 0
    hostile: int = 0
    seconds: float = 0.0
    entries_per_s: float = 0.0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)
    wrong_reason: list[str] = field(default_factory=list)  # "class: expected -> got"
    not_dead_lettered: list[str] = field(default_factory=list)
    good_audited_not_once: dict[str, int] = field(default_factory=dict)
    hostile_audited: list[str] = field(default_factory=list)
    not_ready_polls: dict[str, int] = field(default_factory=dict)
    not_ready_answers: dict[str, list[str]] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    pending_left: int = 0


def _drain(t: Any, want_audited: set[str], audit: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = t.stats("g")
        if st.lag == 0 and st.pending == 0 and want_audited <= set(audit_samples(audit)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"not drained within {timeout} s: {t.stats('g')}")


def run(url: str, stream: str, workdir: Path, *, good_per_hostile: int = 4, rounds: int = 1,
        huge_mb: int = 100, timeout: float = 120.0) -> Result:
    """Publish the hostile classes with good samples between them to two replicas; check and measure."""
    from monitor.transport import open_transport

    goods = capture_good((MAX_CLASSES + 2) * rounds * good_per_hostile + 2, seed=1)
    t = open_transport(url, stream=stream, maxlen=1_000_000, socket_timeout=60.0)  # publishes the huge entry
    t.ensure_group("g")
    audit = workdir / "audit"
    replicas = [start_replica(url, stream, name, audit) for name in ("replica-a", "replica-b")]
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(replicas, stop), daemon=True)
    watcher.start()
    expected: dict[str, tuple[str, str]] = {}  # stream id -> (class, reason)
    good_ids: list[str] = []
    res = Result()
    try:
        t0 = time.monotonic()
        it = iter(goods)
        for r in range(rounds):
            for name, reason, data in hostile_entries(goods[0], f"{r}", huge_mb):
                (eid,) = t.publish([data])
                expected[eid] = (name, reason)
                batch = [next(it) for _ in range(good_per_hostile)]
                t.publish(batch)
                good_ids += [_split(g)[0]["sample_id"] for g in batch]
        _drain(t, set(good_ids), audit, timeout)
        audited = [g for g in goods if _split(g)[0]["sample_id"] in set(good_ids)]
        for r in range(rounds):  # phase 2: ids of samples already audited
            for name, reason, data in replay_entries(audited[2 * r:], f"{r}"):
                (eid,) = t.publish([data])
                expected[eid] = (name, reason)
                batch = [next(it) for _ in range(good_per_hostile)]
                t.publish(batch)
                good_ids += [_split(g)[0]["sample_id"] for g in batch]
        _drain(t, set(good_ids), audit, timeout)
        res.seconds = time.monotonic() - t0
    finally:
        stop.set()
        watcher.join()
        for rep in replicas:
            rep.proc.terminate()
        for rep in replicas:
            rep.proc.wait(timeout=30)
    dead = t.dead_letters(count=10_000)
    got = {d.original_id: d.reason for d in dead}
    res.good, res.hostile = len(good_ids), len(expected)
    res.entries_per_s = (res.good + res.hostile) / res.seconds
    res.dead_letters_by_reason = dict(sorted(Counter(d.reason for d in dead).items()))
    for eid, (name, reason) in expected.items():
        if reason == "-":
            if eid in got:
                res.wrong_reason.append(f"{name}: - -> {got[eid]}")
        elif eid not in got:
            res.not_dead_lettered.append(name)
        elif got[eid] != reason:
            res.wrong_reason.append(f"{name}: {reason} -> {got[eid]}")
    seen = audit_samples(audit)
    res.good_audited_not_once = {s: seen.get(s, 0) for s in good_ids if seen.get(s, 0) != 1}
    res.hostile_audited = sorted(s for s in seen if s.startswith("hostile-"))
    res.not_ready_polls = {r.name: r.not_ready for r in replicas}
    res.not_ready_answers = {r.name: r.why[:5] for r in replicas if r.why}
    res.peak_rss_mb = {r.name: round(r.peak_rss_mb, 1) for r in replicas}
    res.pending_left = t.stats("g").pending
    t.close()
    return res


@dataclass
class CrashResult:
    """What a message that kills its replica led to."""

    crashes: int = 0
    dead_letters: list[tuple[str, int]] = field(default_factory=list)  # (reason, deliveries)
    good_audited: dict[str, int] = field(default_factory=dict)
    pending_left: int = 0


def run_crashing(url: str, stream: str, workdir: Path, *, max_deliveries: int = 3, timeout: float = 150.0) -> CrashResult:
    """A message that kills whichever replica reads it (``os._exit`` in the lens bank's place)
    among good samples, two replicas restarted as an orchestrator would: it is dead-lettered as
    ``max_deliveries`` after ``max_deliveries`` crashes and its batch-mates are audited once."""
    from monitor.transport import open_transport

    goods = capture_good(8, seed=2)
    poison = _with(goods[0], sample_id="hostile-kills-replicas", request_id="kill-the-replica")
    t = open_transport(url, stream=stream, maxlen=10_000)
    t.ensure_group("g")
    t.publish(goods[:3] + [poison] + goods[3:])
    audit = workdir / "audit"
    extra = ("--crash-on-request-id", "kill-the-replica", "--max-deliveries", str(max_deliveries),
             "--claim-idle-ms", "600")
    replicas = {n: start_replica(url, stream, n, audit, *extra) for n in ("replica-a", "replica-b")}
    res = CrashResult()
    good_ids = {_split(g)[0]["sample_id"] for g in goods}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, rep in list(replicas.items()):
                if rep.proc.poll() is not None:  # the orchestrator restarts it
                    res.crashes += 1
                    replicas[name] = start_replica(url, stream, name, audit, *extra)
            st = t.stats("g")
            if st.lag == 0 and st.pending == 0 and good_ids <= set(audit_samples(audit)):
                break
            time.sleep(0.2)
    finally:
        for rep in replicas.values():
            rep.proc.terminate()
        for rep in replicas.values():
            rep.proc.wait(timeout=30)
    res.dead_letters = [(d.reason, d.deliveries) for d in t.dead_letters()]
    seen = audit_samples(audit)
    res.good_audited = {s: seen.get(s, 0) for s in sorted(good_ids)}
    res.pending_left = t.stats("g").pending
    t.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default=os.environ.get("LAYERWATCH_TEST_REDIS", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--good-per-hostile", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--huge-mb", type=int, default=100)
    ap.add_argument("--out", default="bench-results/hostile_producer.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    stream = f"lwbench:hostile:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = run(args.redis, stream, Path(tmp) / "hostile", good_per_hostile=args.good_per_hostile,
                      rounds=args.rounds, huge_mb=args.huge_mb, timeout=600)
            crash = run_crashing(args.redis, stream + ":crash", Path(tmp) / "crash", max_deliveries=3)
        finally:
            import redis

            r = redis.Redis.from_url(args.redis)
            keys = list(r.scan_iter(match=stream + "*"))
            if keys:
                r.delete(*keys)
    crash_ok = crash.dead_letters == [("max_deliveries", 4)] and set(crash.good_audited.values()) == {1}
    ok = (not res.wrong_reason and not res.not_dead_lettered and not res.good_audited_not_once
          and not res.hostile_audited and not any(res.not_ready_polls.values())
          and all(v < RSS_BOUND_MB for v in res.peak_rss_mb.values()) and crash_ok)
    rows = [("entries (good + hostile)", f"{res.good} + {res.hostile}"),
            ("entries/s (publish to drained, 2 replicas)", f"{res.entries_per_s:.1f}"),
            ("dead letters by reason", ", ".join(f"{k} {v}" for k, v in res.dead_letters_by_reason.items())),
            ("hostile entries with a wrong or no reason", str(len(res.wrong_reason) + len(res.not_dead_lettered))),
            ("good samples not audited exactly once", str(len(res.good_audited_not_once))),
            ("/readyz polls not ready", ", ".join(f"{k} {v}" for k, v in res.not_ready_polls.items())),
            ("peak RSS per replica (VmHWM, MB; bound 1200)", ", ".join(f"{k} {v}" for k, v in res.peak_rss_mb.items())),
            ("replica-killing message (max_deliveries 3): crashes", str(crash.crashes)),
            ("  its dead letter (reason, deliveries)", ", ".join(f"{r} {n}" for r, n in crash.dead_letters)),
            ("  its batch-mates audited exactly once", f"{sum(v == 1 for v in crash.good_audited.values())} of {len(crash.good_audited)}"),
            ("all checks", "pass" if ok else "FAIL")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(res), "replica_killing_message": asdict(crash)}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
