-- Timed-out attempts are found by deadline without scanning a campaign's active jobs.
CREATE INDEX ota_jobs_deadline ON ota_jobs (campaign_id, deadline);
