#!/usr/bin/env bash
# Runs the README's "Five minutes with Ironlink" as written: every command below must stand,
# to the letter, in one of the section's ```sh blocks (the test fails otherwise), and runs
# against a real `ironlink-cloud serve` with mosquitto's clients. Two things differ, and
# only them: step 1's `cargo run --release` is the binary under test, listening on ephemeral
# loopback ports (its data dir is the README's ./ironlink-data, in a temp folder), and the
# CLI's default URL is pointed at that port (IRONLINK_URL).
# Usage: readme.sh PATH/TO/ironlink-cloud
set -uo pipefail
BIN=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; echo "--- server log"; tail -20 "$WORK/serve.err"; exit 1; }

# The section's commands, as they stand in the README (trailing "  # comments" dropped).
README_CMDS=$(awk '/^## Five minutes/{f=1} /^## Layout/{f=0} f' "$ROOT/README.md" |
    awk '/^ *```sh/{c=1; next} /^ *```/{c=0} c' | sed -e 's/^ *//' -e 's/  \+# .*$//')
in_readme() { grep -qxF -- "$1" <<<"$README_CMDS" || fail "not in the README as written: $1"; }
run() { in_readme "$1"; echo "+ $1" >&2; eval "$1"; }
run_bg() { # a command that keeps running: its output goes to $2
    in_readme "$1"; echo "+ $1 (in the background)" >&2
    eval "exec ${1%&}" >"$2" 2>&1 &
    PIDS+=($!)
}
wait_for() { # condition, what
    for _ in $(seq 1 100); do eval "$1" && return 0; sleep 0.1; done
    fail "$2"
}

cd "$WORK" || exit 1
mkdir -p docs && cp -r "$ROOT/docs/tsl-templates" docs/
mkdir -p target/release && ln -s "$BIN" target/release/ironlink-cloud
# Step 1, on ephemeral ports.
"$BIN" serve --mqtt-listen 127.0.0.1:0 --mqtts-listen off --amqps-listen off --http-listen 127.0.0.1:0 \
    >"$WORK/serve.out" 2>"$WORK/serve.err" &
PIDS+=($!)
wait_for "grep -q '^Ironlink cloud ready' '$WORK/serve.out'" "the server printed no ready line"
grep -q '^Admin token ' "$WORK/serve.out" || fail "step 1: the admin token is printed at first start"
export IRONLINK_URL; IRONLINK_URL=$(sed -n 's|^HTTP API *\(http://[^ ]*\)/api/v1.*|\1|p' "$WORK/serve.out")
unset IRONLINK_TOKEN

# Step 2.
run 'export PATH=$PWD/target/release:$PATH'
run 'PK=$(ironlink-cloud product create "Smart meter" --quiet)'
[[ "$PK" =~ ^[A-Za-z0-9]{11}$ ]] || fail "step 2: product create --quiet printed '$PK'"
run 'ironlink-cloud device create $PK meter-0001' || fail "step 2: device create"
run 'ironlink-cloud device create $PK meter-0002' || fail "step 2: device create"
run 'ironlink-cloud device credentials $PK meter-0001' >"$WORK/creds.txt" || fail "step 2: credentials"
grep -q 'mosquitto_pub' "$WORK/creds.txt" || fail "step 2: no mosquitto_pub line"

# Step 3 (the third terminal).
run 'eval "$(ironlink-cloud device credentials $PK meter-0001 --export)"'
[ -n "$MQTT_PORT" ] && [ -n "$MQTT_PASSWORD" ] || fail "step 3: --export set no variables"
run_bg 'mosquitto_sub -h $MQTT_HOST -p $MQTT_PORT -i "$MQTT_CLIENT_ID" -u "$MQTT_USERNAME" -P "$MQTT_PASSWORD" -t "/sys/$PK/meter-0001/#" -v' "$WORK/sub1.txt"
SUB1=${PIDS[-1]}

# Step 4.
wait_for "ironlink-cloud device show \$PK meter-0001 --json | grep -q '\"status\": \"online\"'" "step 3: meter-0001 never showed online"
run 'ironlink-cloud device show $PK meter-0001' | grep -q ' UTC' || fail "step 4: times without their zone"
run "ironlink-cloud pub \$PK meter-0001 /sys/\$PK/meter-0001/thing/service/property/set '{\"params\":{\"on\":1}}'" >/dev/null ||
    fail "step 4: pub"
