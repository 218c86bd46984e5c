#!/usr/bin/env bash
# Fuzzes the live API against its own OpenAPI document with schemathesis (from PyPI), an
# independent client: no response may be a 5xx, and every response must match the document
# (status code, content type, body schema, headers).
#
# The server and schemathesis run in a network namespace of their own with only loopback up:
# schemathesis submits jobs whose task endpoints and callbacks are arbitrary URLs, and the
# server would otherwise try to call them. In there, every such call fails at once and no
# packet leaves the machine.
#
# Usage (from the repository root, as root): bash tests/api/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

SCHEMATHESIS_VERSION=4.32.5
if ! command -v st >/dev/null || [ "$(st --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
st_bin=$(command -v st)
# unshare (util-linux) and ip (iproute2) make the network namespace.
if ! command -v unshare >/dev/null || ! command -v ip >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q util-linux iproute2
fi

cargo build --locked --quiet
bin="$PWD/target/debug/doparallel"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

unshare --net bash -s "$bin" "$work" "$st_bin" <<'INNER'
set -euo pipefail
bin=$1 work=$2 st_bin=$3
ip link set lo up
DOPARALLEL_SECRET_KEY="$("$bin" secret --key)" "$bin" serve --listen 127.0.0.1:0 --database "sqlite://$work/db" --max-in-flight 64 \
    --callback-retry-schedule "" 2>"$work/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
    addr=$(grep -o 'listening on [0-9.:]*' "$work/server.log" | head -n 1 | cut -d' ' -f3 || true)
    [ -n "$addr" ] && break
    sleep 0.05
done
[ -n "$addr" ] || { cat "$work/server.log"; echo "the server did not start"; exit 1; }
# From the scratch directory, so that schemathesis keeps its cache out of the repository.
cd "$work"
"$st_bin" run "http://$addr/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
    --max-examples 40 \
    --request-timeout 10 \
    --suppress-health-check all \
    --no-color
INNER
