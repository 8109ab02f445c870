-- Products, devices and presence history.
CREATE TABLE products (
    product_key      TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    node_type        TEXT NOT NULL,
    data_format      TEXT NOT NULL,
    product_secret   TEXT NOT NULL,
    dynamic_register BIGINT NOT NULL DEFAULT 0,
    description      TEXT NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL
);

CREATE TABLE devices (
    product_key     TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    device_name     TEXT NOT NULL,
    device_secret   TEXT NOT NULL,
    enabled         BIGINT NOT NULL DEFAULT 1,
    status          TEXT NOT NULL DEFAULT 'unactive',
    created_at      BIGINT NOT NULL,
    first_online_at BIGINT,
    last_online_at  BIGINT,
    last_offline_at BIGINT,
    client_addr     TEXT,
    tags            TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (product_key, device_name)
);

CREATE TABLE presence_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    client_addr TEXT,
    at          BIGINT NOT NULL
);

CREATE INDEX presence_events_device ON presence_events (product_key, device_name, at);
