DROP TABLE anomaly_monitors;
