#!/usr/bin/env bash
# Interop suite: Ironlink against clients we did not write.
#   - mosquitto_pub / mosquitto_sub (Debian mosquitto-clients) over TCP and TLS with Alink
#     credentials printed by `ironlink-cloud device credentials`, and an ACL violation refused;
#   - Alibaba's Python device SDK (aliyun-iot-linkkit): connect + downlink, dynamic
#     registration over TLS, the thing model (properties, event, property set, service call)
#     a gateway with two sub-devices, and OTA (push, pull, download with its sign, progress,
#     new version; curl resuming a ranged download);
#   - the edge gateway against pymodbus (TCP and RTU on a socat pty pair) and mbpoll;
#   - the edge's GB/T 32960 server against frames built and answers parsed by rtm-con;
#   - the edge's LoRaWAN server against frames built and downlinks verified by lora-packet (npm,
#     found through NODE_PATH);
#   - the edge's CoAP server against aiocoap (PyPI) and coap-client-notls (Debian libcoap3-bin),
#     and an NB-IoT device upgraded through the edge (firmware/get, Block2 downloads by both);
#   - the time-series archive's Parquet files read back by pyarrow;
#   - analytics jobs' results read by pyarrow and pandas, equal to pandas' own aggregates;
#   - analytics against their reference implementations: change points against ruptures, PV
#     IV curves against pvlib, point anomalies next to adtk's detectors.
# Usage: tests/interop/run.sh PATH_TO_IRONLINK_CLOUD PYTHON_WITH_LINKKIT PYTHON_WITH_RUPTURES
# Prints "N passed, N failed" last; exits non-zero on any failure.
set -uo pipefail
BIN=${1:?path to ironlink-cloud}
PY=${2:?python with aliyun-iot-linkkit}
APY=${3:?python with ruptures, pvlib and adtk}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
PASS=0
FAIL=0
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

check() { # name, command...
    local name=$1; shift
    if "$@" >"$WORK/out.txt" 2>&1; then
        PASS=$((PASS + 1)); echo "ok   - $name"
    else
        FAIL=$((FAIL + 1)); echo "FAIL - $name"; sed 's/^/       /' "$WORK/out.txt"
    fi
}

printf '[apps]\namqp_link_timeout = "2s"\n' >"$WORK/interop.toml"
"$BIN" serve --config "$WORK/interop.toml" --data-dir "$WORK/data" --mqtt-listen 127.0.0.1:0 --mqtts-listen 127.0.0.1:0 --amqps-listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 200); do
    grep -q "Ironlink cloud ready" "$WORK/server.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
    sleep 0.05
done
grep -q "Ironlink cloud ready" "$WORK/server.out" || { echo "server did not start"; exit 1; }
MQTT_PORT=$(sed -n 's|^MQTT  *mqtt://127.0.0.1:\([0-9]*\).*|\1|p' "$WORK/server.out")
MQTTS_PORT=$(sed -n 's|^MQTT/TLS *mqtts://127.0.0.1:\([0-9]*\).*|\1|p' "$WORK/server.out")
AMQPS_PORT=$(sed -n 's|^AMQP/TLS *amqps://127.0.0.1:\([0-9]*\).*|\1|p' "$WORK/server.out")
HTTP=$(sed -n 's|^HTTP API *\(http://[^ ]*\)/api/v1.*|\1|p' "$WORK/server.out")
CA="$WORK/data/tls/ca.pem"
export IRONLINK_URL=$HTTP IRONLINK_TOKEN
IRONLINK_TOKEN=$(cat "$WORK/data/admin-token")
json() { "$PY" -c "import json,sys; print(json.load(sys.stdin)$1)"; }

PK=$("$BIN" product create interop --dynamic-register --json | json "['product_key']")
PS=$("$BIN" product credentials "$PK" --json | json "['product_secret']")
"$BIN" device create "$PK" mosq-0001 >/dev/null
"$BIN" device create "$PK" lk-000001 >/dev/null
"$BIN" device create "$PK" reg-00001 >/dev/null
creds() { "$BIN" device credentials "$PK" "$1" ${2:-} --json; }
C=$(creds mosq-0001); CID=$(json "['client_id']" <<<"$C"); U=$(json "['username']" <<<"$C"); P=$(json "['password']" <<<"$C")

