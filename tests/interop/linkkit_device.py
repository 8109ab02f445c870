"""Interop: Alibaba's Python device SDK (aliyun-iot-linkkit) against Ironlink.

Modes:
  connect PK DN SECRET HOST PORT            one-device-one-secret over TCP (securemode=3):
                                            connect, publish on a user topic, receive a downlink
                                            sent through Ironlink's API, disconnect.
  register PK DN PRODUCT_SECRET HOST PORT CA  dynamic registration (authType=register) over
                                            TLS; prints the device secret Ironlink returned.
  thing PK DN SECRET HOST PORT TSL          thing model: posts properties and an event (replies
                                            must be 200), answers a property set, an async
                                            service call and a sync one (RRPC on /ext/rrpc/...)
                                            started through Ironlink's API.
  gateway GPK GDN GSECRET SPK S1 S1SECRET S2 S2SECRET HOST PORT
                                            adds two sub-devices to its topology, logs them in
                                            and posts a property for each over its one connection.
  ota PK DN SECRET HOST PORT PACKAGE_ID WORKDIR
                                            OTA: reports version 1.0.0 (ota_report_version), a
                                            campaign started through the API pushes the notice
                                            (on_ota_message_arrived), the SDK downloads it and
                                            checks its sign (download_ota_firmware), curl fetches
                                            it again in two ranged pieces (-r, then -C -), the
                                            device pulls the notice too (query_ota_firmware),
                                            reports progress and then the new version; the API
                                            must show the job succeeded.
  console PK DN SECRET HOST PORT TSL SECONDS
                                            the web console's device (cloud/console/tests/e2e.mjs):
                                            posts a temperature every 0.5 s (with its own time,
                                            on the SDK's publish_topic) and answers service
                                            calls with {"done": 1} for SECONDS (bounded), then
                                            disconnects; prints one line per call answered.
Prints one JSON line with the outcome; exits non-zero on failure. Every wait is bounded.
"""
import json
import sys
import threading
import time
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


def wait(event, what):
    if not event.wait(TIMEOUT):
        raise SystemExit("timed out waiting for " + what)


