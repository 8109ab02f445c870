"""NB-IoT devices over CoAP with clients we did not write, against ironlink-edge's CoAP server:
aiocoap (PyPI) and coap-client-notls (Debian libcoap3-bin). Each authenticates with Alibaba's
/auth (the signature computed here with Python's hmac module) and posts a property with the
token in option 2088; the values must show in the cloud's API.

Usage: coap_devices.py HTTP_BASE TOKEN PRODUCT_KEY EDGE_COAP_PORT DN1 SECRET1 DN2 SECRET2
"""

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time
import urllib.request

import aiocoap
from aiocoap.optiontypes import OpaqueOption

http, api_token, pk, port, dn1, s1, dn2, s2 = sys.argv[1:]
BASE = f"coap://127.0.0.1:{port}"


def auth_body(dn, secret):
    fields = {"productKey": pk, "deviceName": dn, "clientId": f"{pk}&{dn}", "timestamp": str(int(time.time() * 1000))}
    content = "".join(k + fields[k] for k in sorted(fields))
    fields["sign"] = hmac.new(secret.encode(), content.encode(), hashlib.sha1).hexdigest()
    fields["signmethod"] = "hmacsha1"
    return json.dumps(fields).encode()


def post_body(value):
    return json.dumps({"id": "1", "version": "1.0", "params": {"temperature": value}}).encode()


async def with_aiocoap():
    ctx = await aiocoap.Context.create_client_context()
    r = await ctx.request(aiocoap.Message(code=aiocoap.POST, uri=f"{BASE}/auth", payload=auth_body(dn1, s1))).response
    assert str(r.code) == "2.05 Content", (r.code, r.payload)
    token = json.loads(r.payload)["token"]
    m = aiocoap.Message(code=aiocoap.POST, uri=f"{BASE}/topic/sys/{pk}/{dn1}/thing/event/property/post",
                        payload=post_body(31.5))
    m.opt.add_option(OpaqueOption(2088, token.encode()))
    r = await ctx.request(m).response
    assert str(r.code) == "2.04 Changed", (r.code, r.payload)
    # Without the token: 4.01.
    m = aiocoap.Message(code=aiocoap.POST, uri=f"{BASE}/topic/sys/{pk}/{dn1}/thing/event/property/post",
                        payload=post_body(0))
    r = await ctx.request(m).response
    assert str(r.code) == "4.01 Unauthorized", r.code
    await ctx.shutdown()
    print("aiocoap: /auth, post with option 2088, 4.01 without it")


def with_libcoap():
    out = subprocess.run(["coap-client-notls", "-m", "post", "-t", "json", "-e", auth_body(dn2, s2).decode(),
                          f"{BASE}/auth"], capture_output=True, text=True, timeout=20)
    token = json.loads(out.stdout.strip().splitlines()[-1])["token"]
    out = subprocess.run(["coap-client-notls", "-m", "post", "-t", "json", "-O", f"2088,{token}",
                          "-e", post_body(32.5).decode(),
                          f"{BASE}/topic/sys/{pk}/{dn2}/thing/event/property/post"],
                         capture_output=True, text=True, timeout=20)
    assert '"code":200' in out.stdout.replace(" ", ""), (out.stdout, out.stderr)
    print("coap-client-notls: /auth, post with option 2088")


def props(dn):
    req = urllib.request.Request(f"{http}/api/v1/devices/{pk}/{dn}/properties",
                                 headers={"Authorization": f"Bearer {api_token}"})
    return {p["identifier"]: p["value"] for p in json.load(urllib.request.urlopen(req))["properties"]}


asyncio.run(with_aiocoap())
with_libcoap()
deadline = time.time() + 30
while True:
    got = (props(dn1).get("temperature"), props(dn2).get("temperature"))
    if got == (31.5, 32.5):
        print("both values in the cloud")
        break
    if time.time() > deadline:
        sys.exit(f"values in the cloud: {got}")
    time.sleep(0.2)
