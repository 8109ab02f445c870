"""Interop: Alibaba's Python device SDK (aliyun-iot-linkkit) against Ironlink.

Modes:
  connect PK DN SECRET HOST PORT            one-device-one-secret over TCP (securemode=3):
                                            connect, publish on a user topic, receive a downlink
                                            sent through Ironlink's API, disconnect.
  register PK DN PRODUCT_SECRET HOST PORT CA  dynamic registration (authType=register) over
                                            TLS; prints the device secret Ironlink returned.
Prints one JSON line with the outcome; exits non-zero on failure. Every wait is bounded.
"""
import json
import sys
import threading
import urllib.request

from linkkit import linkkit

TIMEOUT = 20


def api(method, path, body=None):
    url = "%s/api/v1%s" % (API, path)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return json.loads(r.read())


def connect(pk, dn, secret, host, port):
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
    lk.config_mqtt(port=port, secure="", endpoint=host, keep_alive=60)
    connected, subscribed, got = threading.Event(), threading.Event(), threading.Event()
    received = {}

    def on_connect(session_flag, rc, userdata):
        if rc == 0:
            connected.set()

    def on_subscribe_topic(mid, granted_qos, userdata):
        subscribed.set()

    def on_topic_message(topic, payload, qos, userdata):
        received["topic"], received["payload"] = topic, payload.decode()
        got.set()

    lk.on_connect = on_connect
    lk.on_subscribe_topic = on_subscribe_topic
    lk.on_topic_message = on_topic_message
    lk.connect_async()
    if not connected.wait(TIMEOUT):
        raise SystemExit("linkkit did not connect")
    device = api("GET", "/devices/%s/%s" % (pk, dn))
    user_topic = "/%s/%s/user/get" % (pk, dn)
    lk.subscribe_topic(user_topic, 1)
    if not subscribed.wait(TIMEOUT):
        raise SystemExit("linkkit subscription not acknowledged")
    api("POST", "/devices/%s/%s/messages" % (pk, dn), {"topic": user_topic, "payload": "hello-linkkit", "qos": 1})
    if not got.wait(TIMEOUT):
        raise SystemExit("downlink not received by linkkit")
    lk.disconnect()
    print(json.dumps({"status_while_connected": device["status"], "downlink": received}))
    if device["status"] != "online" or received.get("payload") != "hello-linkkit":
        raise SystemExit(1)


def register(pk, dn, product_secret, host, port, ca):
    with open(ca) as f:
        cadata = f.read()
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret="",
                         auth_type="register", product_secret=product_secret)
    lk.config_mqtt(port=port, secure="TLS", endpoint=host, cadata=cadata)
    done = threading.Event()
    result = {}

    def on_device_dynamic_register(rc, value, userdata):
        result["rc"], result["secret"] = rc, value
        done.set()

    lk.on_device_dynamic_register = on_device_dynamic_register
    lk.connect_async()
    if not done.wait(TIMEOUT):
        raise SystemExit("no dynamic registration answer")
    lk.destruct()
    print(json.dumps(result))
    if result["rc"] != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    API, TOKEN = sys.argv[1], sys.argv[2]
    mode, args = sys.argv[3], sys.argv[4:]
    if mode == "connect":
        connect(args[0], args[1], args[2], args[3], int(args[4]))
    elif mode == "register":
        register(args[0], args[1], args[2], args[3], int(args[4]), args[5])
    else:
        raise SystemExit("unknown mode " + mode)
