DROP INDEX ota_jobs_campaign_device;
