-- Archive tier of the time-series store: chunks older than [timeseries] archive_after move into
-- Parquet files under the archive directory (product=KEY/day=YYYY-MM-DD/part-*.parquet). A file
-- is part of the archive once its row here is committed, in the same transaction that deletes
-- the chunks it holds; a file without a row (a crash between writing and committing) is removed
-- at start.
CREATE TABLE archive_files (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    product_key TEXT NOT NULL,
    day         TEXT NOT NULL,
    -- Relative to the archive directory.
    path        TEXT NOT NULL UNIQUE,
    start_ts    BIGINT NOT NULL,
    end_ts      BIGINT NOT NULL,
    points      BIGINT NOT NULL,
    bytes       BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX archive_files_end ON archive_files (end_ts);
CREATE INDEX archive_files_product_day ON archive_files (product_key, day);

-- Which series each file holds, over which span, with the statistics of its numeric values
-- (NULL when the series' points there are not all numeric), as property_chunks has them.
CREATE TABLE archive_series (
    file_id   BIGINT NOT NULL,
    series_id BIGINT NOT NULL,
    start_ts  BIGINT NOT NULL,
    end_ts    BIGINT NOT NULL,
    n         BIGINT NOT NULL,
    vmin      REAL,
    vmax      REAL,
    vsum      REAL,
    vfirst    REAL,
    vlast     REAL,
    PRIMARY KEY (file_id, series_id)
);
CREATE INDEX archive_series_series ON archive_series (series_id, start_ts);
