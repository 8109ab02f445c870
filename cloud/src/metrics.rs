//! The server's counters and latency histograms, exposed at `/metrics` through
//! `ironlink-telemetry` (the `metrics` crate's Prometheus exporter): HELP text on every
//! series, base units in names, `process_*` and `ironlink_build_info`.

use ironlink_telemetry::{Latency, Registry};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Latency histograms, in seconds.
#[derive(Debug)]
pub struct Latencies {
    /// One HTTP API request, from its arrival to its answer.
    pub api: Latency,
    /// One commit of a batch of device data (properties, events) to the database.
    pub ingest_commit: Latency,
    /// Evaluating one device message against the rules.
    pub rule_eval: Latency,
    /// One transaction of the time-series sealer (rows of several series into chunks).
    pub seal: Latency,
}

impl Latencies {
    fn new(r: &Registry) -> Self {
        Self {
            api: r.histogram(
                "ironlink_api_request_duration_seconds",
                "HTTP API requests, from arrival to answer, in seconds",
                &[],
            ),
            ingest_commit: r.histogram(
                "ironlink_ingest_commit_duration_seconds",
                "Commits of a batch of device data (properties, events) to the database, in seconds",
                &[],
            ),
            rule_eval: r.histogram(
                "ironlink_rule_evaluation_duration_seconds",
                "Evaluation of one device message against the rules, in seconds",
                &[],
            ),
            seal: r.histogram(
                "ironlink_timeseries_seal_duration_seconds",
                "Transactions of the time-series sealer (rows of several series into chunks), in seconds",
                &[],
            ),
        }
    }
}

