DROP TABLE raw_messages;
DROP TABLE topology;
DROP TABLE shadows;
DROP TABLE service_calls;
DROP TABLE events;
DROP TABLE property_latest;
DROP TABLE property_history;
DROP TABLE property_series;
ALTER TABLE products DROP COLUMN tenant;
