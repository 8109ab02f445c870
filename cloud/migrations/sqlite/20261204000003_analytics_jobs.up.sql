-- Analytics jobs: a SQL query over property history and the fleet's dimension tables, run on a
-- cron schedule or on demand by a worker process; each run's result is a Parquet file under
-- {data_dir}/analytics/results, part of the result once its run row says 'succeeded'.
CREATE TABLE analytics_jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    query         TEXT NOT NULL,
    -- Cron expression (5 or 6 fields, UTC); NULL: on demand only.
    schedule      TEXT,
    -- History the job reads: the last window_secs seconds before the run (NULL: no bound but
    -- the query's own).
    window_secs   BIGINT,
    -- Limits of a run (NULL: the [analytics] defaults, which also cap them).
    max_rows      BIGINT,
    timeout_secs  BIGINT,
    memory_mb     BIGINT,
    -- Runs whose results are kept (older ones are deleted with their files).
    keep_runs     BIGINT NOT NULL DEFAULT 10,
    enabled       BIGINT NOT NULL DEFAULT 1,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    -- When the scheduler last started it (ms), so a restart does not run a slot twice.
    last_slot     BIGINT
);

CREATE TABLE analytics_runs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        BIGINT NOT NULL REFERENCES analytics_jobs (id) ON DELETE CASCADE,
    -- 'schedule' or 'manual'.
    trigger_kind  TEXT NOT NULL,
    -- 'running', 'succeeded', 'failed'.
    status        TEXT NOT NULL,
    progress      TEXT NOT NULL DEFAULT '',
    error         TEXT,
    started_at    BIGINT NOT NULL,
    finished_at   BIGINT,
    window_from   BIGINT,
    window_to     BIGINT,
    history_rows  BIGINT,
    result_rows   BIGINT,
    result_bytes  BIGINT,
    -- JSON: [[name, type], ...] of the result.
    result_columns TEXT,
    -- Relative to the results directory.
    result_path   TEXT
);
CREATE INDEX analytics_runs_job ON analytics_runs (job_id, id);
CREATE INDEX analytics_runs_status ON analytics_runs (status);
