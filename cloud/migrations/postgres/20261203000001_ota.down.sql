DROP TABLE ota_settings;
DROP TABLE ota_history;
DROP TABLE ota_jobs;
DROP TABLE ota_campaigns;
DROP TABLE ota_modules;
DROP TABLE ota_packages;
