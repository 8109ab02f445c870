"""Loads a day of history into one device, as the device would send it: property posts over
MQTT (paho-mqtt, QoS 1), each carrying every property with its own time, one post per second
of the day. For the console benchmark (cloud/console/tests/bench.mjs).

Usage: history_loader.py PK DN SECRET HOST PORT PROPS SECONDS [LIVE]
  PROPS properties named p0..p{PROPS-1} (floats, smooth and noisy), SECONDS posts at 1 Hz ending
  now; then, with LIVE, a post every 0.5 s with the current time for LIVE seconds (at most 300).
  Prints one JSON line: posts, acknowledged, seconds taken (took_s). Every wait is bounded.
"""
import hashlib
import hmac
import json
import math
import random
import sys
import threading
import time

import paho.mqtt.client as mqtt


def params_at(i, props, at, rnd):
    params = {}
    for p in range(props):
        smooth = 20 + 5 * math.sin(2 * math.pi * (i / 86400.0 + p / props))
        params["p%d" % p] = {"value": round(smooth + (rnd.gauss(0, 0.5) if p % 2 else 0), 3), "time": at}
    return params


def main(pk, dn, secret, host, port, props, seconds, live):
    cid = dn
    content = "clientId%sdeviceName%sproductKey%s" % (cid, dn, pk)
    password = hmac.new(secret.encode(), content.encode(), hashlib.sha256).hexdigest()
    c = mqtt.Client(client_id="%s|securemode=3,signmethod=hmacsha256|" % cid, clean_session=True)
    c.username_pw_set("%s&%s" % (dn, pk), password)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    acked = [0]
    lock = threading.Lock()

    def on_connect(client, userdata, flags, rc):
        if rc == 0:
            connected.set()

    def on_publish(client, userdata, mid):
        with lock:
            acked[0] += 1

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not connected.wait(20):
        raise SystemExit("not connected")
    topic = "/sys/%s/%s/thing/event/property/post" % (pk, dn)
    end = int(time.time() * 1000) // 1000 * 1000
    start = end - seconds * 1000
    rnd = random.Random(1)
    t0 = time.time()
    for i in range(seconds):
        params = params_at(i, props, start + i * 1000, rnd)
        c.publish(topic, json.dumps({"id": str(i), "version": "1.0", "params": params}), qos=1)
        # Keep at most a few thousand posts ahead of the acknowledgements.
        while i - acked[0] > 5000:
            time.sleep(0.001)
    deadline = time.time() + 300
    while acked[0] < seconds and time.time() < deadline:
        time.sleep(0.01)
    took = time.time() - t0
    live_end = time.time() + min(live, 300)
    i = seconds
    while time.time() < live_end:
        params = params_at(i, props, int(time.time() * 1000), rnd)
        c.publish(topic, json.dumps({"id": str(i), "version": "1.0", "params": params}), qos=1)
        i += 1
        time.sleep(0.5)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"posts": seconds, "acknowledged": acked[0], "took_s": round(took, 1)}))
    if acked[0] < seconds:
        raise SystemExit(1)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), int(a[6]), int(a[7]) if len(a) > 7 else 0)