tcp_roundtrip() {
    timeout 20 mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -i "$CID" -u "$U" -P "$P" \
        -t "/$PK/mosq-0001/user/#" -C 1 -W 15 >"$WORK/sub.txt" &
    local sub=$!
    # Publish from the API side once the subscriber is online (event: status online).
    for _ in $(seq 1 200); do
        "$BIN" device show "$PK" mosq-0001 --json | grep -q '"status": "online"' && break
        sleep 0.05
    done
    "$BIN" pub "$PK" mosq-0001 "/$PK/mosq-0001/user/cmd" "from-api" >/dev/null
    wait "$sub" && grep -qx "from-api" "$WORK/sub.txt"
}
check "mosquitto_sub (TCP, securemode=3) receives a downlink published through the API" tcp_roundtrip

tcp_publish() {
    mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -i "$CID" -u "$U" -P "$P" -q 1 \
        -t "/sys/$PK/mosq-0001/thing/event/property/post" -m '{"id":"1","params":{"t":1}}'
}
check "mosquitto_pub (TCP) publishes QoS 1 on its own topic" tcp_publish

CT=$(creds mosq-0001 --tls); CIDT=$(json "['client_id']" <<<"$CT"); PT=$(json "['password']" <<<"$CT")
tls_publish() {
    mosquitto_pub -h localhost -p "$MQTTS_PORT" --cafile "$CA" -i "$CIDT" -u "$U" -P "$PT" -q 1 \
        -t "/sys/$PK/mosq-0001/thing/event/property/post" -m '{"id":"2","params":{"t":2}}'
}
check "mosquitto_pub (TLS, securemode=2) with the generated CA" tls_publish

wrong_password() {
    ! mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -i "$CID" -u "$U" -P "0000" -t "/sys/$PK/mosq-0001/x" -m x \
        >"$WORK/wrong.txt" 2>&1 && grep -qi "bad user name or password" "$WORK/wrong.txt"
}
check "a wrong signature is refused with 'bad user name or password'" wrong_password

acl_subscribe() {
    timeout 20 mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -i "$CID" -u "$U" -P "$P" -t "/sys/#" -C 1 -W 5 2>&1 |
        grep -q "All subscription requests were denied"
}
check "ACL: subscribing to /sys/# is visibly denied" acl_subscribe

acl_publish() {
    mosquitto_pub -V mqttv5 -h 127.0.0.1 -p "$MQTT_PORT" -i "$CID" -u "$U" -P "$P" -q 1 \
        -t "/sys/$PK/lk-000001/thing/event/property/post" -m x 2>&1 | grep -qi "not authorized"
}
check "ACL: publishing on another device's topic is refused (MQTT 5 PUBACK 'not authorized')" acl_publish

L=$("$BIN" device credentials "$PK" lk-000001 --json | json "['device_secret']")
check "aliyun-iot-linkkit connects (TCP), shows online, receives a downlink" \
    "$PY" "$HERE/linkkit_device.py" "$HTTP" "$IRONLINK_TOKEN" connect "$PK" lk-000001 "$L" 127.0.0.1 "$MQTT_PORT"

REG_SECRET=$("$BIN" device credentials "$PK" reg-00001 --json | json "['device_secret']")
linkkit_register() {
    "$PY" "$HERE/linkkit_device.py" "$HTTP" "$IRONLINK_TOKEN" register "$PK" reg-00001 "$PS" localhost "$MQTTS_PORT" "$CA" |
        tee /dev/stderr | grep -q "\"secret\": \"$REG_SECRET\""
}
check "aliyun-iot-linkkit dynamic registration (TLS) returns the device secret" linkkit_register

check "presence history records the linkkit session" \
    bash -c "'$BIN' device presence '$PK' lk-000001 --json | grep -q 'clean disconnect'"

