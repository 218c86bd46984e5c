#!/usr/bin/env bash
# Drives the dashboard (GET /) in Debian's headless Chromium. Installs what is missing
# (Chromium, the test's one npm package, the binary), then runs the test; exits non-zero when
# it fails. Run from anywhere: bash tests/browser/run.sh
#
# DOPARALLEL_BIN names a binary to test instead of building target/debug/doparallel.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

# apt-get needs root; a developer who is not root may have sudo.
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  as_root=(sudo)
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "== installing Debian's chromium"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi

if [ ! -d "$here/node_modules" ]; then
  echo "== npm ci (playwright-core, which drives the system Chromium and downloads no browser)"
  (cd "$here" && npm ci --no-audit --no-fund)
fi

if [ -z "${DOPARALLEL_BIN:-}" ]; then
  # A no-op when the binary is up to date, and never a test of a stale one.
  echo "== cargo build"
  (cd "$root" && cargo build --locked --bin doparallel)
fi

echo "== node --test (tests/browser)"
cd "$here"
exec node --test dashboard.test.mjs
