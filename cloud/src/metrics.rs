//! Process-wide counters, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Counters of the access layer.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Authenticated connections held now.
    pub connections: AtomicI64,
    /// TCP/TLS connections accepted by the listeners.
    pub accepted: AtomicU64,
    /// Connections closed by the connect rate limiter or the connection cap.
    pub rate_limited: AtomicU64,
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
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition, with the router's counters appended.
    pub fn render(&self, routed: u64, dropped: u64) -> String {
        let mut out = String::new();
        let gauge = self.connections.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# TYPE ironlink_mqtt_connections gauge\nironlink_mqtt_connections {gauge}"
        );
        let subs = self.sub_devices.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# TYPE ironlink_sub_devices_online gauge\nironlink_sub_devices_online {subs}"
        );
        let counters: [(&str, &AtomicU64); 19] = [
            ("ironlink_mqtt_accepted_total", &self.accepted),
            ("ironlink_mqtt_rate_limited_total", &self.rate_limited),
            (
                "ironlink_mqtt_connect_timeouts_total",
                &self.connect_timeouts,
            ),
            ("ironlink_mqtt_auth_refused_total", &self.auth_refused),
            ("ironlink_mqtt_auth_accepted_total", &self.auth_accepted),
            ("ironlink_mqtt_registrations_total", &self.registrations),
            (
                "ironlink_mqtt_acl_publish_refused_total",
                &self.acl_publish_refused,
            ),
            (
                "ironlink_mqtt_acl_subscribe_refused_total",
                &self.acl_subscribe_refused,
            ),
            ("ironlink_mqtt_protocol_errors_total", &self.protocol_errors),
            ("ironlink_mqtt_messages_in_total", &self.messages_in),
            ("ironlink_mqtt_messages_out_total", &self.messages_out),
            ("ironlink_presence_lost_total", &self.presence_lost),
            ("ironlink_properties_stored_total", &self.properties_stored),
            (
                "ironlink_properties_refused_total",
                &self.properties_refused,
            ),
            ("ironlink_events_stored_total", &self.events_stored),
            ("ironlink_alink_malformed_total", &self.alink_malformed),
            ("ironlink_replies_unmatched_total", &self.replies_unmatched),
            (
                "ironlink_duplicates_dropped_total",
                &self.duplicates_dropped,
            ),
            (
                "ironlink_thing_store_failures_total",
                &self.thing_store_failures,
            ),
        ];
        for (name, c) in counters {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE ironlink_router_routed_total counter\nironlink_router_routed_total {routed}"
        );
        let _ = writeln!(
            out,
            "# TYPE ironlink_router_dropped_total counter\nironlink_router_dropped_total {dropped}"
        );
        out
    }
}