# Thing model: a linkkit device posts properties and an event, answers a property set and a
# service call started through the API.
TPK=$("$BIN" product create thing-interop --json | json "['product_key']")
"$BIN" product thing-model "$TPK" --import "$HERE/thing-model.json" >/dev/null
"$BIN" device create "$TPK" lk-thing1 >/dev/null
TS=$("$BIN" device credentials "$TPK" lk-thing1 --json | json "['device_secret']")
check "aliyun-iot-linkkit thing model: properties, event, property set, async and sync (RRPC) service calls" \
    "$PY" "$HERE/linkkit_device.py" "$HTTP" "$IRONLINK_TOKEN" thing "$TPK" lk-thing1 "$TS" 127.0.0.1 "$MQTT_PORT" "$HERE/thing-model.json"

check "CLI shows the linkkit device's latest properties and its answered call" \
    bash -c "'$BIN' device properties '$TPK' lk-thing1 | grep -q temperature && '$BIN' device calls '$TPK' lk-thing1 | grep -q succeeded"

# Time-series archive tier: the linkkit device's history sealed and moved into Parquet, read
# back by pyarrow as a Hive-partitioned dataset and compared point by point with the API.
check "Parquet archive: the linkkit device's history archived, read back by pyarrow (hive partitions, UTC timestamps), equal to the history API" \
    "$PY" "$HERE/archive_read.py" "$HTTP" "$IRONLINK_TOKEN" "$WORK/data/archive" "$TPK"

# Analytics: the same answers as the reference implementations on the same data.
check "change points: identical breakpoints to ruptures.Window (l2, normal, clinear; penalties and counts), missing points kept in place" \
    "$APY" -W ignore "$HERE/changepoints.py" "$HTTP" "$IRONLINK_TOKEN"
check "PV: simulated IV curves equal pvlib's single-diode solution; pvlib's healthy, open-string, Rs- and Rsh-aged curves diagnosed as such" \
    "$APY" -W ignore "$HERE/pv_pvlib.py" "$HTTP" "$IRONLINK_TOKEN"
check "anomalies: one pooled model finds ≥90 % of injected spikes with an F1 no worse than adtk's best per-series detector on the same data" \
    "$APY" -W ignore "$HERE/anomaly_adtk.py" "$HTTP" "$IRONLINK_TOKEN"

check "analytics jobs: per-property aggregates of the linkkit device's (archived) history, read back as Parquet by pyarrow and CSV by pandas, equal pandas' own; SQL errors at line and column" \
    "$APY" -W ignore "$HERE/jobs_pandas.py" "$HTTP" "$IRONLINK_TOKEN" "$TPK"
cli_jobs() {
    "$BIN" analytics job create interop-cli --sql "SELECT count(*) AS n FROM devices" >/dev/null || return 1
    local id
    id=$("$BIN" analytics job list --json | "$PY" -c "import json,sys; print([j['id'] for j in json.load(sys.stdin) if j['name'] == 'interop-cli'][0])") || return 1
    local run
    run=$("$BIN" analytics job run "$id" --wait --json | json "['id']") || return 1
    "$BIN" analytics job result "$run" --format csv | head -1 | grep -qx n || return 1
    "$BIN" analytics job result "$run" -o "$WORK/run.parquet" --format parquet 2>/dev/null &&
        [ "$(head -c 4 "$WORK/run.parquet")" = PAR1 ] || return 1
    "$BIN" analytics job delete "$id" >/dev/null 2>&1
}
check "CLI: analytics job create / run --wait / result as CSV and Parquet / delete" cli_jobs

