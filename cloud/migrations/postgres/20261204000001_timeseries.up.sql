-- Time-series storage: property_history stays the write-optimised table new points land in;
-- the sealer moves each series' points into compressed chunks (see cloud/src/tsdb/codec.rs),
-- deleting the rows it encoded in the same transaction.
CREATE TABLE property_chunks (
    id        BIGSERIAL PRIMARY KEY,
    series_id BIGINT NOT NULL,
    start_ts  BIGINT NOT NULL,
    end_ts    BIGINT NOT NULL,
    n         BIGINT NOT NULL,
    -- Statistics over numeric (and boolean) values; NULL when the chunk holds other values.
    vmin      DOUBLE PRECISION,
    vmax      DOUBLE PRECISION,
    vsum      DOUBLE PRECISION,
    vfirst    DOUBLE PRECISION,
    vlast     DOUBLE PRECISION,
    data      BYTEA NOT NULL
);
CREATE INDEX property_chunks_series_start ON property_chunks (series_id, start_ts);
CREATE INDEX property_chunks_end ON property_chunks (end_ts);

-- Storage policy and retention per product and property ('*': the product's default).
CREATE TABLE storage_policies (
    product_key TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    identifier  TEXT NOT NULL,
    mode        TEXT NOT NULL,
    deadband    DOUBLE PRECISION NOT NULL DEFAULT 0,
    interval_ms BIGINT NOT NULL DEFAULT 0,
    ttl_ms      BIGINT,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (product_key, identifier)
);
