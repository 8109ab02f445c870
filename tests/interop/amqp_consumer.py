"""Interop: an application on Apache Qpid Proton (python-qpid-proton, PyPI), written the way
Alibaba's public server-side subscription sample is, consumes Ironlink's consumer-group messages
over AMQP 1.0 with TLS.

Usage: amqp_consumer.py HOST PORT CA ACCESS_KEY_ID ACCESS_KEY_SECRET GROUP_ID EXPECT [hold]
Prints READY once its receiver link is open, then one JSON line per message, then a summary
line; exits 0 once EXPECT distinct property messages (by their `v` value) arrived, non-zero on
failure. With `hold`, it accepts nothing (for a test that kills it with messages unsettled).
Bounded in time.
"""
import base64
import hashlib
import hmac
import json
import sys
import time

from proton import SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container

TIMEOUT = 30


def current_time_millis():
    return str(int(round(time.time() * 1000)))


def do_sign(secret, content):
    return base64.b64encode(hmac.new(secret.encode(), content.encode(), hashlib.sha1).digest()).decode()


class AmqpClient(MessagingHandler):
    def __init__(self, host, port, ca, access_key, access_secret, group, expect, hold=False):
        super().__init__(auto_accept=not hold)
        self.hold, self.values = hold, set()
        self.url = "amqps://%s:%d" % (host, port)
        self.ca, self.access_key, self.access_secret = ca, access_key, access_secret
        self.group, self.expect = group, expect
        self.properties, self.lifecycle, self.ok = 0, 0, False

    def on_start(self, event):
        client_id = "interop-app"
        timestamp = current_time_millis()
        user = "%s|authMode=aksign,signMethod=hmacsha1,timestamp=%s,authId=%s,iotInstanceId=,consumerGroupId=%s|" % (
            client_id, timestamp, self.access_key, self.group)
        password = do_sign(self.access_secret, "authId=%s&timestamp=%s" % (self.access_key, timestamp))
        ssl = SSLDomain(SSLDomain.MODE_CLIENT)
        ssl.set_trusted_ca_db(self.ca)
        ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        conn = event.container.connect(self.url, user=user, password=password, heartbeat=60,
                                       ssl_domain=ssl, sasl_enabled=True, allowed_mechs="PLAIN")
        self.receiver = event.container.create_receiver(conn)
        event.container.schedule(TIMEOUT, self)

    def on_link_opened(self, event):
        print("READY", flush=True)

    def on_message(self, event):
        props = event.message.properties or {}
        body = event.message.body
        if isinstance(body, memoryview):
            body = body.tobytes()
        text = body.decode() if isinstance(body, (bytes, bytearray)) else str(body)
        print(json.dumps({"topic": props.get("topic"), "messageId": props.get("messageId"),
                          "generateTime": props.get("generateTime"), "body": text}), flush=True)
        topic = props.get("topic") or ""
        if topic.endswith("/thing/event/property/post"):
            self.properties += 1
            try:
                self.values.add(json.loads(text)["items"]["v"]["value"])
            except (ValueError, KeyError, TypeError):
                pass
        elif topic.startswith("/as/mqtt/status/"):
            self.lifecycle += 1
        if not self.hold and len(self.values) >= self.expect:
            self.ok = True
            event.connection.close()
            event.container.stop()

    def on_timer_task(self, event):
        print("timed out", flush=True)
        event.container.stop()

    def on_transport_error(self, event):
        print("transport error: %s" % event.transport.condition, flush=True)


if __name__ == "__main__":
    host, port, ca, ak, secret, group, expect = sys.argv[1:8]
    hold = len(sys.argv) > 8 and sys.argv[8] == "hold"
    client = AmqpClient(host, int(port), ca, ak, secret, group, int(expect), hold)
    Container(client).run()
    print(json.dumps({"properties": client.properties, "distinct": len(client.values),
                      "lifecycle": client.lifecycle}), flush=True)
    sys.exit(0 if client.ok else 1)
