-- Landing segments: the property points of one writer batch, every series together, in one
-- row (see cloud/src/tsdb/segment.rs). The sealer turns them into per-series chunks within
-- seconds, deleting the segments it encoded in the same transaction. property_history keeps
-- rows written before this migration; they are sealed as before.
CREATE TABLE property_segments (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    n      BIGINT NOT NULL,
    min_ts BIGINT NOT NULL,
    max_ts BIGINT NOT NULL,
    data   BLOB NOT NULL,
    -- Why the sealer could not read it (it stays for inspection and is not sealed again).
    damaged TEXT
);
