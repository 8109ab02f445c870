DROP TABLE app_messages;
DROP TABLE subscriptions;
DROP TABLE consumer_groups;
DROP TABLE access_keys;