# The CLI over the same endpoints: change points of the linkkit device's (archived) history, and
# a healthy array's expected curve written as CSV, diagnosed as normal.
cli_analytics() {
    "$BIN" analytics changepoints "$TPK" lk-thing1 temperature --from 0 --json |
        "$PY" -c "import json,sys; v=json.load(sys.stdin); assert v['points'] >= 1 and 'changes' in v, v" || return 1
    curl -sf -X POST -H "Authorization: Bearer $IRONLINK_TOKEN" -H 'Content-Type: application/json' \
        -d '{"irradiance": 800, "temperature": 30, "modules": 12, "strings": 4, "points": 60}' \
        "$HTTP/api/v1/analytics/pv/simulate" |
        "$PY" -c "import json,sys; v=json.load(sys.stdin); print('voltage,current'); [print(f'{a},{b}') for a, b in zip(v['voltage'], v['current'])]" \
        >"$WORK/curve.csv" || return 1
    "$BIN" analytics pv-diagnose "$WORK/curve.csv" --irradiance 800 --temperature 30 --modules 12 --strings 4 --json |
        "$PY" -c "import json,sys; v=json.load(sys.stdin); assert v['fault'] == 'normal', v"
}
check "CLI: analytics changepoints over the linkkit device's history; analytics pv-diagnose of a CSV curve" cli_analytics

# OTA: a linkkit device is upgraded by a campaign: push, SDK download with its sign checked,
# curl resuming a ranged download, pull, progress, new version.
OPK=$("$BIN" product create ota-interop --json | json "['product_key']")
"$BIN" device create "$OPK" lk-ota-01 >/dev/null
OS=$("$BIN" device credentials "$OPK" lk-ota-01 --json | json "['device_secret']")
head -c 300000 /dev/urandom >"$WORK/firmware-2.0.0.bin"
OPKG=$("$BIN" ota package upload --product "$OPK" --version 2.0.0 --src-version 1.0.0 "$WORK/firmware-2.0.0.bin" --json | json "['id']")
mkdir -p "$WORK/ota"
check "aliyun-iot-linkkit OTA: notice pushed and pulled, SDK download with its sign checked, curl --range resumes, progress, new version" \
    "$PY" "$HERE/linkkit_device.py" "$HTTP" "$IRONLINK_TOKEN" ota "$OPK" lk-ota-01 "$OS" 127.0.0.1 "$MQTT_PORT" "$OPKG" "$WORK/ota"
check "CLI shows the linkkit device's OTA history" \
    bash -c "'$BIN' ota device '$OPK' lk-ota-01 | grep -q succeeded"

# Gateway: a linkkit gateway adds and logs in two sub-devices and posts for them over its one
# connection.
GPK=$("$BIN" product create gw-interop --node-type gateway --json | json "['product_key']")
SPK=$("$BIN" product create sub-interop --node-type sub-device --json | json "['product_key']")
"$BIN" product thing-model "$SPK" --import "$HERE/thing-model.json" >/dev/null
"$BIN" device create "$GPK" lk-gw0001 >/dev/null
"$BIN" device create "$SPK" lk-sub001 >/dev/null
"$BIN" device create "$SPK" lk-sub002 >/dev/null
secret_of() { "$BIN" device credentials "$1" "$2" --json | json "['device_secret']"; }
check "aliyun-iot-linkkit gateway: topo/add, batch_login, sub-device properties over one connection" \
    "$PY" "$HERE/linkkit_device.py" "$HTTP" "$IRONLINK_TOKEN" gateway "$GPK" lk-gw0001 "$(secret_of "$GPK" lk-gw0001)" \
    "$SPK" lk-sub001 "$(secret_of "$SPK" lk-sub001)" lk-sub002 "$(secret_of "$SPK" lk-sub002)" 127.0.0.1 "$MQTT_PORT"

