-- Application access: access keys, consumer groups, subscriptions and the durable per-group queue.
CREATE TABLE access_keys (
    access_key_id     TEXT PRIMARY KEY,
    access_key_secret TEXT NOT NULL,
    description       TEXT NOT NULL DEFAULT '',
    created_at        BIGINT NOT NULL
);

CREATE TABLE consumer_groups (
    group_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE subscriptions (
    product_key   TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    group_id      TEXT NOT NULL REFERENCES consumer_groups (group_id) ON DELETE CASCADE,
    message_types TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (product_key, group_id)
);

-- Messages for a group not yet accepted by one of its clients.
CREATE TABLE app_messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id     TEXT NOT NULL,
    topic        TEXT NOT NULL,
    message_id   TEXT NOT NULL,
    payload      BLOB NOT NULL,
    generated_at BIGINT NOT NULL
);
CREATE INDEX app_messages_group_id ON app_messages (group_id, id);
