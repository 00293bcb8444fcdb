"""On-disk cache of cleaned texts (parsing all sources takes ~20 s on two cores)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from monitor.corpora.sources import _COPYRIGHT_PACKAGES, _DPKG_INFO, debian_packages

# --------------------------------------------------------------------------------------------
# On-disk cache of cleaned texts (parsing all sources takes ~20 s on two cores)
# --------------------------------------------------------------------------------------------

_CACHE_FORMAT = "1"
T = TypeVar("T")


def _dpkg_versions(packages: Sequence[str]) -> str:
    """``name=version`` of each installed package (``name=-`` when absent), from dpkg's status."""
    wanted = dict.fromkeys(packages, "-")
    try:
        status = Path(_DPKG_INFO).parent.joinpath("status").read_text(errors="replace")
    except OSError:
        status = ""
    for para in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", para, flags=re.M))
        if fields.get("Package") in wanted and "installed" in fields.get("Status", "").split():
            wanted[fields["Package"]] = fields.get("Version", "?")
    return ";".join(f"{k}={v}" for k, v in wanted.items())


@functools.cache
def _fingerprint() -> str:
    """Changes whenever a module of this package, the interpreter or a source package version changes."""
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        h.update(module.read_bytes())
    h.update(f"{sys.version}\x00{sysconfig.get_paths()['stdlib']}".encode())
    h.update(_dpkg_versions([*debian_packages(), *_COPYRIGHT_PACKAGES]).encode())
    try:
        h.update(importlib.metadata.version("garak").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no-garak")
    return h.hexdigest()[:16]


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


class _DiskCached(Generic[T]):
    """Memoise a corpus builder in the process and as gzipped JSON under the cache directory.

    The file name carries :func:`_fingerprint`, so a new package version or a change of this
    module rebuilds (older files are left for checkouts that still use them; delete the
    directory to reclaim the space); an unwritable cache directory only costs the rebuild.
    ``uncached`` is the plain builder.
    """

    def __init__(self, fn: Callable[..., T]) -> None:
        self.uncached = fn
        self._key = fn.__name__.strip("_").replace("_", "-")
        self._memo: dict[tuple[str, ...], T] = {}
        functools.update_wrapper(self, fn)

    def __call__(self, *args: str) -> T:
        if args in self._memo:
            return self._memo[args]
        key = "-".join([self._key, *args])
        root = corpora_cache_dir()
        path = root / f"{key}-{_fingerprint()}.json.gz"
        value: T | None = None
        try:
            value = _freeze(json.loads(gzip.decompress(path.read_bytes())))
        except (OSError, ValueError, EOFError):
            value = self.uncached(*args)
            try:
                root.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(gzip.compress(json.dumps(value, ensure_ascii=False).encode(), 6))
                os.replace(tmp, path)
            except OSError:
                pass
        self._memo[args] = value
        return value

    def cache_clear(self) -> None:
        """Forget the in-process copy (the file stays)."""
        self._memo.clear()


def corpora_cache_dir() -> Path:
    """Where cleaned corpora are cached: ``<layerwatch cache>/corpora``."""
    from monitor.refmodel import default_cache_dir

    return default_cache_dir() / "corpora"
