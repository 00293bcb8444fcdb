#!/usr/bin/env bash
# Install the Debian packages that hold the real offline corpora the lenses, probes and the drift
# evaluation read (Debian handbook, translated man pages, Python docs, ...; monitor/corpora/ and
# docs/corpora.md). Idempotent: installs only what is missing. Used by `make demo` and services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
while read -r p; do
  case "$p" in ''|'#'*) continue;; esac
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done < scripts/corpora-packages.txt
for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -q >/dev/null 2>&1 || true)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
