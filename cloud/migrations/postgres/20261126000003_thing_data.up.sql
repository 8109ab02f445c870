-- Thing data: property time series, events, service calls, shadows, gateway topology, raw data.
ALTER TABLE products ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';

-- One row per (device, property): history rows carry the small integer id, not three strings.
CREATE TABLE property_series (
    id          BIGSERIAL PRIMARY KEY,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    UNIQUE (product_key, device_name, identifier),
    FOREIGN KEY (product_key, device_name) REFERENCES devices (product_key, device_name) ON DELETE CASCADE
);
CREATE TABLE property_history (
    series_id BIGINT NOT NULL,
    ts        BIGINT NOT NULL,
    value     TEXT NOT NULL
);
CREATE INDEX property_history_series_ts ON property_history (series_id, ts);
CREATE TABLE property_latest (
    series_id BIGINT PRIMARY KEY,
    ts        BIGINT NOT NULL,
    value     TEXT NOT NULL
);

CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    output      TEXT NOT NULL,
    ts          BIGINT NOT NULL
);
CREATE INDEX events_device_ts ON events (product_key, device_name, ts);

CREATE TABLE service_calls (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    call_type   TEXT NOT NULL,
    params      TEXT NOT NULL,
    status      TEXT NOT NULL,
    code        BIGINT,
    reply       TEXT,
    created_at  BIGINT NOT NULL,
    deadline    BIGINT NOT NULL,
    replied_at  BIGINT,
    PRIMARY KEY (product_key, device_name, message_id)
);
CREATE INDEX service_calls_pending ON service_calls (status, deadline);

CREATE TABLE shadows (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    reported    TEXT NOT NULL,
    desired     TEXT NOT NULL,
    metadata    TEXT NOT NULL,
    version     BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name),
    FOREIGN KEY (product_key, device_name) REFERENCES devices (product_key, device_name) ON DELETE CASCADE
);

CREATE TABLE topology (
    product_key         TEXT NOT NULL,
    device_name         TEXT NOT NULL,
    gateway_product_key TEXT NOT NULL,
    gateway_device_name TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name),
    FOREIGN KEY (product_key, device_name) REFERENCES devices (product_key, device_name) ON DELETE CASCADE
);
CREATE INDEX topology_gateway ON topology (gateway_product_key, gateway_device_name);

CREATE TABLE raw_messages (
    id          BIGSERIAL PRIMARY KEY,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    direction   TEXT NOT NULL,
    payload     BYTEA NOT NULL,
    ts          BIGINT NOT NULL
);
CREATE INDEX raw_messages_device_ts ON raw_messages (product_key, device_name, ts);
