"""A GB/T 32960 vehicle whose frames are built by rtm-con (PyPI, an independent implementation
of GB/T 32960.3-2016/2025), talking to ironlink-edge's GB/T 32960 server: login, real-time and
re-issued data, heartbeat, time sync, logout. Every answer of the edge must parse in rtm-con
(with its BCC checked) as an OK answer to the right command for this VIN, carrying the time of
what it answers; the values must then show in the cloud's API.

Usage: gb32960_rtm.py HTTP_BASE TOKEN PRODUCT_KEY EDGE_PORT
"""

import datetime
import json
import socket
import sys
import time
import urllib.request

import rtm_con

http, token, pk, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
VIN = "LSVAU2180N2183294"


def frame(msg_type, payload):
    return rtm_con.msg_checked.build(dict(starter="protocol_2016", msg_type=msg_type, ack="command",
                                          vin=VIN, enc="uncrypted", payload=payload))


def read_answer(s):
    buf = b""
    while len(buf) < 24 or len(buf) < 25 + int.from_bytes(buf[22:24], "big"):
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("the edge closed the connection")
        buf += chunk
    return rtm_con.msg_checked.parse(buf[:25 + int.from_bytes(buf[22:24], "big")])


def exchange(s, msg_type, payload, want_time=None):
    s.sendall(frame(msg_type, payload))
    a = read_answer(s)
    assert str(a.msg_type) == msg_type, a
    assert str(a.ack) == "ok", a
    assert a.vin == VIN, a
    if want_time is not None:
        assert a.payload.timestamp == want_time, (a.payload.timestamp, want_time)
    print(f"{msg_type}: answered ok")
    return a


now = datetime.datetime.now().replace(microsecond=0)
earlier = now - datetime.timedelta(minutes=5)
s = socket.create_connection(("127.0.0.1", port), timeout=20)
exchange(s, "login", dict(timestamp=now, session_id=1, iccid="89860117795950089298", bms_total=1,
                          pack_sn_len=5, pack_sn=["PACK1"]), now)


def report(ts, soc, speed):
    vehicle = dict(vehicle_state="on", charge_state="uncharged", operate_state="pure_electric",
                   vehicle_speed=speed, mileage_total=20000.3, voltage_total=401.2, current_total=-12.5,
                   soc=soc, dcdc_state="on", gear_state=dict(driving_force=True, braking_force=False, gear="D"),
                   insulation_resistance=4500, accelerator_padel=30, brake_padel=0)
    gnss = dict(gnss_state=dict(gnss_e_w="e", gnss_n_s="n", gnss_valid=True),
                gnss_lng=116.397128, gnss_lat=39.908692)
    extrema = dict(max_volt_pack_index=1, max_volt_cell_index=17, max_cell_volt=4.012, min_volt_pack_index=1,
                   min_volt_cell_index=3, min_cell_volt=3.987, max_temp_pack_index=1, max_temp_cell_index=4,
                   max_cell_temp=32, min_temp_pack_index=1, min_temp_cell_index=9, min_cell_temp=25)
    return dict(timestamp=ts, data_list=[dict(data_type="whole_vehicle", data_content=vehicle),
                                         dict(data_type="gnss", data_content=gnss),
                                         dict(data_type="pack_extrema", data_content=extrema)])


exchange(s, "realtime", report(now, 66, 72.5), now)
exchange(s, "supplimentary", report(earlier, 90, 10.0), earlier)
exchange(s, "time_sync", b"")
exchange(s, "heartbeat", b"")


def props():
    req = urllib.request.Request(f"{http}/api/v1/devices/{pk}/{VIN}/properties",
                                 headers={"Authorization": f"Bearer {token}"})
    return {p["identifier"]: p["value"] for p in json.load(urllib.request.urlopen(req))["properties"]}


want = {"soc": 66, "speed": 72.5, "totalVoltage": 401.2, "totalCurrent": -12.5, "mileage": 20000.3,
        "latitude": 39.908692, "longitude": 116.397128, "maxCellVoltage": 4.012, "minTemperature": 25,
        "insulation": 4500, "vehicleState": 1, "iccid": "89860117795950089298"}
deadline = time.time() + 30
while True:
    got = props()
    bad = {k: (v, got.get(k)) for k, v in want.items() if got.get(k) != v}
    if not bad:
        print(f"{len(want)} values match in the cloud (the re-issued, older soc=90 did not replace 66)")
        break
    if time.time() > deadline:
        sys.exit(f"mismatched (want, got): {bad}")
    time.sleep(0.2)
exchange(s, "logout", dict(timestamp=now, session_id=1), now)
s.close()
