"""Interop: what Ironlink's AMQP listener refuses, seen from Apache Qpid Proton.

Usage: amqp_refusals.py HOST PORT CA ACCESS_KEY_ID ACCESS_KEY_SECRET GROUP_ID CASE
CASE: wrong-signature | unknown-group | sender-link | second-link | no-link
Prints the error condition the client saw (e.g. amqp:unauthorized-access) and exits 0 once
one was seen; non-zero when the connection was accepted as if nothing were wrong. Bounded.
"""
import base64
import hashlib
import hmac
import sys
import time

from proton import SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container

TIMEOUT = 20


def sign(secret, content):
    return base64.b64encode(hmac.new(secret.encode(), content.encode(), hashlib.sha1).digest()).decode()


class Probe(MessagingHandler):
    def __init__(self, host, port, ca, ak, secret, group, case):
        super().__init__()
        self.url, self.ca, self.ak, self.secret, self.group, self.case = \
            "amqps://%s:%d" % (host, port), ca, ak, secret, group, case
        self.seen = None

    def on_start(self, event):
        ts = str(int(time.time() * 1000))
        group = "no-such-group" if self.case == "unknown-group" else self.group
        user = "probe|authMode=aksign,signMethod=hmacsha1,timestamp=%s,authId=%s,consumerGroupId=%s|" % (ts, self.ak, group)
        password = sign(self.secret, "authId=%s&timestamp=%s" % (self.ak, ts))
        if self.case == "wrong-signature":
            password = sign("not-the-secret", "authId=%s&timestamp=%s" % (self.ak, ts))
        ssl = SSLDomain(SSLDomain.MODE_CLIENT)
        ssl.set_trusted_ca_db(self.ca)
        ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        conn = event.container.connect(self.url, user=user, password=password, heartbeat=60,
                                       ssl_domain=ssl, sasl_enabled=True, allowed_mechs="PLAIN")
        if self.case == "sender-link":
            event.container.create_sender(conn)
        elif self.case == "second-link":
            event.container.create_receiver(conn)
            event.container.create_receiver(conn)
        elif self.case != "no-link":
            event.container.create_receiver(conn)
        event.container.schedule(TIMEOUT, self)

    def record(self, event, condition):
        if condition is not None and self.seen is None:
            self.seen = "%s: %s" % (condition.name, condition.description)
            print(self.seen, flush=True)
            event.container.stop()

    def on_link_error(self, event):
        self.record(event, event.link.remote_condition)

    def on_connection_error(self, event):
        self.record(event, event.connection.remote_condition)

    def on_transport_error(self, event):
        self.record(event, event.transport.condition)

    def on_timer_task(self, event):
        print("no refusal within %d s" % TIMEOUT, flush=True)
        event.container.stop()


if __name__ == "__main__":
    host, port, ca, ak, secret, group, case = sys.argv[1:8]
    p = Probe(host, int(port), ca, ak, secret, group, case)
    Container(p).run()
    sys.exit(0 if p.seen else 1)
