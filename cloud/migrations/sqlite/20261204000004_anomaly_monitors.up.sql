-- Anomaly monitors: one pooled model over some numeric properties of a product's devices,
-- trained from stored history (at start, on the retrain schedule, on request), scoring every
-- posted value; anomalies become the device's 'anomaly' events. The model lives in memory.
CREATE TABLE anomaly_monitors (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    product_key TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    -- JSON array of property identifiers.
    identifiers TEXT NOT NULL,
    -- Share of normal points flagged: 0.01, 0.03 or 0.05.
    sensitivity DOUBLE PRECISION NOT NULL,
    train_days  BIGINT NOT NULL,
    -- Cron expression (UTC).
    retrain     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
