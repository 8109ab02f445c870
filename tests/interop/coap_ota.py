"""An NB-IoT device upgraded through ironlink-edge over CoAP, with clients we did not write:
aiocoap (PyPI) authenticates (Alibaba /auth), informs version 1.0.0, asks
thing/ota/firmware/get until the gateway holds the campaign's image, downloads it block-wise
(RFC 7959 Block2, aiocoap's own reassembly) and checks its Md5 against the notice's sign;
coap-client-notls (Debian libcoap3-bin) downloads the same image with 64-byte blocks; a wrong
token is 4.04. The device reports progress and informs 2.0.0: the campaign succeeds.

Usage: coap_ota.py HTTP_BASE TOKEN PRODUCT_KEY EDGE_COAP_PORT DN SECRET PACKAGE_ID IMAGE
"""

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import tempfile
import time
import urllib.request

import aiocoap
from aiocoap.optiontypes import OpaqueOption

http, api_token, pk, port, dn, secret, package, image_path = sys.argv[1:]
BASE = f"coap://127.0.0.1:{port}"
image = open(image_path, "rb").read()


def api(method, path, body=None):
    req = urllib.request.Request(f"{http}/api/v1{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {api_token}",
                                          "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


async def post(ctx, token, topic, body):
    m = aiocoap.Message(code=aiocoap.POST, uri=f"{BASE}/topic{topic}", payload=json.dumps(body).encode())
    m.opt.add_option(OpaqueOption(2088, token.encode()))
    r = await ctx.request(m).response
    assert r.code.is_successful(), (topic, r.code, r.payload)
    return json.loads(r.payload)


async def main():
    ctx = await aiocoap.Context.create_client_context()
    fields = {"productKey": pk, "deviceName": dn, "clientId": f"{pk}&{dn}", "timestamp": str(int(time.time() * 1000))}
    content = "".join(k + fields[k] for k in sorted(fields))
    fields["sign"] = hmac.new(secret.encode(), content.encode(), hashlib.sha256).hexdigest()
    fields["signmethod"] = "hmacsha256"
    r = await ctx.request(aiocoap.Message(code=aiocoap.POST, uri=f"{BASE}/auth", payload=json.dumps(fields).encode())).response
    assert str(r.code) == "2.05 Content", (r.code, r.payload)
    token = json.loads(r.payload)["token"]

    await post(ctx, token, f"/ota/device/inform/{pk}/{dn}", {"id": "1", "params": {"version": "1.0.0", "module": "default"}})
    campaign = api("POST", "/ota/campaigns", {"name": f"coap-{dn}", "package_id": package,
                                              "target": {"devices": [dn]}, "policy": {"retries": 0}})["id"]
    # The gateway fetches the image, then offers it.
    deadline = time.time() + 60
    while True:
        got = await post(ctx, token, f"/sys/{pk}/{dn}/thing/ota/firmware/get", {"id": "2", "params": {"module": "default"}})
        data = got["data"]
        if data.get("url"):
            break
        assert time.time() < deadline, f"no upgrade offered: {got}"
        await asyncio.sleep(0.3)
    assert data["version"] == "2.0.0" and int(data["size"]) == len(image), data
    assert data["url"].startswith(f"coap://127.0.0.1:{port}/ota/"), data
    print("firmware/get answers the gateway's coap:// URL")

    r = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=data["url"])).response
    assert str(r.code) == "2.05 Content", r.code
    assert r.payload == image, (len(r.payload), len(image))
    assert hashlib.md5(r.payload).hexdigest() == data["sign"].lower(), data
    print(f"aiocoap: {len(r.payload)} bytes block-wise, Md5 matches the notice")
    await post(ctx, token, f"/ota/device/progress/{pk}/{dn}", {"id": "3", "params": {"step": "60", "desc": "downloaded", "module": "default"}})

    with tempfile.NamedTemporaryFile() as f:
        out = subprocess.run(["coap-client-notls", "-m", "get", "-b", "64", "-o", f.name, data["url"]],
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out
        got = open(f.name, "rb").read()
        assert got == image, (len(got), len(image), out.stderr)
    print("coap-client-notls: the same image with 64-byte blocks")

    r = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=f"{BASE}/ota/00000000000000000000000000000000")).response
    assert str(r.code) == "4.04 Not Found", r.code

    await post(ctx, token, f"/ota/device/progress/{pk}/{dn}", {"id": "4", "params": {"step": "100", "desc": "flashing", "module": "default"}})
    await post(ctx, token, f"/ota/device/inform/{pk}/{dn}", {"id": "5", "params": {"version": "2.0.0", "module": "default"}})
    deadline = time.time() + 60
    while True:
        c = api("GET", f"/ota/campaigns/{campaign}")
        if c["state"] == "finished":
            break
        assert time.time() < deadline, c
        await asyncio.sleep(0.3)
    assert c["states"].get("succeeded") == 1, c
    # The offer ended with the inform: the image is no longer served.
    r = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=data["url"])).response
    assert str(r.code) == "4.04 Not Found", r.code
    await ctx.shutdown()
    print("campaign succeeded; the image is no longer served")


asyncio.run(main())
