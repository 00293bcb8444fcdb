"""Where baselines live: Redis (shared by all sidecar replicas) and JSON files.

Redis layout, per model name ``<model>``::

    layerwatch:baseline:<model>:<id>       the baseline JSON (content-addressed: id = hash)
    layerwatch:baseline:<model>:active     the id in use
    layerwatch:baseline:<model>:history    list of promoted ids, newest first (rollback pops it)
    layerwatch:baseline:<model>:change     the last promote/rollback: action, id, previous, by, reason, at

On disk, ``<directory>/<id>.json`` per baseline and ``<directory>/active.json`` with the same
pointer and history (used when no Redis is configured, and as a readable mirror otherwise).
Promote and rollback are atomic in Redis (MULTI/EXEC and a Lua script), and running sidecars
follow the active pointer (:meth:`monitor.pipeline.scoring.ScoringStage.follow`).

Trust: a baseline's id is the hash of its content, recomputed at every load
(:meth:`Baseline.from_json`), and a baseline loaded by id must *be* that id: a document planted
under a key (or an active pointer) that is not its own content's id is refused, never loaded.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from monitor.drift.baseline import Baseline, build_baseline
from monitor.errors import BaselineError
from monitor.lenses.readings import Readings

KEY_PREFIX = "layerwatch:baseline"
HISTORY_LIMIT = 50

_ROLLBACK_LUA = """
local cur = redis.call('LINDEX', KEYS[2], 0)
if not cur then return redis.error_reply('no active baseline') end
local prev = redis.call('LINDEX', KEYS[2], 1)
if not prev then return redis.error_reply('no earlier baseline') end
redis.call('LPOP', KEYS[2])
redis.call('SET', KEYS[1], prev)
local note = cjson.decode(ARGV[1])
note['id'] = prev
note['previous'] = cur
redis.call('SET', KEYS[3], cjson.encode(note))
return prev
"""


def default_actor() -> str:
    """Who runs this process, as ``user@host`` (for the change note of a promote or rollback)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def change_note(action: str, baseline_id: str | None, previous: str | None, by: str | None,
                reason: str | None) -> dict[str, Any]:
    """What a promote or rollback records beside the pointer, for the sidecars' audit records."""
    return {"action": action, "id": baseline_id, "previous": previous, "by": by or default_actor(),
            "reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class BaselineStore:
    """Build, save, load, promote and roll back the baselines of one model.

    ``redis`` is a ``redis.Redis`` client (or pass ``redis_url``); ``directory`` a folder for the
    JSON files. At least one of them is needed. With Redis, the active pointer lives there and
    every replica sees a promotion on its next :meth:`active_id` call.
    """

    def __init__(self, model: str, *, redis: Any | None = None, redis_url: str | None = None,
                 directory: str | Path | None = None) -> None:
        if redis is None and redis_url:
            from monitor.backends.redis import connect  # the process's pool and timeouts

            redis = connect(redis_url)
        if redis is None and directory is None:
            raise BaselineError("a BaselineStore needs a Redis client/URL, a directory, or both")
        self.model = model
        self.redis = redis
        self.directory = Path(directory) if directory is not None else None

    # --- keys ---------------------------------------------------------------------------------
    def key(self, baseline_id: str) -> str:
        return f"{KEY_PREFIX}:{self.model}:{baseline_id}"

    @property
    def active_key(self) -> str:
        return f"{KEY_PREFIX}:{self.model}:active"

    @property
    def history_key(self) -> str:
        return f"{KEY_PREFIX}:{self.model}:history"

    @property
    def change_key(self) -> str:
        return f"{KEY_PREFIX}:{self.model}:change"

    def _redis_call(self, fn: Any, *args: Any) -> Any:
        from monitor.backends.redis import mapped_errors

        with mapped_errors(BaselineError, "baseline store"):
            return fn(*args)

    # --- build / save / load ------------------------------------------------------------------
    def build(self, readings: Readings, *, model_fingerprint: str, bundle_id: str, **kwargs: Any) -> Baseline:
        """Build a baseline for this store's model (see :func:`build_baseline`); does not save it."""
        return build_baseline(readings, model=self.model, model_fingerprint=model_fingerprint,
                              bundle_id=bundle_id, **kwargs)

    def save(self, baseline: Baseline) -> str:
        """Store ``baseline`` in Redis and/or as ``<directory>/<id>.json``; returns its id."""
        if baseline.model != self.model:
            raise BaselineError(f"baseline {baseline.id} is for model {baseline.model!r}, this store is {self.model!r}")
        text = baseline.dumps()
        if self.redis is not None:
            self._redis_call(self.redis.set, self.key(baseline.id), text)
        if self.directory is not None:
            _atomic_write(self.directory / f"{baseline.id}.json", text)
        return baseline.id

    def load(self, ref: str | Path) -> Baseline:
        """Load by id (Redis first, then the directory) or from a JSON file path. The content id
        is recomputed; loaded by id, it must be that id (BaselineError otherwise)."""
        ref_s = str(ref)
        path = Path(ref_s)
        if ref_s.endswith(".json") and path.exists():
            return Baseline.loads(path.read_text())
        raw: str | bytes | None = None
        where = ""
        if self.redis is not None:
            raw, where = self._redis_call(self.redis.get, self.key(ref_s)), f"Redis key {self.key(ref_s)}"
        if raw is None and self.directory is not None and (self.directory / f"{ref_s}.json").exists():
            raw, where = (self.directory / f"{ref_s}.json").read_text(), str(self.directory / f"{ref_s}.json")
        if raw is None:
            raise BaselineError(f"baseline {ref_s!r} not found for model {self.model!r} (try `layerwatch baseline list`)")
        try:
            bl = Baseline.loads(raw)
        except BaselineError as exc:
            raise BaselineError(f"{where}: {exc}; not loaded") from exc
        if bl.id != ref_s:
            raise BaselineError(f"{where} should hold baseline {ref_s}, but holds a baseline whose content is {bl.id} "
                                "(planted or overwritten); not loaded. Re-save the baseline, or promote its real id")
        return bl

    def exists(self, baseline_id: str) -> bool:
        if self.redis is not None and self._redis_call(self.redis.exists, self.key(baseline_id)):
            return True
        return self.directory is not None and (self.directory / f"{baseline_id}.json").exists()

    def ids(self) -> list[str]:
        """Ids of the stored baselines (sorted)."""
        ids: set[str] = set()
        if self.redis is not None:
            prefix = f"{KEY_PREFIX}:{self.model}:"
            for k in self._redis_call(lambda: list(self.redis.scan_iter(match=prefix + "bl-*"))):
                ids.add((k.decode() if isinstance(k, bytes) else k)[len(prefix):])
        if self.directory is not None and self.directory.exists():
            ids.update(p.stem for p in self.directory.glob("bl-*.json"))
        return sorted(ids)

    # --- active pointer -----------------------------------------------------------------------
    def _file_pointer(self) -> dict[str, Any]:
        assert self.directory is not None
        p = self.directory / "active.json"
        if not p.exists():
            return {"active": None, "history": []}
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise BaselineError(f"{p} is not valid JSON: {exc}") from exc
        return {"active": doc.get("active"), "history": list(doc.get("history", [])), "change": doc.get("change")}

    def _write_file_pointer(self, active: str | None, history: list[str], change: dict[str, Any] | None) -> None:
        if self.directory is not None:
            _atomic_write(self.directory / "active.json", json.dumps(
                {"model": self.model, "active": active, "history": history, "change": change}, indent=2))

    def history(self) -> list[str]:
        """Promoted ids, newest (the active one) first."""
        if self.redis is not None:
            return [x.decode() if isinstance(x, bytes) else x
                    for x in self._redis_call(self.redis.lrange, self.history_key, 0, -1)]
        return list(self._file_pointer()["history"])

    def active_id(self) -> str | None:
        """The id in use, or None."""
        if self.redis is not None:
            raw = self._redis_call(self.redis.get, self.active_key)
            return raw.decode() if isinstance(raw, bytes) else raw
        active = self._file_pointer()["active"]
        return str(active) if active else None

    def active(self) -> Baseline | None:
        """The baseline in use, or None (the sidecar then runs in learning mode)."""
        bid = self.active_id()
        return None if bid is None else self.load(bid)

    def last_change(self) -> dict[str, Any] | None:
        """The note of the last promote or rollback (action, id, previous, by, reason, at), if any."""
        if self.redis is not None:
            raw = self._redis_call(self.redis.get, self.change_key)
        else:
            raw = self._file_pointer().get("change")
        try:
            note = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
        except ValueError:
            return None
        return note if isinstance(note, dict) else None

    def promote(self, baseline_id: str, *, by: str | None = None, reason: str | None = None) -> None:
        """Make ``baseline_id`` the active baseline (it must be stored and load as itself); the old
        one stays in history. ``by`` (default ``user@host``) and ``reason`` reach the audit trails
        of the running sidecars, which switch within ``baseline.poll_interval_s``."""
        if not self.exists(baseline_id):
            raise BaselineError(f"cannot promote {baseline_id!r}: not stored for model {self.model!r}; save it first")
        self.load(baseline_id)  # never point the sidecars at a document that would be refused
        previous = self.active_id()
        if previous == baseline_id:
            return
        note = change_note("promote", baseline_id, previous, by, reason)
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.active_key, baseline_id)
            pipe.lpush(self.history_key, baseline_id)
            pipe.ltrim(self.history_key, 0, HISTORY_LIMIT - 1)
            pipe.set(self.change_key, json.dumps(note))
            self._redis_call(pipe.execute)
            self._write_file_pointer(baseline_id, self.history(), note)
        else:
            hist = [baseline_id] + self._file_pointer()["history"]
            self._write_file_pointer(baseline_id, hist[:HISTORY_LIMIT], note)

    def rollback(self, *, by: str | None = None, reason: str | None = None) -> str:
        """Re-activate the previously promoted baseline; returns its id."""
        if self.redis is not None:
            note = json.dumps(change_note("rollback", None, None, by, reason))
            prev = self._redis_call(self.redis.eval, _ROLLBACK_LUA, 3, self.active_key, self.history_key,
                                    self.change_key, note)
            prev_s = prev.decode() if isinstance(prev, bytes) else str(prev)
            self._write_file_pointer(prev_s, self.history(), self.last_change())
            return prev_s
        hist = self._file_pointer()["history"]
        if len(hist) < 2:
            raise BaselineError("baseline store: no earlier baseline to roll back to")
        self._write_file_pointer(hist[1], hist[1:], change_note("rollback", hist[1], hist[0], by, reason))
        return str(hist[1])
