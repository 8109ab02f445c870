//! A short scenario with every kind of fault runs against an in-process cloud: nothing
//! acknowledged is missing from storage, the malformed frame closed only its own session, and
//! the report (with its anomaly labels) serializes.
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
[[fault]]
kind = "link-cut"
fleet = 0
at = "1s"
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
    assert_eq!(r.faults.len(), 4, "{:?}", r.faults);
    for f in &r.fleets {
        assert!(f.acked > 0, "{f:?}");
        assert_eq!(f.lost, 0, "{f:?}");
        assert!(f.stored >= f.acked, "{f:?}");
        assert!(f.disconnects > 0, "the fault was felt: {f:?}");
    }
    assert_eq!(r.labels.len(), 1);
    assert_eq!(r.labels[0].end_ms - r.labels[0].start_ms, 1000);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["fleets"].as_array().unwrap().len(), 2);
}
