DROP TABLE property_segments;
