DROP TABLE archive_series;
DROP TABLE archive_files;
