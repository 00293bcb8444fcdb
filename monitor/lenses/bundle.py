"""Lens bundles: a directory with ``manifest.json`` beside the ONNX graph (and its weights).

``manifest.json`` (schema :data:`SCHEMA`) records what the bundle is for and how good it is:

- ``bundle_id``: ``lwb-`` + 16 hex digits of a hash over the model fingerprint and every file's
  sha256, so two bundles with the same content have the same id;
- ``created_at`` (UTC, ISO 8601); ``model``: name, fingerprint
  (:func:`monitor.adapters.model_fingerprint`, which hashes the unembedding), family, number of
  blocks, hidden size, vocabulary size; ``tokenizer``: class, name, vocabulary size and a sha256
  of its vocabulary;
- ``lens``: kind (``logit``/``tuned``), watched ``layers`` (sorted, the last one is state N),
  ``k``, the read-out (norm kind and epsilon); ``graph``: file, opset, inputs and outputs;
- ``probes``: per probe its label names, provenance and held-out metrics per layer;
- ``quality``: the held-out quality report per layer (:mod:`monitor.lenses.quality`);
  ``training``: the recipe, tokens seen and time;
- ``files``: relative path -> sha256 and size of every other file in the bundle.

:func:`verify_bundle` refuses, with a precise error, a manifest path that leaves the directory
(:class:`BundlePathError`, symlinks included), a file whose sha256 differs
(:class:`BundleChecksumError`) and a bundle made for another model
(:class:`BundleFingerprintError`). The loader never unpickles anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from monitor.errors import (
    BundleChecksumError,
    BundleError,
    BundleFingerprintError,
    BundlePathError,
)

SCHEMA = "layerwatch.lens-bundle/1"
MANIFEST = "manifest.json"
GRAPH_FILE = "bank.onnx"
# probe_<name>@mean_weight / _bias: the initialisers of the probes trained on prompt-mean states
MEAN_PROBE_SUFFIX = "@mean"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z``."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def safe_path(root: Path, rel: str) -> Path:
    """Resolve manifest path ``rel`` inside ``root``; refuse anything that leaves it.

    Absolute paths, ``..`` components, drive letters and symlinks resolving outside are refused
    with :class:`BundlePathError`.
    """
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundlePathError(f"bundle {root}: manifest path {rel!r} is not a plain relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise BundlePathError(f"bundle {root}: manifest path {rel!r} leaves the bundle directory")
    base = root.resolve()
    full = (base / pure).resolve()
    if full != base and base not in full.parents:
        raise BundlePathError(
            f"bundle {root}: manifest path {rel!r} resolves to {full}, outside the bundle directory "
            "(a symlink?)"
        )
    return full


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory and parsed manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["model"]["fingerprint"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.manifest["lens"]["layers"])

    def path(self, rel: str) -> Path:
        """A file of the bundle (checked to stay inside it)."""
        return safe_path(self.root, rel)


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse ``root/manifest.json`` and check its schema and required fields."""
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"lens bundle {root} is not a directory; build one with `layerwatch lens fit`")
    if not mpath.is_file():
        raise BundleError(f"lens bundle {root} has no {MANIFEST}; is this a bundle directory?")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"lens bundle {root}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"lens bundle {root}: {MANIFEST} must hold a JSON object")
    if doc.get("schema") != SCHEMA:
        raise BundleError(
            f"lens bundle {root}: schema {doc.get('schema')!r} is not {SCHEMA!r}; rebuild the bundle "
            "with this version of layerwatch"
        )
    for key in ("bundle_id", "model", "lens", "graph", "files"):
        if key not in doc:
            raise BundleError(f"lens bundle {root}: {MANIFEST} lacks the field {key!r}")
    if not isinstance(doc["files"], dict) or not doc["files"]:
        raise BundleError(f"lens bundle {root}: {MANIFEST} 'files' must map paths to checksums")
    return doc


def verify_bundle(path: str | os.PathLike[str], expected_fingerprint: str | None = None) -> Bundle:
    """Check paths, checksums and (if given) the model fingerprint; return the :class:`Bundle`.

    Order: paths first (nothing outside the directory is ever opened), then the fingerprint
    (cheap, and the most useful message when a bundle is for another model), then checksums.
    """
    root = Path(path)
    doc = read_manifest(root)
    files: dict[str, Any] = doc["files"]
    resolved = {rel: safe_path(root, rel) for rel in files}
    graph_file = doc["graph"].get("file")
    if graph_file not in files:
        safe_path(root, str(graph_file))
        raise BundleError(f"lens bundle {root}: the graph file {graph_file!r} is not listed in 'files'")
    if expected_fingerprint is not None and doc["model"].get("fingerprint") != expected_fingerprint:
        raise BundleFingerprintError(
            f"lens bundle {root} was built for model {doc['model'].get('name', '?')} with fingerprint "
            f"{doc['model'].get('fingerprint')}, but the served model's fingerprint is "
            f"{expected_fingerprint}; build a bundle for this model with `layerwatch lens fit`"
        )
    for rel, full in resolved.items():
        entry = files[rel]
        want = entry.get("sha256") if isinstance(entry, dict) else entry
        if not full.is_file():
            raise BundleChecksumError(f"lens bundle {root}: file {rel} is listed in the manifest but missing")
        got = sha256_file(full)
        if got != want:
            raise BundleChecksumError(
                f"lens bundle {root}: {rel} has sha256 {got}, the manifest says {want}; the bundle "
                "was modified or damaged: rebuild it or restore it from its source"
            )
    return Bundle(root, doc)


def bundle_id_for(fingerprint: str, files: dict[str, dict[str, Any]]) -> str:
    """Content id: a hash over the model fingerprint and the files' checksums."""
    h = hashlib.sha256(fingerprint.encode())
    for rel in sorted(files):
        h.update(f"\x00{rel}\x00{files[rel]['sha256']}".encode())
    return "lwb-" + h.hexdigest()[:16]


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under ``root`` (except the manifest), fill ``files``, ``bundle_id``,
    ``schema`` and ``created_at`` and write ``manifest.json`` atomically. Returns the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    doc = {"schema": SCHEMA, **manifest}
    doc["files"] = files
    doc.setdefault("created_at", utc_now())
    doc["bundle_id"] = bundle_id_for(doc["model"]["fingerprint"], files)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return doc


def update_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    """Replace top-level fields of an existing manifest (re-checksumming the files)."""
    doc = read_manifest(root)
    doc.update(fields)
    for key in ("schema", "files", "bundle_id"):
        doc.pop(key, None)
    return write_manifest(root, doc)
