DROP INDEX ota_jobs_deadline;