wait_for "grep -q 'property/set' '$WORK/sub1.txt'" "step 4: the subscriber of step 3 got no message"
run 'ironlink-cloud device presence $PK meter-0001' | grep -q online || fail "step 4: presence"

# Step 5: meter-0002; meter-0001 stays connected throughout.
run 'eval "$(ironlink-cloud device credentials $PK meter-0002 --export)"'
in_readme "mosquitto_sub -h \$MQTT_HOST -p \$MQTT_PORT -i \"\$MQTT_CLIENT_ID\" -u \"\$MQTT_USERNAME\" -P \"\$MQTT_PASSWORD\" -t '/sys/#'"
timeout 10 mosquitto_sub -h $MQTT_HOST -p $MQTT_PORT -i "$MQTT_CLIENT_ID" -u "$MQTT_USERNAME" -P "$MQTT_PASSWORD" -t '/sys/#' \
    >"$WORK/denied.txt" 2>&1
grep -q "All subscription requests were denied" "$WORK/denied.txt" || fail "step 5: /sys/# was not visibly denied: $(cat "$WORK/denied.txt")"
run_bg 'mosquitto_sub -h $MQTT_HOST -p $MQTT_PORT -i "$MQTT_CLIENT_ID" -u "$MQTT_USERNAME" -P "$MQTT_PASSWORD" -t "/sys/$PK/meter-0002/#" &' "$WORK/sub2.txt"
SUB2=${PIDS[-1]}
wait_for "ironlink-cloud device show \$PK meter-0002 --json | grep -q '\"status\": \"online\"'" "step 5: meter-0002 never showed online"
run 'ironlink-cloud device disable $PK meter-0002' >/dev/null || fail "step 5: disable"
wait_for "! kill -0 $SUB2 2>/dev/null" "step 5: the disabled device's subscriber was not disconnected"
run 'ironlink-cloud device enable $PK meter-0002' >/dev/null || fail "step 5: enable"
kill -0 "$SUB1" 2>/dev/null || fail "step 5 cost meter-0001 its connection"
ironlink-cloud device show $PK meter-0001 --json | grep '"status": "online"' >/dev/null || fail "step 5: meter-0001 is not online any more"

# Step 6: the subscriber of step 3 is stopped first (Ctrl-C).
kill -TERM "$SUB1"; wait "$SUB1" 2>/dev/null
run 'ironlink-cloud product thing-model $PK --import docs/tsl-templates/electricity-meter.json' >/dev/null || fail "step 6: import"
run 'eval "$(ironlink-cloud device credentials $PK meter-0001 --export)"'
RR='mosquitto_rr -V 5 -h $MQTT_HOST -p $MQTT_PORT -i "$MQTT_CLIENT_ID" -u "$MQTT_USERNAME" -P "$MQTT_PASSWORD" -t /sys/$PK/meter-0001/thing/event/property/post -e /sys/$PK/meter-0001/thing/event/property/post_reply -m '"'"'{"id":"1","params":{"Voltage":230.1,"Current":{"value":1.5,"time":1700000000000},"RelayState":7}}'"'"
in_readme "$RR"
eval "timeout 20 $RR" >"$WORK/rr.txt" 2>&1 || fail "step 6: mosquitto_rr: $(cat "$WORK/rr.txt")"
grep -q '"code":460' "$WORK/rr.txt" || fail "step 6: the reply is not code 460: $(cat "$WORK/rr.txt")"
grep -q 'RelayState' "$WORK/rr.txt" || fail "step 6: the reply does not name RelayState"
run 'ironlink-cloud device properties $PK meter-0001' | grep -q Voltage || fail "step 6: Voltage not stored"
run 'ironlink-cloud device history $PK meter-0001 Voltage' | grep -q '230.1' || fail "step 6: history"
run 'ironlink-cloud timeseries aggregate $PK meter-0001 Voltage --interval 1m' | grep -q '230.1' || fail "step 6: aggregate"
run "ironlink-cloud device shadow \$PK meter-0001 --desired '{\"RelayState\": 0}'" >/dev/null || fail "step 6: shadow"
echo "README five minutes: every step ran as written"
