-- A job by campaign and device name (a campaign has one product): device reports and notices
-- find their job without scanning the campaign's jobs in that state.
CREATE UNIQUE INDEX ota_jobs_campaign_device ON ota_jobs (campaign_id, device_name);
