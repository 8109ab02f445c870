//! A short scenario with every kind of fault runs against an in-process cloud: nothing
//! acknowledged is missing from storage, every poll a Modbus meter answered behind an edge
//! gateway is stored exactly once through an uplink cut and silent meters, the malformed frame
//! closed only its own session, and the report (with its anomaly labels) serializes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_sim::scenario::{run, Scenario};

const SCENARIO: &str = r#"
name = "ci"
duration = "6s"
seed = 3
[[fleet]]
product = "Sensor"
count = 5
interval = "200ms"
[fleet.properties.t]
generator = "sine"
base = 10.0
amplitude = 1.0
period = "2s"
[[fleet.properties.t.anomalies]]
kind = "spike"
at = "1s"
duration = "1s"
magnitude = 50.0
devices = [0]
[[fleet]]
product = "Tank"
count = 3
interval = "300ms"
[fleet.properties.level]
generator = "random-walk"
base = 5.0
noise = 1.0
[[gateway]]
product = "Meter"
meters = 3
interval = "200ms"
[gateway.properties.voltage]
generator = "sine"
base = 230.0
amplitude = 5.0
period = "3s"
[gateway.properties.current]
generator = "random-walk"
base = 5.0
noise = 0.2
[[gateway.properties.current.anomalies]]
kind = "drift"
at = "2s"
duration = "2s"
magnitude = 3.0
[[fault]]
kind = "link-cut"
fleet = 0
at = "1s"
duration = "1s"
[[fault]]
kind = "link-cut"
gateway = 0
at = "1s"
duration = "2s"
[[fault]]
kind = "silent"
gateway = 0
at = "4s"
duration = "1s"
[[fault]]
kind = "storm"
fleet = 1
at = "2s"
[[fault]]
kind = "silent"
fleet = 1
at = "3s"
duration = "1s"
[[fault]]
kind = "malformed"
fleet = 0
at = "4s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing_acknowledged() {
    let s = Scenario::parse(SCENARIO).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = run(&s, dir.path()).await.unwrap();
    assert_eq!(r.faults.len(), 6, "{:?}", r.faults);
    for f in &r.fleets {
        assert!(f.acked > 0, "{f:?}");
        assert_eq!(f.lost, 0, "{f:?}");
        assert!(f.stored >= f.acked, "{f:?}");
        assert!(f.disconnects > 0, "the fault was felt: {f:?}");
    }
    let g = &r.gateways[0];
    assert_eq!(g.meters, 3);
    assert!(g.polled > 3, "{g:?}");
    assert!(g.answered >= g.polled, "{g:?}");
    assert_eq!(
        g.stored, g.polled,
        "every reading stored exactly once: {g:?}"
    );
    assert_eq!(g.lost, 0, "{g:?}");
    // The silent spell (500 ms timeouts) and the end-of-run stop, on every meter.
    assert!(g.poll_errors >= 6, "{g:?}");
    assert_eq!(r.labels.len(), 1 + 3, "one spike, a drift on each meter");
    assert_eq!(r.labels[0].end_ms - r.labels[0].start_ms, 1000);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["fleets"].as_array().unwrap().len(), 2);
    assert_eq!(json["gateways"].as_array().unwrap().len(), 1);
}
