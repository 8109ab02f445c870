DROP TABLE storage_policies;
DROP TABLE property_chunks;
