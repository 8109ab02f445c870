//! Prometheus metrics for Ironlink's daemons, through the `metrics` crate and its Prometheus
//! exporter: each server owns a [`Registry`] (no global recorder, so several servers in one
//! process keep their own figures), every series carries HELP text, names carry base units
//! (`_seconds`, `_bytes`), and the text exposition is the exporter's. Counters that the code
//! keeps as atomics are copied in at scrape time ([`Registry::set_counter`]); latencies are
//! histograms observed where they happen ([`Registry::histogram`]). `process_*` series and a
//! `*_build_info` series come with [`Registry::export_process`].
#![warn(missing_docs)]

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Histogram buckets for latencies, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

static META: Metadata<'static> = Metadata::new("ironlink", Level::INFO, None);

/// One server's metrics.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// A latency histogram, in seconds.
#[derive(Clone)]
pub struct Latency(Histogram);

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency")
    }
}

impl Latency {
    /// Records one duration.
    pub fn record(&self, seconds: f64) {
        self.0.record(seconds);
    }

    /// Records the time since `started`.
    pub fn since(&self, started: std::time::Instant) {
        self.0.record(started.elapsed().as_secs_f64());
    }
}

/// Label pairs of one series.
pub type Labels<'a> = &'a [(&'static str, &'a str)];

fn key(name: &'static str, labels: Labels<'_>) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

/// A free-text label value (a reason) as Ironlink writes it: letters, digits and `_-.:/@`,
/// every other run of characters one underscore (no spaces: `queue full` is `queue_full`).
/// Identifiers (group ids, device names, product keys) are written as they are.
pub fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c.is_alphanumeric() || "_-.:/@".contains(c) {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

impl Registry {
    /// An empty registry whose histograms use [`LATENCY_BUCKETS`].
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
    }

    /// The counter `name` with `labels`, described by `help`.
    pub fn counter(&self, name: &'static str, help: &'static str, labels: Labels<'_>) -> Counter {
        self.recorder
            .describe_counter(name.into(), None, help.into());
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// Sets a counter kept elsewhere (an atomic) to its current value.
    pub fn set_counter(&self, name: &'static str, help: &'static str, labels: Labels<'_>, v: u64) {
        self.counter(name, help, labels).absolute(v);
    }

    /// The gauge `name` with `labels`, described by `help`.
    pub fn gauge(&self, name: &'static str, help: &'static str, labels: Labels<'_>) -> Gauge {
        self.recorder.describe_gauge(name.into(), None, help.into());
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    /// Sets a gauge to `v`.
    pub fn set_gauge(&self, name: &'static str, help: &'static str, labels: Labels<'_>, v: f64) {
        self.gauge(name, help, labels).set(v);
    }

    /// The histogram `name` (in seconds: end the name with `_seconds`), described by `help`.
    pub fn histogram(&self, name: &'static str, help: &'static str, labels: Labels<'_>) -> Latency {
        self.recorder
            .describe_histogram(name.into(), None, help.into());
        Latency(self.recorder.register_histogram(&key(name, labels), &META))
    }

    /// `process_*` series (CPU, memory, descriptors, start time, on Linux) and
    /// `{prefix}_build_info{version}`.
    pub fn export_process(&self, build_info: &'static str, version: &str) {
        self.set_gauge(
            build_info,
            "Always 1; the labels say which build runs",
            &[("version", version)],
            1.0,
        );
        if let Some(p) = process::read() {
            // The exporter's counters are whole numbers: whole seconds here.
            self.set_counter(
                "process_cpu_seconds_total",
                "User and system CPU time spent, in whole seconds",
                &[],
                p.cpu_seconds as u64,
            );
            self.set_gauge(
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                &[],
                p.resident_bytes as f64,
            );
            self.set_gauge(
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                &[],
                p.virtual_bytes as f64,
            );
            self.set_gauge(
                "process_open_fds",
                "Open file descriptors",
                &[],
                p.open_fds as f64,
            );
            if let Some(max) = p.max_fds {
                self.set_gauge(
                    "process_max_fds",
                    "Most open file descriptors allowed (soft limit)",
                    &[],
                    max as f64,
                );
            }
            if let Some(start) = p.start_time_seconds {
                self.set_gauge(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch, in seconds",
                    &[],
                    start,
                );
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

pub mod os;

/// Figures of this process from `/proc` (Linux).
pub mod process {
    /// One reading.
    #[derive(Debug, Clone, Copy)]
    pub struct Process {
        /// User + system CPU, seconds.
        pub cpu_seconds: f64,
        /// Resident set, bytes.
        pub resident_bytes: u64,
        /// Virtual size, bytes.
        pub virtual_bytes: u64,
        /// Open descriptors.
        pub open_fds: usize,
        /// Soft limit of open descriptors.
        pub max_fds: Option<u64>,
        /// Start time, seconds since the Unix epoch.
        pub start_time_seconds: Option<f64>,
    }

    // The kernel's USER_HZ and page size are 100 and 4 KiB on every Linux we run on.
    const TICKS: f64 = 100.0;
    const PAGE: u64 = 4096;

    /// Reads `/proc/self`; `None` where there is no procfs.
    pub fn read() -> Option<Process> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22, vsize 23,
        // rss 24.
        let cpu = (num(11)? + num(12)?) as f64 / TICKS;
        let start_ticks = num(19)?;
        let virtual_bytes = num(20)?;
        let resident_bytes = num(21)? * PAGE;
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|x| x.starts_with("Max open files"))
                    .and_then(|x| x.split_whitespace().nth(3))
                    .and_then(|v| v.parse().ok())
            });
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        Some(Process {
            cpu_seconds: cpu,
            resident_bytes,
            virtual_bytes,
            open_fds,
            max_fds,
            start_time_seconds: boot.map(|b| b + start_ticks as f64 / TICKS),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn series_have_help_units_and_clean_labels() {
        let r = Registry::new();
        r.set_counter(
            "x_events_total",
            "Events seen",
            &[("reason", &label_value("queue full"))],
            3,
        );
        r.set_counter("x_groups_total", "Per group", &[("group", "$rule:a b")], 1);
        assert!(
            r.render().contains("x_groups_total{group=\"$rule:a b\"} 1"),
            "identifiers as they are"
        );
        r.set_counter(
            "x_events_total",
            "Events seen",
            &[("reason", &label_value("queue full"))],
            3,
        );
        r.histogram("x_commit_seconds", "Commit latency, in seconds", &[])
            .record(0.002);
        r.export_process("x_build_info", "1.2.3");
        let text = r.render();
        assert!(text.contains("# HELP x_events_total Events seen"), "{text}");
        assert!(
            text.contains("x_events_total{reason=\"queue_full\"} 3"),
            "{text}"
        );
        assert!(text.contains("# TYPE x_commit_seconds histogram"), "{text}");
        assert!(
            text.contains("x_commit_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
        assert!(text.contains("x_build_info{version=\"1.2.3\"} 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert_eq!(
            label_value("duplicate (another gateway)"),
            "duplicate_another_gateway"
        );
    }
}
