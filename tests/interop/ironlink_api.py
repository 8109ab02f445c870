"""The Ironlink HTTP API for the interop scripts: `Api(http, token)`; `api(method, path, body)`
answers the JSON body (raising on an error status), `api.call(...)` answers (status, body)."""
import json
import urllib.error
import urllib.request


class Api:
    def __init__(self, http, token, timeout=300):
        self.http, self.token, self.timeout = http, token, timeout

    def call(self, method, path, body=None):
        req = urllib.request.Request(
            f"{self.http}/api/v1{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def __call__(self, method, path, body=None):
        status, got = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {got}"
        return got
