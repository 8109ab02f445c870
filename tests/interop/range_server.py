"""A small HTTP file server with Range requests (206) and a pace, for firmware downloads in
tests: python3 range_server.py DIR HOST PORT DELAY_MS. Sends bodies in 1 KiB pieces with
DELAY_MS between them, so a test can cut a download half-way. Logs each request to stdout."""
import http.server
import os
import re
import sys
import time

ROOT, HOST, PORT, DELAY = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) / 1000


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(ROOT, os.path.basename(self.path.split("?")[0]))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                self.send_error(416)
                return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        print("GET %s from %d" % (self.path, start), flush=True)
        try:
            for at in range(start, len(data), 1024):
                self.wfile.write(data[at:at + 1024])
                self.wfile.flush()
                time.sleep(DELAY)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
