#!/usr/bin/env bash
# Runs schemathesis against a fresh `ironlink-cloud serve` for a bounded time; fails on any
# 5xx, undocumented status, body that does not match its schema, or schema-valid request
# refused. Usage: run.sh PATH/TO/ironlink-cloud PATH/TO/schemathesis [SECONDS]
# (ST_EXTRA: more schemathesis options, e.g. "--include-operation-id aggregate" to try one)
set -uo pipefail
BIN=$1
ST=$2
SECONDS_BUDGET=${3:-120}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN" serve --data-dir "$WORK/data" --mqtt-listen 127.0.0.1:0 --mqtts-listen off \
    --amqps-listen off --http-listen 127.0.0.1:0 >"$WORK/out" 2>"$WORK/err" &
PID=$!
for _ in $(seq 1 200); do grep -q '^Ironlink cloud ready' "$WORK/out" 2>/dev/null && break; sleep 0.05; done
HTTP=$(sed -n 's|^HTTP API *\(http://[^ ]*\)/api/v1.*|\1|p' "$WORK/out")
[ -n "$HTTP" ] || { cat "$WORK/out" "$WORK/err"; exit 1; }
export IRONLINK_ST_TOKEN; IRONLINK_ST_TOKEN=$(cat "$WORK/data/admin-token")
export IRONLINK_URL=$HTTP IRONLINK_TOKEN=$IRONLINK_ST_TOKEN
export IRONLINK_ST_PK IRONLINK_ST_DN=st-device-01
IRONLINK_ST_PK=$("$BIN" product create schemathesis --json | sed -n 's/.*"product_key": "\([^"]*\)".*/\1/p')
"$BIN" device create "$IRONLINK_ST_PK" "$IRONLINK_ST_DN" >/dev/null
cd "$WORK"
"$ST" --config-file "$HERE/schemathesis.toml" run "$HTTP/api/v1/openapi.json" \
    --max-time "$SECONDS_BUDGET" --workers 1 --seed 1 --no-color ${ST_EXTRA:-} \
    --exclude-operation-id device_live >"$WORK/st.txt" 2>&1  # a stream: it answers for as long as one reads
status=$?
# The failures with their curl lines, then the summary.
sed -n '/= \(ERRORS\|FAILURES\) =/,/= \(WARNINGS\|SUMMARY\) =/p' "$WORK/st.txt" | head -300
sed -n '/= SUMMARY =/,$p' "$WORK/st.txt"
if [ "$status" -ne 0 ]; then
    echo "schemathesis failed; server log tail:"; grep -v ' INFO ' "$WORK/err" | tail -20
fi
exit "$status"