def until(what, probe):
    """Polls the API (bounded) until probe() returns a true value."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        v = probe()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit("timed out waiting for " + what)


def thing(pk, dn, secret, host, port, tsl):
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
    lk.config_mqtt(port=port, secure="", endpoint=host, keep_alive=60)
    lk.thing_setup(tsl)
    enabled, prop_reply, event_reply, changed, called, rrpc_sub = (threading.Event() for _ in range(6))
    seen = {}

    def on_thing_enable(userdata):
        enabled.set()

    def on_thing_prop_post(request_id, code, data, message, userdata):
        seen["prop_post_code"] = code
        prop_reply.set()

    def on_thing_event_post(event, request_id, code, data, message, userdata):
        seen["event_post_code"] = code
        event_reply.set()

    def on_thing_prop_changed(params, userdata):
        seen["set"] = params
        changed.set()

    def on_thing_call_service(identifier, request_id, params, userdata):
        seen.setdefault("services", []).append(identifier)
        lk.thing_answer_service(identifier, request_id, 200, {"done": 1})
        called.set()

    def on_subscribe_topic(mid, granted_qos, userdata):
        rrpc_sub.set()

    lk.on_thing_enable = on_thing_enable
    lk.on_thing_prop_post = on_thing_prop_post
    lk.on_thing_event_post = on_thing_event_post
    lk.on_thing_prop_changed = on_thing_prop_changed
    lk.on_thing_call_service = on_thing_call_service
    lk.on_subscribe_topic = on_subscribe_topic
    lk.connect_async()
    wait(enabled, "thing enabled (connect)")
    lk.thing_post_property({"temperature": 23.5, "humidity": 40})
    wait(prop_reply, "property post reply")
    lk.thing_trigger_event(("alarm", {"level": 2}))
    wait(event_reply, "event post reply")
    latest = api("GET", "/devices/%s/%s/properties" % (pk, dn))["properties"]
    events = api("GET", "/devices/%s/%s/events" % (pk, dn))["events"]
    result = {}
    setter = threading.Thread(target=lambda: result.update(
        set=api("POST", "/devices/%s/%s/properties" % (pk, dn), {"params": {"mode": 1}, "timeout_ms": 15000})))
    setter.start()
    wait(changed, "property set at the device")
    setter.join(TIMEOUT)
    call = api("POST", "/devices/%s/%s/services/reboot" % (pk, dn), {"params": {"delay": 3}})
    wait(called, "service call at the device")
    done = until("service call answer recorded", lambda: (lambda c: c if c["status"] != "pending" else None)(
        api("GET", "/devices/%s/%s/service-calls/%s" % (pk, dn, call["id"]))))
    # Sync service: Ironlink sends it on /ext/rrpc/{id}/sys/... (the client id says ext=1) and
    # the API call returns the SDK's answer.
    # The SDK has no public callback for RRPC subscriptions: a user-topic SUBACK that follows
    # it proves it was acknowledged (the broker answers SUBSCRIBEs in order).
    lk.subscribe_rrpc_topic("/sys/%s/%s/thing/service/ping" % (pk, dn))
    lk.subscribe_topic("/%s/%s/user/get" % (pk, dn), 1)
    wait(rrpc_sub, "RRPC subscription")
    sync = api("POST", "/devices/%s/%s/services/ping" % (pk, dn), {"timeout_ms": 15000})
    lk.disconnect()
    out = {"seen": seen, "latest": latest, "events": len(events), "set_status": result.get("set", {}).get("status"),
           "service_status": done["status"], "service_reply": done["reply"], "sync": [sync["status"], sync["reply"]]}
    print(json.dumps(out))
    ok = (seen.get("prop_post_code") == 200 and seen.get("event_post_code") == 200 and len(latest) == 2
          and len(events) == 1 and seen.get("set") == {"mode": 1} and out["set_status"] == "succeeded"
          and done["status"] == "succeeded" and done["reply"] == {"done": 1}
          and out["sync"] == ["succeeded", {"done": 1}] and seen.get("services") == ["reboot", "ping"])
    if not ok:
        raise SystemExit(1)


def gateway(gpk, gdn, gsecret, spk, s1, s1secret, s2, s2secret, host, port):
    lk = linkkit.LinkKit(host_name=host, product_key=gpk, device_name=gdn, device_secret=gsecret)
    lk.config_mqtt(port=port, secure="", endpoint=host, keep_alive=60)
    connected, topo, login = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def on_connect(session_flag, rc, userdata):
        if rc == 0:
            connected.set()

    def on_topo(request_id, code, data, message, userdata):
        seen["topo"] = [code, message]
        topo.set()

    def on_login(request_id, code, data, message, userdata):
        seen["login"] = [code, message]
        login.set()

    lk.on_connect = on_connect
    lk.on_gateway_add_subdev_topo_reply = on_topo
    lk.on_gateway_login_subdev_reply = on_login
    lk.connect_async()
    wait(connected, "gateway connect")
    subs = [[spk, s1, s1secret], [spk, s2, s2secret]]
    lk.gateway_add_subdev_topo(subs)
    wait(topo, "topo/add reply")
    lk.gateway_login_subdev(subs)
    wait(login, "batch_login reply")
    for i, dn in enumerate([s1, s2]):
        body = {"id": str(100 + i), "version": "1.0", "params": {"temperature": 10.0 + i},
                "method": "thing.event.property.post"}
        lk.publish_topic("/sys/%s/%s/thing/event/property/post" % (spk, dn), json.dumps(body), 1)
    values = [until("sub-device %s property stored" % dn,
                    lambda dn=dn: api("GET", "/devices/%s/%s/properties" % (spk, dn))["properties"])
              for dn in [s1, s2]]
    subs_view = api("GET", "/devices/%s/%s/sub-devices" % (gpk, gdn))["sub_devices"]
    lk.disconnect()
    out = {"seen": seen, "values": [v[0]["value"] for v in values], "online": [s["online"] for s in subs_view]}
    print(json.dumps(out))
    if seen.get("topo", [0])[0] != 200 or seen.get("login", [0])[0] != 200 or out["values"] != [10.0, 11.0] \
            or out["online"] != [True, True]:
        raise SystemExit(1)


def ota(pk, dn, secret, host, port, package_id, workdir):
    import hashlib
    import subprocess
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
    lk.config_mqtt(port=port, secure="", endpoint=host, keep_alive=60)
    connected, subscribed = threading.Event(), threading.Event()
    notices = []
    arrived = threading.Condition()

    def on_connect(session_flag, rc, userdata):
        if rc == 0:
            connected.set()

    def on_subscribe_topic(mid, granted_qos, userdata):
        subscribed.set()

    def on_ota_message_arrived(notice_type, version, size, url, sign_method, sign, module, extra):
        with arrived:
            notices.append({"type": notice_type, "version": version, "size": size, "url": url,
                            "sign_method": sign_method, "sign": sign, "module": module})
            arrived.notify_all()

    def wait_notices(n, what):
        with arrived:
            if not arrived.wait_for(lambda: len(notices) >= n, TIMEOUT):
                raise SystemExit("timed out waiting for " + what)

    lk.on_connect = on_connect
    lk.on_subscribe_topic = on_subscribe_topic
    lk.on_ota_message_arrived = on_ota_message_arrived
    lk.connect_async()
    wait(connected, "connect")
    lk.subscribe_topic("/ota/device/upgrade/%s/%s" % (pk, dn), 1)
    wait(subscribed, "subscription to the upgrade topic")
    subscribed.clear()
    lk.subscribe_topic("/sys/%s/%s/thing/ota/firmware/get_reply" % (pk, dn), 1)
    wait(subscribed, "subscription to the firmware/get reply")
    code = lambda rc: getattr(rc, "value", rc)  # the SDK answers with ErrorCode members or ints
    # aliyun-iot-linkkit 1.2.13 compares paho's MQTTMessageInfo with 0, so ota_report_version
    # says OTA_PUB_FAILED although it published: what counts is that Ironlink recorded it.
    lk.ota_report_version("default", "1.0.0")
    until("the reported version", lambda: any(
        m["version"] == "1.0.0" for m in api("GET", "/devices/%s/%s/ota" % (pk, dn))["modules"]))
    campaign = api("POST", "/ota/campaigns", {"name": "linkkit", "package_id": package_id,
                                               "target": {"devices": [dn]}})
    wait_notices(1, "the pushed notice")
    n = notices[0]
    path = "%s/fw.bin" % workdir
    rc = code(lk.download_ota_firmware(n["url"], path, n["sign_method"], n["sign"]))
    if rc != 0:
        raise SystemExit("download_ota_firmware returned %s" % rc)
    progress = "/ota/device/progress/%s/%s" % (pk, dn)
    lk.publish_topic(progress, json.dumps({"id": "2", "params": {"step": "60", "desc": "downloaded"}}), 1)
    # curl resumes: the first 100000 bytes, then the rest from where the file ends.
    part = "%s/curl.bin" % workdir
    subprocess.run(["curl", "-sSf", "-r", "0-99999", "-o", part, n["url"]], check=True, timeout=TIMEOUT)
    first = len(open(part, "rb").read())
    subprocess.run(["curl", "-sSf", "-C", "-", "-o", part, n["url"]], check=True, timeout=TIMEOUT)
    resumed = hashlib.md5(open(part, "rb").read()).hexdigest()
    # The device pulls as well: the same upgrade comes back as a firmware/get reply.
    lk.query_ota_firmware("default")
    wait_notices(2, "the pulled notice")
    lk.publish_topic(progress, json.dumps({"id": "3", "params": {"step": "100", "desc": "flashing"}}), 1)
    until("flashing", lambda: api("GET", "/ota/campaigns/%s" % campaign["id"])["states"]["flashing"] == 1)
    lk.ota_report_version("default", n["version"])
    done = until("the campaign to finish", lambda: (lambda c: c if c["state"] == "finished" else None)(
        api("GET", "/ota/campaigns/%s" % campaign["id"])))
    lk.disconnect()
    out = {"notices": [{"type": x["type"], "version": x["version"], "sign_method": x["sign_method"]} for x in notices],
           "curl_first": first, "curl_resumed_md5_ok": resumed == n["sign"], "campaign": done["state"],
           "states": done["states"]}
    print(json.dumps(out))
    if [x["type"] for x in notices] != [1, 2] or first != 100000 or resumed != n["sign"] \
            or done["states"]["succeeded"] != 1:
        raise SystemExit(1)


def console(pk, dn, secret, host, port, tsl, seconds):
    lk = linkkit.LinkKit(host_name=host, product_key=pk, device_name=dn, device_secret=secret)
    lk.config_mqtt(port=port, secure="", endpoint=host, keep_alive=60)
    lk.thing_setup(tsl)
    enabled = threading.Event()
    lk.on_thing_enable = lambda userdata: enabled.set()

    def on_thing_call_service(identifier, request_id, params, userdata):
        lk.thing_answer_service(identifier, request_id, 200, {"done": 1})
        print(json.dumps({"answered": identifier, "params": params}), flush=True)

    lk.on_thing_call_service = on_thing_call_service
    lk.connect_async()
    wait(enabled, "thing enabled (connect)")
    print(json.dumps({"connected": True}), flush=True)
    deadline = time.time() + min(seconds, 300)
    n = 0
    topic = "/sys/%s/%s/thing/event/property/post" % (pk, dn)
    while time.time() < deadline:
        # Each value with the device's time, so the console can tell how long it took to show.
        now = int(time.time() * 1000)
        post = {"id": str(n), "version": "1.0", "method": "thing.event.property.post",
                "params": {"temperature": {"value": round(20 + 5 * ((n % 20) / 20.0), 2), "time": now},
                           "humidity": {"value": 40 + n % 10, "time": now}}}
        lk.publish_topic(topic, json.dumps(post), 1)
        n += 1
        time.sleep(0.5)
    lk.disconnect()


if __name__ == "__main__":
    API, TOKEN = sys.argv[1], sys.argv[2]
    mode, args = sys.argv[3], sys.argv[4:]
    if mode == "connect":
        connect(args[0], args[1], args[2], args[3], int(args[4]))
    elif mode == "register":
        register(args[0], args[1], args[2], args[3], int(args[4]), args[5])
    elif mode == "thing":
        thing(args[0], args[1], args[2], args[3], int(args[4]), args[5])
    elif mode == "gateway":
        gateway(*args[:8], args[8], int(args[9]))
    elif mode == "console":
        console(args[0], args[1], args[2], args[3], int(args[4]), args[5], float(args[6]))
    elif mode == "ota":
        ota(args[0], args[1], args[2], args[3], int(args[4]), args[5], args[6])
    else:
        raise SystemExit("unknown mode " + mode)
