-- Rules whose input and action outputs go through a durable queue (at least once).
ALTER TABLE rules ADD COLUMN durable BIGINT NOT NULL DEFAULT 0;