# Applications: a Qpid Proton consumer (Alibaba's sample structure) receives property posts and
# lifecycle messages of a consumer group over AMQP with TLS.
APK=$("$BIN" product create amqp-interop --json | json "['product_key']")
"$BIN" device create "$APK" amqp-dev01 >/dev/null
AK=$("$BIN" app access-key create --json)
AKID=$(json "['access_key_id']" <<<"$AK"); AKSECRET=$(json "['access_key_secret']" <<<"$AK")
GID=$("$BIN" app group create interop-group --json | json "['group_id']")
"$BIN" app subscribe "$APK" "$GID" property status >/dev/null
amqp_consumer() {
    "$PY" "$HERE/amqp_consumer.py" localhost "$AMQPS_PORT" "$CA" "$AKID" "$AKSECRET" "$GID" 3 >"$WORK/amqp.txt" 2>&1 &
    local consumer=$!
    for _ in $(seq 1 200); do grep -q READY "$WORK/amqp.txt" && break; sleep 0.05; done
    local c; c=$("$BIN" device credentials "$APK" amqp-dev01 --json)
    for i in 1 2 3; do
        mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -i "$(json "['client_id']" <<<"$c")" -u "$(json "['username']" <<<"$c")" \
            -P "$(json "['password']" <<<"$c")" -q 1 -t "/sys/$APK/amqp-dev01/thing/event/property/post" \
            -m "{\"id\":\"$i\",\"params\":{\"v\":$i}}" || return 1
    done
    wait "$consumer"; local rc=$?
    cat "$WORK/amqp.txt"
    [ $rc -eq 0 ] && grep -q '"/as/mqtt/status/' "$WORK/amqp.txt"
}
check "python-qpid-proton consumer (AMQP over TLS, aksign) receives property posts and lifecycle messages" amqp_consumer

# Two consumers of one group: the first takes messages and never settles them, then is killed
# (kill -9); every message still reaches the second.
post_amqp() { # from, to
    local c; c=$("$BIN" device credentials "$APK" amqp-dev01 --json)
    for i in $(seq "$1" "$2"); do
        mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -i "$(json "['client_id']" <<<"$c")" -u "$(json "['username']" <<<"$c")" \
            -P "$(json "['password']" <<<"$c")" -q 1 -t "/sys/$APK/amqp-dev01/thing/event/property/post" \
            -m "{\"id\":\"$i\",\"params\":{\"v\":$i}}" || return 1
    done
}
amqp_kill_mid_stream() {
    GID2=$("$BIN" app group create interop-group-2 --json | json "['group_id']")
    "$BIN" app subscribe "$APK" "$GID2" property >/dev/null
    "$PY" "$HERE/amqp_consumer.py" localhost "$AMQPS_PORT" "$CA" "$AKID" "$AKSECRET" "$GID2" 999 hold >"$WORK/holder.txt" 2>&1 &
    local holder=$!
    for _ in $(seq 1 200); do grep -q READY "$WORK/holder.txt" && break; sleep 0.05; done
    post_amqp 101 110 || return 1
    for _ in $(seq 1 200); do [ "$(grep -c thing/event/property/post "$WORK/holder.txt")" -ge 10 ] && break; sleep 0.05; done
    "$PY" "$HERE/amqp_consumer.py" localhost "$AMQPS_PORT" "$CA" "$AKID" "$AKSECRET" "$GID2" 20 >"$WORK/taker.txt" 2>&1 &
    local taker=$!
    for _ in $(seq 1 200); do grep -q READY "$WORK/taker.txt" && break; sleep 0.05; done
    kill -9 "$holder"; wait "$holder" 2>/dev/null
    post_amqp 111 120 || return 1
    wait "$taker"; local rc=$?
    echo "holder got $(grep -c thing/event/property/post "$WORK/holder.txt") unsettled"; tail -1 "$WORK/taker.txt"
    return $rc
}
check "AMQP: a consumer killed with 10 unsettled messages loses none; the other consumer of the group gets all 20" amqp_kill_mid_stream

refusal() { # case, expected condition
    "$PY" "$HERE/amqp_refusals.py" localhost "$AMQPS_PORT" "$CA" "$AKID" "$AKSECRET" "$GID" "$1" | tee /dev/stderr | grep -q "$2"
}
check "AMQP refuses a wrong signature (amqp:unauthorized-access)" refusal wrong-signature unauthorized-access
check "AMQP refuses an unknown consumer group (amqp:unauthorized-access)" refusal unknown-group unauthorized-access
check "AMQP refuses a sender link (amqp:not-allowed)" refusal sender-link not-allowed
check "AMQP refuses a second receiver link (amqp:resource-limit-exceeded)" refusal second-link resource-limit-exceeded
check "AMQP closes a connection without a receiver link in time (amqp:not-allowed)" refusal no-link not-allowed

