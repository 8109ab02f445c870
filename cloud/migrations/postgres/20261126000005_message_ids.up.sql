-- Message ids of posts that asked for duplicate dropping (the edge's at-least-once uplink):
-- a second post with the same id is answered but not stored again.
CREATE TABLE message_ids (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name, message_id)
);
CREATE INDEX message_ids_at ON message_ids (at);
