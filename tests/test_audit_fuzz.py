"""Fuzz: every random mutation of a valid trail is detected; random valid histories always verify."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.audit import AuditConfig, AuditWriter, KeyRing, verify_trail
from monitor.audit.records import body_json, encode_record, seal
from monitor.audit.segments import list_segments
from monitor.audit.testing import crash, example_sample

KEY = b"fuzz-key-0123456789abcdef"
MUTATIONS_PER_RUN = int(os.environ.get("LAYERWATCH_FUZZ_MUTATIONS", "1200"))
SEED = int(os.environ.get("LAYERWATCH_FUZZ_SEED", "20250131"))


def _config(directory: Path, **kw: Any) -> AuditConfig:
    return AuditConfig(directory=directory, writer_id="w", max_segment_bytes=2500, fsync="every_n",
                       fsync_every_n=1000, **kw)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four closed, valid trails: plain, signed, pruned, recovered after a torn write."""
    root = tmp_path_factory.mktemp("bases")
    out: dict[str, Path] = {}
    for variant in ("plain", "signed", "pruned", "recovered"):
        config = _config(root / variant, **({"hmac_key": KEY} if variant == "signed" else {}))
        w = AuditWriter(config)
        w.append_many([("sample", example_sample(i, n_layers=2)) for i in range(8)])
        if variant == "recovered":
            crash(w, torn=b'{"flags":[],"hash":"0f')
            w = AuditWriter(config)
        if variant == "pruned":
            w.prune(keep_segments=3)
        w.append_many([("sample", example_sample(i, n_layers=2)) for i in range(8, 12)])
        w.close()
        keys = KeyRing([KEY]) if variant == "signed" else None
        assert verify_trail(w.trail_dir, keys=keys).status == "intact"
        out[variant] = w.trail_dir
    return out


# --- mutations: each returns a description; the caller retries when nothing changed -------------------

Segs = list[Path]


def _lines(seg: Path) -> list[bytes]:
    return seg.read_bytes().splitlines(keepends=True)


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _leaves(v, (*path, k))]
    if isinstance(obj, list) and obj:
        return [p for i, v in enumerate(obj) for p in _leaves(v, (*path, i))]
    return [path]


def _changed(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1, 1000])
    if isinstance(value, float):
        return value * 1.5 + 0.125
    if isinstance(value, str):
        return value[:-1] + ("x" if not value.endswith("x") else "y") if value else "x"
    return "x"