# Edge gateway: a pymodbus field device (every data type and word order, coils, discrete and
# input registers) over Modbus TCP, and a pymodbus RTU bus with two unit ids on a socat pty
# pair; ironlink-edge polls both and forwards as an Alink gateway; the cloud's API must show
# the values pymodbus holds; cloud writes land in pymodbus, cross-checked with mbpoll.
EDGE_BIN="$(dirname "$BIN")/ironlink-edge"
MB="$WORK/modbus"; mkdir -p "$MB"
socat -d pty,raw,echo=0,link="$MB/ttyField" pty,raw,echo=0,link="$MB/ttyEdge" 2>"$MB/socat.log" &
SOCAT_PID=$!
for _ in $(seq 1 100); do [ -e "$MB/ttyEdge" ] && break; sleep 0.05; done
"$PY" "$HERE/modbus_field.py" "$MB" --rtu "$MB/ttyField" >"$MB/field.log" 2>&1 &
FIELD_PID=$!
for _ in $(seq 1 200); do [ -s "$MB/port" ] && break; sleep 0.05; done
FIELD_PORT=$(cat "$MB/port" 2>/dev/null)
EGPK=$("$BIN" product create edge-interop --node-type gateway --json | json "['product_key']")
ESPK=$("$BIN" product create modbus-interop --node-type sub-device --json | json "['product_key']")
"$BIN" device create "$EGPK" edge-int01 >/dev/null
for d in plc-tcp01 rtu-unit1 rtu-unit2; do "$BIN" device create "$ESPK" "$d" >/dev/null; done
rtu_device() { # name, unit
    printf '\n[[devices]]\nname = "%s"\nproduct_key = "%s"\ndevice_secret = "%s"\ntransport = "rtu"\nserial = "%s"\nbaud = 19200\nunit_id = %s\npoll_interval = "200ms"\n' \
        "$1" "$ESPK" "$(secret_of "$ESPK" "$1")" "$MB/ttyEdge" "$2"
    cat "$MB/rtu-points.toml"
}
{
    printf '[gateway]\nproduct_key = "%s"\ndevice_name = "edge-int01"\ndevice_secret = "%s"\n' "$EGPK" "$(secret_of "$EGPK" edge-int01)"
    printf '[uplink]\nhost = "127.0.0.1"\nport = %s\ntls = true\nca_file = "%s"\n' "$MQTTS_PORT" "$CA"
    printf '[queue]\ndir = "%s"\n' "$MB/queue"
    STATUS_PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    printf '[status]\nlisten = "127.0.0.1:%s"\n' "$STATUS_PORT"
    echo "$STATUS_PORT" >"$MB/status_port"
    printf '\n[[devices]]\nname = "plc-tcp01"\nproduct_key = "%s"\ndevice_secret = "%s"\ntransport = "tcp"\naddress = "127.0.0.1:%s"\npoll_interval = "200ms"\n' \
        "$ESPK" "$(secret_of "$ESPK" plc-tcp01)" "$FIELD_PORT"
    cat "$MB/points.toml"
    rtu_device rtu-unit1 1
    rtu_device rtu-unit2 2
    # GB/T 32960 vehicles on the same edge (product with the shipped thing model).
    VPK=$("$BIN" product create gb32960-interop --node-type sub-device --dynamic-register --json | json "['product_key']")
    "$BIN" product thing-model "$VPK" --import "$HERE/../../docs/tsl-templates/gb32960-vehicle.json" >/dev/null
    GB_PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    printf '\n[gb32960]\nlisten = "127.0.0.1:%s"\nproduct_key = "%s"\n' "$GB_PORT" "$VPK"
    echo "$VPK $GB_PORT" >"$MB/gb32960"
    # LoRa nodes (ABP) on the same edge.
    LPK=$("$BIN" product create lora-interop --node-type sub-device --dynamic-register --json | json "['product_key']")
    LORA_PORT=$("$PY" -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    printf '\n[lorawan]\nlisten = "127.0.0.1:%s"\nproduct_key = "%s"\n' "$LORA_PORT" "$LPK"
    printf '[[lorawan.devices]]\ndev_eui = "70B3D57ED0000042"\ndev_addr = "26011BDA"\nnwk_skey = "44024241ed4ce9a68c6a8bc055233fd3"\napp_skey = "ec925802ae430ca77fd3dd73cb2cc588"\n'
    echo "$LPK $LORA_PORT" >"$MB/lorawan"
    # NB-IoT devices over CoAP on the same edge.
    CPK=$("$BIN" product create coap-interop --node-type sub-device --dynamic-register --json | json "['product_key']")
    "$BIN" device create "$CPK" nb-aio01 >/dev/null
    "$BIN" device create "$CPK" nb-lib01 >/dev/null
    "$BIN" device create "$CPK" nb-ota01 >/dev/null
    COAP_PORT=$("$PY" -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    printf '\n[coap]\nlisten = "127.0.0.1:%s"\nproduct_key = "%s"\n' "$COAP_PORT" "$CPK"
    echo "$CPK $COAP_PORT" >"$MB/coap"
} >"$MB/edge.toml"
read -r VPK GB_PORT <"$MB/gb32960"
read -r LPK LORA_PORT <"$MB/lorawan"
read -r CPK COAP_PORT <"$MB/coap"
"$EDGE_BIN" run --config "$MB/edge.toml" >"$MB/edge.out" 2>&1 &
EDGE_PID=$!

edge_values() { # every value pymodbus holds shows in the cloud, as the right type
    "$PY" - "$HTTP" "$IRONLINK_TOKEN" "$ESPK" "$MB/expected.json" <<'PYEOF'
import json, sys, time, urllib.request
http, token, pk, expected = sys.argv[1:]
want = json.load(open(expected))["values"]
def props():
    req = urllib.request.Request(f"{http}/api/v1/devices/{pk}/plc-tcp01/properties",
                                 headers={"Authorization": f"Bearer {token}"})
    return {p["identifier"]: p["value"] for p in json.load(urllib.request.urlopen(req))["properties"]}
deadline = time.time() + 30
while True:
    got = props()
    bad = {k: (v, got.get(k)) for k, v in want.items()
           if not (k in got and (got[k] == v if isinstance(v, (int, str))
                                 else abs(got[k] - v) <= abs(v) * 1e-6 + 1e-9))}
    if not bad:
        print(f"{len(want)} points match"); break
    if time.time() > deadline:
        print("mismatched (want, got):", bad); sys.exit(1)
    time.sleep(0.2)
PYEOF
}
check "ironlink-edge reads every data type and word order, coils, inputs from pymodbus (TCP) into the cloud" edge_values

STATUS_PORT=$(cat "$MB/status_port")
metrics_lint() { # promtool (Prometheus) accepts both /metrics documents: HELP, types, names
    curl -sf "$HTTP/metrics" >"$WORK/cloud.prom" && promtool check metrics <"$WORK/cloud.prom" &&
        grep -q '^ironlink_api_request_duration_seconds_bucket' "$WORK/cloud.prom" &&
        curl -sf "http://127.0.0.1:$STATUS_PORT/metrics" >"$WORK/edge.prom" && promtool check metrics <"$WORK/edge.prom" &&
        grep -q '^ironlink_edge_modbus_poll_duration_seconds_bucket' "$WORK/edge.prom" &&
        grep -q '^ironlink_edge_uplink_ack_duration_seconds_bucket' "$WORK/edge.prom" &&
        curl -sf "http://127.0.0.1:$STATUS_PORT/healthz" | grep -q '"ok"'
}
check "promtool check metrics: cloud and edge /metrics are clean, with latency histograms; edge /healthz ok" metrics_lint

edge_writes() { # property set -> Modbus write; mbpoll reads what pymodbus now holds
    local sp mode
    sp=$(json "['setpoint']" <"$MB/expected.json"); mode=$(json "['mode']" <"$MB/expected.json")
    "$BIN" device set "$ESPK" plc-tcp01 '{"setpoint": 42.5, "mode": 7, "coil1": 1}' --timeout-ms 10000 | tee /dev/stderr | grep -q succeeded || return 1
    # mbpoll: 1-based references; its float default is the low word first (CDAB).
    mbpoll -m tcp -p "$FIELD_PORT" -a 1 -t 4:float -r $((sp + 1)) -c 1 -1 127.0.0.1 | tee /dev/stderr | grep -q "42.5" &&
        mbpoll -m tcp -p "$FIELD_PORT" -a 1 -t 4 -r $((mode + 1)) -c 1 -1 127.0.0.1 | tee /dev/stderr | grep -Eq "^\[$((mode + 1))\]:\s+7$" &&
        mbpoll -m tcp -p "$FIELD_PORT" -a 1 -t 0 -r 2 -c 1 -1 127.0.0.1 | tee /dev/stderr | grep -Eq "^\[2\]:\s+1$"
}
check "a cloud property set becomes FC16/FC05 writes in pymodbus, cross-checked with mbpoll" edge_writes

edge_rtu() { # two unit ids on one RTU bus, each its own sub-device
    for _ in $(seq 1 150); do
        "$BIN" device properties "$ESPK" rtu-unit1 --json | grep -q 1111 &&
            "$BIN" device properties "$ESPK" rtu-unit2 --json | grep -q 2222 && return 0
        sleep 0.2
    done
    "$BIN" device properties "$ESPK" rtu-unit1 --json; "$BIN" device properties "$ESPK" rtu-unit2 --json
    tail -20 "$MB/edge.out"; return 1
}
check "ironlink-edge polls two unit ids on one Modbus RTU bus (pymodbus over a socat pty pair)" edge_rtu

gb32960_rtm() {
    "$PY" "$HERE/gb32960_rtm.py" "$HTTP" "$IRONLINK_TOKEN" "$VPK" "$GB_PORT" || { tail -20 "$MB/edge.out"; return 1; }
}
check "GB/T 32960: frames built by rtm-con reach the cloud through ironlink-edge; its answers parse in rtm-con" gb32960_rtm

lora_packet() {
    node "$HERE/lora_packet.js" "$LORA_PORT" "$HTTP" "$IRONLINK_TOKEN" "$LPK" || { tail -20 "$MB/edge.out"; return 1; }
}
check "LoRaWAN: a confirmed uplink built by lora-packet (npm) reaches the cloud through a forwarder's UDP; lora-packet verifies the ACK downlink" lora_packet

coap_devices() {
    "$PY" "$HERE/coap_devices.py" "$HTTP" "$IRONLINK_TOKEN" "$CPK" "$COAP_PORT" \
        nb-aio01 "$(secret_of "$CPK" nb-aio01)" nb-lib01 "$(secret_of "$CPK" nb-lib01)" || { tail -20 "$MB/edge.out"; return 1; }
}
check "CoAP: aiocoap and coap-client-notls authenticate (Alibaba /auth) and post through ironlink-edge into the cloud" coap_devices

coap_ota() {
    head -c 20000 /dev/urandom >"$WORK/nb-2.0.0.bin"
    local pkg
    pkg=$("$BIN" ota package upload --product "$CPK" --version 2.0.0 "$WORK/nb-2.0.0.bin" --json | json "['id']")
    "$PY" "$HERE/coap_ota.py" "$HTTP" "$IRONLINK_TOKEN" "$CPK" "$COAP_PORT" \
        nb-ota01 "$(secret_of "$CPK" nb-ota01)" "$pkg" "$WORK/nb-2.0.0.bin" || { tail -20 "$MB/edge.out"; return 1; }
}
check "CoAP OTA through ironlink-edge: aiocoap pulls firmware/get, downloads block-wise from the gateway (coap-client-notls too), reports progress and 2.0.0; the campaign succeeds" coap_ota
kill "$EDGE_PID" "$FIELD_PID" "$SOCAT_PID" 2>/dev/null
wait "$EDGE_PID" "$FIELD_PID" "$SOCAT_PID" 2>/dev/null

echo "interop: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
