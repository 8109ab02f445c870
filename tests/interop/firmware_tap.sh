#!/usr/bin/env bash
# The firmware SDK against the real cloud: the example lamp (ironlink-lamp: embassy-net over a
# TAP device, the network stack, session and handler code a microcontroller runs) talks to an
# ironlink-cloud process, both inside a network namespace this script creates (root needed).
# Checks: connect and posts visible through the API, a property set, an async service call, a
# sync call over RRPC, a value the thing model refuses, NTP time, and a broker restart (kill -9)
# that the lamp survives by reconnecting.
# Usage: tests/interop/firmware_tap.sh PATH_TO_IRONLINK_CLOUD PATH_TO_IRONLINK_LAMP PYTHON
# Prints "N passed, N failed" last; exits non-zero on any failure.
set -uo pipefail
BIN=${1:?path to ironlink-cloud}
LAMP=${2:?path to ironlink-lamp}
PY=${3:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
TSL="$HERE/../../firmware/host/lamp.tsl.json"
WORK=$(mktemp -d)
NS=ironlink-fw-$$
PASS=0
FAIL=0
SERVER_PID=
LAMP_PID=
cleanup() {
    [ -n "$LAMP_PID" ] && kill "$LAMP_PID" 2>/dev/null && wait "$LAMP_PID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
inns() { ip netns exec "$NS" "$@"; }
json() { "$PY" -c "import json,sys; print(json.load(sys.stdin)$1)"; }

check() { # name, command...
    local name=$1; shift
    if "$@" >"$WORK/out.txt" 2>&1; then
        PASS=$((PASS + 1)); echo "ok   - $name"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - $name"; sed 's/^/       /' "$WORK/out.txt"
        echo "       --- lamp output:"; tail -20 "$WORK/lamp.out" 2>/dev/null | sed 's/^/       /'
    fi
}
# Waits (at most $2 tenths of a second) until the command succeeds.
until_ok() { local n=$1; shift; for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; "$@"; }

ip netns add "$NS" || { echo "cannot create a network namespace (root needed)"; exit 1; }
inns ip link set lo up
inns ip tuntap add dev tap0 mode tap
inns ip addr add 192.168.69.1/24 dev tap0
inns ip link set tap0 up

start_server() {
    # (ip netns exec, not the inns function: a backgrounded function is a subshell, and $! would
    # be its PID instead of the server's)
    ip netns exec "$NS" "$BIN" serve --data-dir "$WORK/data" --mqtt-listen 192.168.69.1:1883 --mqtts-listen 127.0.0.1:0 \
        --amqps-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$WORK/server.out" 2>>"$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 1 200); do
        grep -q "Ironlink cloud ready" "$WORK/server.out" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; return 1; }
        sleep 0.05
    done
    grep -q "Ironlink cloud ready" "$WORK/server.out" || { echo "server did not start"; cat "$WORK/server.log"; return 1; }
    IRONLINK_URL=$(sed -n 's|^HTTP API *\(http://[^ ]*\)/api/v1.*|\1|p' "$WORK/server.out")
    IRONLINK_TOKEN=$(cat "$WORK/data/admin-token")
    export IRONLINK_URL IRONLINK_TOKEN
}
start_server || exit 1
cli() { inns "$BIN" "$@"; }

PK=$(cli product create fw-lamp --json | json "['product_key']")
cli product thing-model "$PK" --import "$TSL" >/dev/null
cli device create "$PK" lamp-0001 >/dev/null
DS=$(cli device credentials "$PK" lamp-0001 --json | json "['device_secret']")
ip netns exec "$NS" "$LAMP" --tap tap0 --ip 192.168.69.2/24 --broker 192.168.69.1:1883 --product-key "$PK" \
    --device-name lamp-0001 --device-secret "$DS" --period-ms 300 >"$WORK/lamp.out" 2>&1 &
LAMP_PID=$!

posted() { grep -q "first post acknowledged" "$WORK/lamp.out" && cli device properties "$PK" lamp-0001 --json | grep -q Temperature; }
check "the lamp connects over embassy-net and its property posts are visible through the API" until_ok 300 posted

check "NTP over MQTT sets the lamp's clock" until_ok 100 grep -q "^time " "$WORK/lamp.out"

set_ok() {
    cli device set "$PK" lamp-0001 '{"Switch": 1, "Brightness": 80}' --timeout-ms 10000 &&
        grep -q '^set .*"Brightness":80' "$WORK/lamp.out" &&
        until_ok 100 bash -c "ip netns exec '$NS' '$BIN' device properties '$PK' lamp-0001 --json | '$PY' -c \"import json,sys; p={x['identifier']: x['value'] for x in json.load(sys.stdin)['properties']}; sys.exit(0 if p.get('Brightness') == 80 else 1)\""
}
check "a property set is answered 200, applied, and reported back" set_ok

blink() { cli device call "$PK" lamp-0001 Blink '{"Times": 3}' --wait --timeout-ms 10000 | tee /dev/stderr | grep -q '"Done":3'; }
check "an async service call (Blink) is answered with its output" blink

toggle() { cli device call "$PK" lamp-0001 Toggle --timeout-ms 10000 | tee /dev/stderr | grep -q '"Switch"'; }
check "a sync service call (Toggle, over RRPC) is answered with its output" toggle

refused() {
    ! cli device set "$PK" lamp-0001 '{"Brightness": 101}' --timeout-ms 10000 >"$WORK/refused.txt" 2>&1 &&
        cat "$WORK/refused.txt" && grep -q "Brightness" "$WORK/refused.txt" && ! grep -q '"Brightness":101' "$WORK/lamp.out"
}
check "a value outside the thing model is refused and never applied" refused

restart() {
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
    local before
    before=$(grep -c "^connected" "$WORK/lamp.out")
    start_server || return 1
    until_ok 600 bash -c "[ \$(grep -c '^connected' '$WORK/lamp.out') -gt $before ]" &&
        cli device set "$PK" lamp-0001 '{"Mode": 2}' --timeout-ms 10000
}
check "after the cloud is killed (-9) and restarted, the lamp reconnects and answers again" restart

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