def edit_field(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice(segs)
    lines = _lines(seg)
    i = rng.randrange(len(lines))
    rec = json.loads(lines[i])
    path = rng.choice(_leaves(rec))
    target = rec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = _changed(target[path[-1]], rng)
    forge = rng.random() < 0.5
    if forge:  # an editor who knows the format re-hashes (but has no HMAC key)
        lines[i] = encode_record(rec)
    else:
        lines[i] = (seal(body_json(rec), rec["hash"], rec.get("hmac")) + "\n").encode()
    seg.write_bytes(b"".join(lines))
    return f"edit {'and re-hash ' if forge else ''}{path} in {seg.name} line {i + 1}"


def change_byte(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice(segs)
    data = bytearray(seg.read_bytes())
    i = rng.randrange(len(data))
    data[i] = rng.choice([b for b in range(256) if b != data[i]])
    seg.write_bytes(bytes(data))
    return f"byte {i} of {seg.name}"


def delete_line(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice(segs)
    lines = _lines(seg)
    i = rng.randrange(len(lines))
    del lines[i]
    seg.write_bytes(b"".join(lines))
    return f"delete {seg.name} line {i + 1}"


def insert_line(rng: random.Random, segs: Segs) -> str:
    src = _lines(rng.choice(segs))
    line = rng.choice(src) if rng.random() < 0.7 else b'{"kind":"sample","sample_id":"injected"}\n'
    seg = rng.choice(segs)
    lines = _lines(seg)
    i = rng.randrange(len(lines) + 1)
    lines.insert(i, line)
    seg.write_bytes(b"".join(lines))
    return f"insert at {seg.name} line {i + 1}"


def duplicate_line(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice(segs)
    lines = _lines(seg)
    i = rng.randrange(len(lines))
    lines.insert(i + 1, lines[i])
    seg.write_bytes(b"".join(lines))
    return f"duplicate {seg.name} line {i + 1}"


def swap_lines(rng: random.Random, segs: Segs) -> str:
    a, b = rng.choice(segs), rng.choice(segs)
    la, lb = _lines(a), _lines(b)
    i, j = rng.randrange(len(la)), rng.randrange(len(lb))
    if a == b:
        la[i], la[j] = la[j], la[i]
        a.write_bytes(b"".join(la))
    else:
        la[i], lb[j] = lb[j], la[i]
        a.write_bytes(b"".join(la))
        b.write_bytes(b"".join(lb))
    return f"swap {a.name}:{i + 1} with {b.name}:{j + 1}"


def truncate_segment(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice(segs)
    data = seg.read_bytes()
    n = rng.randrange(len(data))
    seg.write_bytes(data[:n])
    return f"truncate {seg.name} to {n} of {len(data)} bytes"


def drop_segment(rng: random.Random, segs: Segs) -> str:
    seg = rng.choice([segs[0], segs[-1], rng.choice(segs)])
    seg.unlink()
    return f"drop {seg.name}{' (newest)' if seg == segs[-1] else ''}{' (oldest)' if seg == segs[0] else ''}"


def forged_append(rng: random.Random, segs: Segs) -> str:
    seg = segs[-1]
    last = json.loads(_lines(seg)[-1])
    rec = dict(example_sample(999, n_layers=2), v=1, writer=last["writer"], kind="sample", seq=last["seq"] + 1,
               ts=last["ts"], prev_hash=last["hash"])
    with seg.open("ab") as f:
        f.write(encode_record(rec))
    return "append a well-formed forged record after the last one"


MUTATIONS: list[Callable[[random.Random, Segs], str]] = [
    edit_field, change_byte, delete_line, insert_line, duplicate_line, swap_lines, truncate_segment,
    drop_segment, forged_append,
]


def _snapshot(trail: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in trail.iterdir() if p.is_file()}


def _restore(trail: Path, files: dict[str, bytes]) -> None:
    for p in trail.iterdir():
        if p.is_file() and p.name not in files:
            p.unlink()
    for name, data in files.items():
        (trail / name).write_bytes(data)


def test_every_random_mutation_is_detected(bases: dict[str, Path], tmp_path: Path) -> None:
    """1000+ random mutations (edits, bytes, lines, truncations, dropped segments) never verify as intact."""
    rng = random.Random(SEED)
    originals = {variant: _snapshot(trail) for variant, trail in bases.items()}
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path)) / "w"
    work.mkdir()
    missed = []
    kinds: dict[str, int] = {}
    try:
        for n in range(MUTATIONS_PER_RUN):
            variant = rng.choice(sorted(bases))
            mutate = MUTATIONS[n % len(MUTATIONS)]
            for _ in range(20):
                _restore(work, originals[variant])
                what = mutate(rng, list_segments(work))
                if _snapshot(work) != originals[variant]:
                    break
            else:
                pytest.fail(f"mutation {mutate.__name__} never changed {variant}")
            report = verify_trail(work, keys=KeyRing([KEY]) if variant == "signed" else None)
            if report.status == "intact" or report.first_break is None or report.first_break.segment is None:
                missed.append(f"#{n} {variant}: {what} -> {report.status} {report.first_break}")
            else:
                kinds[report.first_break.kind] = kinds.get(report.first_break.kind, 0) + 1
    finally:
        shutil.rmtree(work.parent)
    assert not missed, f"seed {SEED}: {len(missed)} undetected:\n" + "\n".join(missed[:20])
    assert sum(kinds.values()) >= 1000, kinds


OPS = st.sampled_from(["append", "batch", "restart", "crash", "crash_torn", "prune", "sync"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=10), policy=st.sampled_from(["every_record", "every_n", "interval"]),
       signed=st.booleans(), store_text=st.sampled_from(["none", "redacted", "full"]))
def test_valid_histories_always_verify(ops: list[str], policy: str, signed: bool, store_text: str) -> None:
    """Any mix of appends, rotations, restarts, crashes (torn or not) and prunes leaves a trail that verifies."""
    keys = KeyRing([KEY]) if signed else None
    with tempfile.TemporaryDirectory() as tmp:
        config = AuditConfig(directory=Path(tmp), writer_id="w", max_segment_bytes=2500, fsync=policy,
                             fsync_every_n=4, fsync_interval_s=3600, store_text=store_text,
                             hmac_key=KEY if signed else None)
        w = AuditWriter(config)
        i = 0
        for op in ops:
            if op in ("append", "batch"):
                count = 1 if op == "append" else 5
                w.append_many([("sample", example_sample(i + j, n_layers=2, text=f"mail a{i}@b.example"))
                               for j in range(count)])
                i += count
            elif op == "sync":
                w.sync()
            elif op == "prune":
                w.prune(keep_segments=2)
            elif op == "restart":
                w.close()
                w = AuditWriter(config)
            else:
                crash(w, torn=b'{"hash":"0' if op == "crash_torn" else b"")
                status = verify_trail(w.trail_dir, keys=keys).status
                assert status == ("torn" if op == "crash_torn" else "intact")
                w = AuditWriter(config)
        w.close()
        report = verify_trail(w.trail_dir, keys=keys)
        assert report.status == "intact", report.first_break
