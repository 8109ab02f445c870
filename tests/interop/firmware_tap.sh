#!/usr/bin/env bash
# The firmware SDK against the real cloud: the example lamp (ironlink-lamp: embassy-net over a
# TAP device, the network stack, session and handler code a microcontroller runs) talks to an
# ironlink-cloud process, both inside a network namespace this script creates (root needed).
# Checks: connect and posts visible through the API, a property set, an async service call, a
# sync call over RRPC, a value the thing model refuses, NTP time, a broker restart (kill -9)
# that the lamp survives by reconnecting, and over-the-air updates from a local HTTP server with
# Range support (until the cloud serves images): a wrongly signed image refused (-3), a download
# cut by kill -9 resumed where it stopped, the new image swapped in by embassy-boot, confirmed
# and reported.
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
HTTP_PID=
IMAGE_TOOL="$(dirname "$LAMP")/ironlink-lamp-image"
cleanup() {
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null && wait "$HTTP_PID" 2>/dev/null
    [ -n "$LAMP_PID" ] && kill "$LAMP_PID" 2>/dev/null && wait "$LAMP_PID" 2>/dev/null
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    if [ -n "${KEEP_WORK:-}" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
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
# A second TAP network for a second lamp (one process per TAP device).
inns ip tuntap add dev tap1 mode tap
inns ip addr add 192.168.70.1/24 dev tap1
inns ip link set tap1 up

start_server() {
    # (ip netns exec, not the inns function: a backgrounded function is a subshell, and $! would
    # be its PID instead of the server's)
    ip netns exec "$NS" "$BIN" serve --data-dir "$WORK/data" --mqtt-listen 0.0.0.0:1883 --mqtts-listen 0.0.0.0:8883 \
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
KEY=$(printf '07%.0s' $(seq 1 32))
mkdir -p "$WORK/fw"
"$IMAGE_TOOL" --version 1.1.0 --size 40000 --key "$KEY" --out "$WORK/fw/lamp-1.1.0.bin" >"$WORK/good.json"
"$IMAGE_TOOL" --version 1.1.0 --size 39000 --key "$(printf '08%.0s' $(seq 1 32))" --out "$WORK/fw/lamp-bad.bin" >"$WORK/bad.json"
PUB=$(json "['public_key']" <"$WORK/good.json")
start_lamp() {
    ip netns exec "$NS" "$LAMP" --tap tap0 --ip 192.168.69.2/24 --broker 192.168.69.1:1883 --product-key "$PK" \
        --device-name lamp-0001 --device-secret "$DS" --period-ms 300 \
        --flash-dir "$WORK/flash" --public-key "$PUB" >>"$WORK/lamp.out" 2>&1 &
    LAMP_PID=$!
}
start_lamp

posted() { grep -q "first post acknowledged" "$WORK/lamp.out" && cli device properties "$PK" lamp-0001 --json | grep -q Temperature; }
check "the lamp connects over embassy-net and its property posts are visible through the API" until_ok 300 posted

check "NTP over MQTT sets the lamp's clock" until_ok 100 grep -q "^time " "$WORK/lamp.out"

set_ok() {
    cli device set "$PK" lamp-0001 '{"Switch": 1, "Brightness": 80}' --timeout-ms 10000 &&
        grep -q '^set .*"Brightness":80' "$WORK/lamp.out" &&
        until_ok 100 bash -c "ip netns exec '$NS' '$BIN' device properties '$PK' lamp-0001 --json | '$PY' -c \"import json,sys; p={x['identifier']: x['value'] for x in json.load(sys.stdin)['properties']}; sys.exit(0 if p.get('Brightness') == 80 else 1)\""
}
check "a property set is answered 200, applied, and reported back" set_ok

# (Output kept in a file, then searched: `| tee | grep -q` fails under pipefail when grep exits first.)
blink() { cli device call "$PK" lamp-0001 Blink '{"Times": 3}' --wait --timeout-ms 10000 >"$WORK/call.txt" && cat "$WORK/call.txt" && grep -q '"Done":3' "$WORK/call.txt"; }
check "an async service call (Blink) is answered with its output" blink

toggle() { cli device call "$PK" lamp-0001 Toggle --timeout-ms 10000 >"$WORK/call.txt" && cat "$WORK/call.txt" && grep -q '"Switch"' "$WORK/call.txt"; }
check "a sync service call (Toggle, over RRPC) is answered with its output" toggle

refused() {
    ! cli device set "$PK" lamp-0001 '{"Brightness": 101}' --timeout-ms 10000 >"$WORK/refused.txt" 2>&1 &&
        cat "$WORK/refused.txt" && grep -q "Brightness" "$WORK/refused.txt" && ! grep -q '"Brightness":101' "$WORK/lamp.out"
}
check "a value outside the thing model is refused and never applied" refused

shadow() {
    cli device shadow "$PK" lamp-0001 --desired '{"Mode": 2, "Brightness": 30}' >/dev/null &&
        until_ok 100 grep -q '^shadow applied .*"Mode":2' "$WORK/lamp.out" &&
        until_ok 100 bash -c "ip netns exec '$NS' '$BIN' device shadow '$PK' lamp-0001 --json | '$PY' -c \"import json,sys; s=json.load(sys.stdin); st=s.get('state', s); r=st['reported']; sys.exit(0 if r.get('Mode') == 2 and r.get('Brightness') == 30 and not st.get('desired') else 1)\""
}
check "the shadow's desired state is applied, reported back, and cleared from desired" shadow

restart() {
    kill -9 "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
    local before
    before=$(grep -c "^connected" "$WORK/lamp.out")
    start_server || return 1
    until_ok 600 bash -c "[ \$(grep -c '^connected' '$WORK/lamp.out') -gt $before ]" &&
        cli device set "$PK" lamp-0001 '{"Mode": 2}' --timeout-ms 10000
}
check "after the cloud is killed (-9) and restarted, the lamp reconnects and answers again" restart

ip netns exec "$NS" "$PY" -u "$HERE/range_server.py" "$WORK/fw" 192.168.69.1 8080 25 >"$WORK/http.log" 2>&1 &
HTTP_PID=$!
until_ok 100 bash -c "ip netns exec '$NS' ss -ltn | grep -q '192.168.69.1:8080'" >/dev/null || { echo "the image server did not start"; cat "$WORK/http.log"; exit 1; }
# The notice the OTA campaign issue's cloud will push: signed image SHA-256 and ed25519.
notice() { # file, json with sha256/ed25519/size
    "$PY" - "$1" "$2" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[2]))
print(json.dumps({"code": "1000", "id": 1, "message": "success", "data": {
    "size": m["size"], "version": m["version"], "sign": m["sha256"], "signMethod": "SHA256",
    "url": "http://192.168.69.1:8080/" + sys.argv[1], "module": "default", "ed25519": m["ed25519"]}}))
PYEOF
}
push() { cli pub "$PK" lamp-0001 "/ota/device/upgrade/$PK/lamp-0001" "$1" >/dev/null; }
lines() { grep -c "$1" "$WORK/lamp.out"; }

factory() { until_ok 100 grep -q "^inform 1.0.0" "$WORK/lamp.out"; }
check "the lamp boots its factory image (1.0.0) and informs its version" factory

bad_sig() {
    push "$(notice lamp-bad.bin "$WORK/bad.json")" &&
        until_ok 200 grep -q "^ota progress -3" "$WORK/lamp.out" && kill -0 "$LAMP_PID"
}
check "an image signed by another key is downloaded, refused (-3) and never booted" bad_sig

cut_and_resume() {
    local good before from
    good=$(notice lamp-1.1.0.bin "$WORK/good.json")
    from=$(($(wc -l <"$WORK/lamp.out") + 1))
    push "$good" || return 1
    # Cut the lamp (kill -9) once this download is under way.
    until_ok 300 bash -c "tail -n +$from '$WORK/lamp.out' | grep -Eq '^ota progress [2-6][0-9] downloading'" || return 1
    kill -9 "$LAMP_PID"; wait "$LAMP_PID" 2>/dev/null
    before=$(lines "^inform 1.0.0")
    start_lamp
    until_ok 200 bash -c "[ \$(grep -c '^inform 1.0.0' '$WORK/lamp.out') -gt $before ]" || return 1
    push "$good" || return 1
    until_ok 300 grep -q "^ota resuming at [1-9]" "$WORK/lamp.out" || return 1
    until_ok 100 grep -q "lamp-1.1.0.bin from [1-9]" "$WORK/http.log" || return 1
    # Staged: the lamp ends with code 3 ("reboot").
    for _ in $(seq 1 300); do kill -0 "$LAMP_PID" 2>/dev/null || break; sleep 0.1; done
    wait "$LAMP_PID"; [ $? -eq 3 ] || return 1
    grep -q "^rebooting into 1.1.0" "$WORK/lamp.out"
}
check "a download cut by kill -9 resumes from where it stopped, is verified and staged" cut_and_resume

swapped() {
    start_lamp
    until_ok 200 grep -q "^inform 1.1.0" "$WORK/lamp.out" &&
        grep -q "^booted 1.1.0 (new image" "$WORK/lamp.out" && grep -q "^confirmed 1.1.0" "$WORK/lamp.out"
}
check "the bootloader swaps the new image in; it confirms itself and informs 1.1.0" swapped

cli device create "$PK" lamp-0002 >/dev/null
DS2=$(cli device credentials "$PK" lamp-0002 --json | json "['device_secret']")
tls_lamp() { # server name, then a condition that ends the wait early; returns the lamp's exit code
    ip netns exec "$NS" "$LAMP" --tap tap1 --ip 192.168.70.2/24 --broker 192.168.70.1:8883 --product-key "$PK" \
        --device-name lamp-0002 --device-secret "$DS2" --period-ms 200 --reports 3 \
        --ca-file "$WORK/data/tls/ca.pem" --server-name "$1" >"$WORK/tls.out" 2>&1 &
    local pid=$!
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        [ -n "${2:-}" ] && grep -q "$2" "$WORK/tls.out" && break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null
    wait "$pid"
}
tls_ok() {
    tls_lamp localhost && cp "$WORK/tls.out" "$WORK/tls-ok.out" && cat "$WORK/tls.out" && grep -q "^connected in .* (TLS)" "$WORK/tls.out" &&
        grep -q "^done after 3 reports" "$WORK/tls.out" &&
        cli device properties "$PK" lamp-0002 --json | grep -q Temperature
}
check "TLS 1.3 (embedded-tls) to the cloud's MQTTS listener, chain verified against its CA: posts visible" tls_ok
tls_wrong_name() {
    ! tls_lamp wrong.example.com "TLS handshake" && cat "$WORK/tls.out" &&
        grep -q "TLS handshake: InvalidCertificate" "$WORK/tls.out" && ! grep -q "^connected" "$WORK/tls.out"
}
check "a broker certificate for another name is refused (no connection)" tls_wrong_name

cli device create "$PK" lamp-0003 >/dev/null
DS3=$(cli device credentials "$PK" lamp-0003 --json | json "['device_secret']")
lossy() {
    # 10 % of the frames lost each way (in the lamp's driver: this kernel has no netem).
    ip netns exec "$NS" "$LAMP" --tap tap1 --ip 192.168.70.3/24 --broker 192.168.70.1:1883 --product-key "$PK" \
        --device-name lamp-0003 --device-secret "$DS3" --period-ms 100 --reports 40 --drop-percent 10 \
        >"$WORK/lossy.out" 2>&1 &
    local pid=$!
    until_ok 300 grep -q "^first post acknowledged" "$WORK/lossy.out" &&
        cli device set "$PK" lamp-0003 '{"Mode": 1}' --timeout-ms 20000 &&
        cli device call "$PK" lamp-0003 Toggle --timeout-ms 20000 >/dev/null || { kill "$pid"; return 1; }
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null
    wait "$pid" && cat "$WORK/lossy.out" && grep -q "^done after 40 reports" "$WORK/lossy.out" &&
        grep -q '^set {"Mode":1}' "$WORK/lossy.out" && grep -Eq "^frames lost: [1-9][0-9]* received, [1-9][0-9]* sent" "$WORK/lossy.out"
}
check "over a link losing 10 % of frames each way: 40 posts acknowledged, a set and an RRPC call answered" lossy

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