/// Counters of the access layer.
#[derive(Debug)]
pub struct Metrics {
    /// Authenticated connections held now.
    pub connections: AtomicI64,
    /// TCP/TLS connections accepted by the listeners.
    pub accepted: AtomicU64,
    /// Connections closed by the connect rate limiter or the connection cap.
    pub rate_limited: AtomicU64,
    /// HTTP connections closed at once because the API held its maximum.
    pub http_refused: AtomicU64,
    /// Connections that never sent CONNECT in time.
    pub connect_timeouts: AtomicU64,
    /// CONNECTs refused (bad credentials, unknown or disabled device, ...).
    pub auth_refused: AtomicU64,
    /// CONNECTs accepted.
    pub auth_accepted: AtomicU64,
    /// Devices registered dynamically.
    pub registrations: AtomicU64,
    /// PUBLISH packets refused by the ACL.
    pub acl_publish_refused: AtomicU64,
    /// SUBSCRIBE filters refused by the ACL.
    pub acl_subscribe_refused: AtomicU64,
    /// Connections closed for a protocol error (malformed or oversize packet, ...).
    pub protocol_errors: AtomicU64,
    /// PUBLISH packets received from devices and routed.
    pub messages_in: AtomicU64,
    /// PUBLISH packets written to devices.
    pub messages_out: AtomicU64,
    /// Presence events that could not be stored.
    pub presence_lost: AtomicU64,
    /// Property values stored.
    pub properties_stored: AtomicU64,
    /// Property values refused by the thing model (wrong type, out of range, unknown...).
    pub properties_refused: AtomicU64,
    /// Events stored.
    pub events_stored: AtomicU64,
    /// Alink messages refused as malformed (not JSON, missing fields, unknown method).
    pub alink_malformed: AtomicU64,
    /// Device replies whose message id matches no pending call.
    pub replies_unmatched: AtomicU64,
    /// Thing-data batches that could not be stored (their devices were disconnected unacked).
    pub thing_store_failures: AtomicU64,
    /// Posts dropped as duplicates of an id already stored (`sys.dedup`).
    pub duplicates_dropped: AtomicU64,
    /// Sub-devices logged in through gateways now.
    pub sub_devices: AtomicI64,
    /// OTA notices sent (pushed, or answered to `firmware/get`).
    pub ota_notices: AtomicU64,
    /// OTA jobs that succeeded.
    pub ota_succeeded: AtomicU64,
    /// OTA jobs that failed for good.
    pub ota_failed: AtomicU64,
    /// Image bytes served to devices.
    pub ota_download_bytes: AtomicU64,
    /// Property values moved from rows into compressed chunks.
    pub points_sealed: AtomicU64,
    /// Compressed chunks written.
    pub chunks_written: AtomicU64,
    /// Chunks dropped past their retention.
    pub chunks_reaped: AtomicU64,
    /// Chunks that could not be decoded (damaged) and were skipped by a query.
    pub chunks_damaged: AtomicU64,
    /// Points moved from chunks into Parquet archive files.
    pub points_archived: AtomicU64,
    /// Parquet archive files written.
    pub archive_files_written: AtomicU64,
    /// Parquet archive files dropped past their retention.
    pub archive_files_dropped: AtomicU64,
    /// Where every series is exposed.
    pub registry: Registry,
    /// Latency histograms.
    pub latency: Latencies,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let latency = Latencies::new(&registry);
        Self {
            connections: AtomicI64::new(0),
            accepted: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            http_refused: AtomicU64::new(0),
            connect_timeouts: AtomicU64::new(0),
            auth_refused: AtomicU64::new(0),
            auth_accepted: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            acl_publish_refused: AtomicU64::new(0),
            acl_subscribe_refused: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            presence_lost: AtomicU64::new(0),
            properties_stored: AtomicU64::new(0),
            properties_refused: AtomicU64::new(0),
            events_stored: AtomicU64::new(0),
            alink_malformed: AtomicU64::new(0),
            replies_unmatched: AtomicU64::new(0),
            thing_store_failures: AtomicU64::new(0),
            duplicates_dropped: AtomicU64::new(0),
            sub_devices: AtomicI64::new(0),
            ota_notices: AtomicU64::new(0),
            ota_succeeded: AtomicU64::new(0),
            ota_failed: AtomicU64::new(0),
            ota_download_bytes: AtomicU64::new(0),
            points_sealed: AtomicU64::new(0),
            chunks_written: AtomicU64::new(0),
            chunks_reaped: AtomicU64::new(0),
            chunks_damaged: AtomicU64::new(0),
            points_archived: AtomicU64::new(0),
            archive_files_written: AtomicU64::new(0),
            archive_files_dropped: AtomicU64::new(0),
            registry,
            latency,
        }
    }
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Copies the access layer's counters, the router's and the process's into the registry.
    pub fn export(&self, routed: u64, dropped: u64) {
        let r = &self.registry;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        r.set_gauge(
            "ironlink_mqtt_connections",
            "Authenticated MQTT connections held now",
            &[],
            self.connections.load(Ordering::Relaxed) as f64,
        );
        r.set_gauge(
            "ironlink_sub_devices_online",
            "Sub-devices logged in through gateways now",
            &[],
            self.sub_devices.load(Ordering::Relaxed) as f64,
        );
        let counters: [(&'static str, &'static str, &AtomicU64); 31] = [
            (
                "ironlink_http_refused_total",
                "HTTP connections closed at once because the API held its maximum (http.max_connections)",
                &self.http_refused,
            ),
            (
                "ironlink_mqtt_accepted_total",
                "TCP and TLS connections accepted by the MQTT listeners",
                &self.accepted,
            ),
            (
                "ironlink_mqtt_rate_limited_total",
                "Connections closed by the connect rate limiter or the connection cap",
                &self.rate_limited,
            ),
            (
                "ironlink_mqtt_connect_timeouts_total",
                "Connections that sent no CONNECT in time",
                &self.connect_timeouts,
            ),
            (
                "ironlink_mqtt_auth_refused_total",
                "CONNECTs refused (bad credentials, unknown or disabled device)",
                &self.auth_refused,
            ),
            (
                "ironlink_mqtt_auth_accepted_total",
                "CONNECTs accepted",
                &self.auth_accepted,
            ),
            (
                "ironlink_mqtt_registrations_total",
                "Devices registered dynamically",
                &self.registrations,
            ),
            (
                "ironlink_mqtt_acl_publish_refused_total",
                "PUBLISH packets refused by the ACL",
                &self.acl_publish_refused,
            ),
            (
                "ironlink_mqtt_acl_subscribe_refused_total",
                "SUBSCRIBE filters refused by the ACL",
                &self.acl_subscribe_refused,
            ),
            (
                "ironlink_mqtt_protocol_errors_total",
                "Connections closed for a protocol error",
                &self.protocol_errors,
            ),
            (
                "ironlink_mqtt_messages_in_total",
                "PUBLISH packets received from devices and routed",
                &self.messages_in,
            ),
            (
                "ironlink_mqtt_messages_out_total",
                "PUBLISH packets written to devices",
                &self.messages_out,
            ),
            (
                "ironlink_presence_lost_total",
                "Presence events that could not be stored",
                &self.presence_lost,
            ),
            (
                "ironlink_properties_stored_total",
                "Property values stored",
                &self.properties_stored,
            ),
            (
                "ironlink_properties_refused_total",
                "Property values refused by the thing model",
                &self.properties_refused,
            ),
            (
                "ironlink_events_stored_total",
                "Events stored",
                &self.events_stored,
            ),
            (
                "ironlink_alink_malformed_total",
                "Alink messages refused as malformed",
                &self.alink_malformed,
            ),
            (
                "ironlink_replies_unmatched_total",
                "Device replies whose id matches no pending call",
                &self.replies_unmatched,
            ),
            (
                "ironlink_duplicates_dropped_total",
                "Posts dropped as duplicates of an id already stored",
                &self.duplicates_dropped,
            ),
            (
                "ironlink_thing_store_failures_total",
                "Batches of device data that could not be stored",
                &self.thing_store_failures,
            ),
            (
                "ironlink_ota_notices_total",
                "OTA upgrade notices sent to devices",
                &self.ota_notices,
            ),
            (
                "ironlink_ota_succeeded_total",
                "OTA jobs that ended with the device reporting the new version",
                &self.ota_succeeded,
            ),
            (
                "ironlink_ota_failed_total",
                "OTA jobs that failed for good",
                &self.ota_failed,
            ),
            (
                "ironlink_ota_download_bytes_total",
                "Firmware image bytes served to devices",
                &self.ota_download_bytes,
            ),
            (
                "ironlink_timeseries_points_sealed_total",
                "Property values moved from rows into compressed chunks",
                &self.points_sealed,
            ),
            (
                "ironlink_timeseries_chunks_written_total",
                "Compressed time-series chunks written",
                &self.chunks_written,
            ),
            (
                "ironlink_timeseries_chunks_reaped_total",
                "Time-series chunks dropped past their retention",
                &self.chunks_reaped,
            ),
            (
                "ironlink_timeseries_chunks_damaged_total",
                "Time-series chunks a query could not decode and skipped",
                &self.chunks_damaged,
            ),
            (
                "ironlink_timeseries_points_archived_total",
                "Property values moved from chunks into Parquet archive files",
                &self.points_archived,
            ),
            (
                "ironlink_timeseries_archive_files_written_total",
                "Parquet archive files written",
                &self.archive_files_written,
            ),
            (
                "ironlink_timeseries_archive_files_dropped_total",
                "Parquet archive files dropped past their retention",
                &self.archive_files_dropped,
            ),
        ];
        for (name, help, c) in counters {
            r.set_counter(name, help, &[], load(c));
        }
        r.set_counter(
            "ironlink_router_routed_total",
            "Messages the router delivered to sessions",
            &[],
            routed,
        );
        r.set_counter(
            "ironlink_router_dropped_total",
            "Messages the router dropped (a session's queue was full)",
            &[],
            dropped,
        );
        r.export_process("ironlink_build_info", env!("CARGO_PKG_VERSION"));
    }
}
