DROP TABLE message_ids;
