DROP INDEX presence_events_device;
DROP TABLE presence_events;
DROP TABLE devices;
DROP TABLE products;
