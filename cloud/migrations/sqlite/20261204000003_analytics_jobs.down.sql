DROP TABLE analytics_runs;
DROP TABLE analytics_jobs;
