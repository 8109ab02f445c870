"""The Parquet archive read by pyarrow (not our code): seal and archive everything through the
API, then read the archive directory as a Hive-partitioned dataset and check that every point
of every archived (device, property) of the product equals what the history API answers.

Usage: archive_read.py HTTP TOKEN ARCHIVE_DIR PRODUCT_KEY
"""
import json
import sys

import pyarrow.dataset as ds

from ironlink_api import Api

http, token, archive_dir, pk = sys.argv[1:5]
api = Api(http, token)


api("POST", "/timeseries/seal")
done = api("POST", "/timeseries/archive", {"older_than": "0"})
assert done["points"] > 0, f"nothing archived: {done}"
listed = api("GET", f"/timeseries/archive?product_key={pk}")
files = listed["files"]
assert files, f"no archive file of {pk}: {listed}"
for f in files:
    assert f["path"].startswith(f"product={pk}/day={f['day']}/"), f

dataset = ds.dataset(archive_dir, format="parquet", partitioning="hive")
table = dataset.to_table(filter=ds.field("product") == pk)
names = set(table.schema.names)
want = {"ts", "device", "property", "int", "float", "bool", "text", "json", "product", "day"}
assert want <= names, f"columns: {sorted(names)}"
assert str(table.schema.field("ts").type) == "timestamp[ms, tz=UTC]", table.schema.field("ts").type
assert table.num_rows == sum(f["points"] for f in files), (table.num_rows, files)

rows = {}
for r in table.to_pylist():
    value = None
    for col in ("int", "float", "bool", "text"):
        if r[col] is not None:
            value = r[col]
            break
    else:
        value = json.loads(r["json"])
    ms = int(r["ts"].timestamp() * 1000)
    assert r["day"] == r["ts"].strftime("%Y-%m-%d"), r
    rows.setdefault((r["device"], r["property"]), []).append((ms, value))

checked = 0
for (dn, prop), points in rows.items():
    got, cursor = [], ""
    for _ in range(1000):
        page = api("GET", f"/devices/{pk}/{dn}/properties/{prop}/history?order=asc&limit=10000{cursor}")
        assert "damaged" not in page, page
        got += [(p["time"], p["value"]) for p in page["points"]]
        if not page.get("next"):
            break
        cursor = f"&cursor={page['next']}"
    points.sort(key=lambda p: (p[0], json.dumps(p[1], sort_keys=True)))
    got.sort(key=lambda p: (p[0], json.dumps(p[1], sort_keys=True)))
    assert points == got, f"{dn} {prop}: parquet {points[:5]} vs API {got[:5]}"
    checked += len(points)
print(f"{checked} points in {len(files)} files of {len(rows)} series read back by pyarrow {table.schema.field('ts').type}")
