"""Analytics jobs checked by pandas and pyarrow (not our code): a job aggregates a product's
history (here the linkkit device's, archived to Parquet by then) per device and property; its
result, fetched as Parquet and read by pyarrow, and as CSV read by pandas, equals what pandas
computes from the same points fetched through the history API. A SQL error is refused with its
line and column.

Usage: jobs_pandas.py HTTP TOKEN PRODUCT_KEY
"""
import io
import sys
import time
import urllib.request

import pandas as pd
import pyarrow.parquet as pq

from ironlink_api import Api

http, token, pk = sys.argv[1:4]
api = Api(http, token)


def raw(path):
    req = urllib.request.Request(f"{http}/api/v1{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


status, err = api.call("POST", "/analytics/jobs", {"name": "interop-broken", "query": "SELECT identifier,\n  count(* AS n FROM history"})
assert status == 400 and err["code"] == "sql_error" and err["line"] == 2 and err["column"] > 0, (status, err)

query = f"""
SELECT device_name, identifier, count(*) AS n, avg(value) AS mean, min(value) AS low,
       max(value) AS high, min(ts) AS first, max(ts) AS last
FROM history
WHERE product_key = '{pk}' AND value IS NOT NULL
GROUP BY device_name, identifier
ORDER BY device_name, identifier
"""
job = api("POST", "/analytics/jobs", {"name": "interop-per-property", "query": query})
run = api("POST", f"/analytics/jobs/{job['id']}/runs")
deadline = time.time() + 120
while run["status"] == "running":
    assert time.time() < deadline, run
    time.sleep(0.2)
    run = api("GET", f"/analytics/runs/{run['id']}")
assert run["status"] == "succeeded", run

table = pq.read_table(io.BytesIO(raw(f"/analytics/runs/{run['id']}/result?format=parquet")))
got = table.to_pandas()
csv = pd.read_csv(io.BytesIO(raw(f"/analytics/runs/{run['id']}/result?format=csv")))
assert len(got) == run["result_rows"] == len(csv) > 0, (run, got, csv)
assert list(csv["n"]) == list(got["n"]), (csv, got)

# The same from the history API, computed by pandas.
rows = []
for _, r in got.iterrows():
    dn, prop = r["device_name"], r["identifier"]
    cursor = ""
    for _ in range(1000):
        page = api("GET", f"/devices/{pk}/{dn}/properties/{prop}/history?order=asc&limit=10000&from=0{cursor}")
        for p in page["points"]:
            v = p["value"]
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)):
                rows.append({"device_name": dn, "identifier": prop, "ts": p["time"], "value": float(v)})
        if not page.get("next"):
            break
        cursor = f"&cursor={page['next']}"
points = pd.DataFrame(rows)
want = (
    points.groupby(["device_name", "identifier"])
    .agg(n=("value", "size"), mean=("value", "mean"), low=("value", "min"), high=("value", "max"),
         first=("ts", "min"), last=("ts", "max"))
    .reset_index()
    .sort_values(["device_name", "identifier"])
    .reset_index(drop=True)
)
assert len(want) == len(got), (want, got)
for (_, w), (_, g) in zip(want.iterrows(), got.iterrows()):
    assert (w["device_name"], w["identifier"], w["n"]) == (g["device_name"], g["identifier"], g["n"]), (w, g)
    for col in ("mean", "low", "high"):
        assert abs(w[col] - g[col]) <= 1e-9 * max(1.0, abs(w[col])), (col, w, g)
    for col in ("first", "last"):
        assert int(g[col].timestamp() * 1000) == w[col], (col, w, g)
assert str(table.schema.field("first").type) == "timestamp[ms, tz=UTC]", table.schema
print(f"{len(got)} (device, property) aggregates over {len(points)} points equal pandas'")
req = urllib.request.Request(f"{http}/api/v1/analytics/jobs/{job['id']}", method="DELETE",
                             headers={"Authorization": f"Bearer {token}"})
with urllib.request.urlopen(req, timeout=60) as r:
    assert r.status == 204, r.status
