//! Analytics jobs through the server: SQL errors refused with line and column, runs in worker
//! processes with their history pushed down, results as JSON pages, CSV and Parquet, limits
//! (rows, memory, time) that fail the run with the reason, schedules, cancel, delete.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_cloud::thing::store::PropertyRow;
use ironlink_cloud::tsdb::{Landed, Verdict};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

const TSL: &str = r#"{
  "properties": [
    {"identifier": "temp", "name": "T", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "-40", "max": "120"}}},
    {"identifier": "label", "name": "L", "accessMode": "r", "dataType": {"type": "text", "specs": {"length": "32"}}}
  ],
  "events": [],
  "services": []
}"#;

fn worker() -> Option<PathBuf> {
    Some(PathBuf::from(env!("CARGO_BIN_EXE_ironlink-cloud")))
}

/// Three devices of one product, each with 100 temperatures (level 10/20/30, ±0.5) and 100
/// labels, one a second from `t0`; half sealed into chunks. Returns (pk, t0).
async fn fleet(srv: &TestServer) -> (String, i64) {
    let pk = srv.product_with_model(json!({"name": "meters"}), TSL).await;
    for dn in ["dev1", "dev2", "dev3"] {
        srv.device(&pk, dn).await;
    }
    let (s, v) = srv
        .call(
            Method::PUT,
            &format!("/devices/{pk}/dev1/tags"),
            Some(json!({"site": "north"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let db = &srv.running.shared.db;
    let keys: Vec<_> = ["dev1", "dev2", "dev3"]
        .iter()
        .flat_map(|d| {
            ["temp", "label"]
                .iter()
                .map(|p| (pk.clone(), (*d).to_owned(), (*p).to_owned()))
        })
        .collect();
    let ids = db.series_ids(&keys).await.unwrap();
    let t0 = 1_764_000_000_000;
    for half in [0..50i64, 50..100] {
        let mut rows = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let level = 10.0 * (i / 2 + 1) as f64;
            for n in half.clone() {
                let value = if k.2 == "temp" {
                    json!(level + if n % 2 == 0 { -0.5 } else { 0.5 })
                } else {
                    json!(format!("l{n:02}"))
                };
                rows.push(PropertyRow {
                    series_id: ids[k],
                    ts: t0 + n * 1000,
                    value: value.to_string(),
                    history: true,
                });
            }
        }
        db.store_thing_data(&rows, &[], &[]).await.unwrap();
        srv.running.shared.tsdb.stored(
            rows.iter()
                .map(|r| Landed::new(r.series_id, r.ts, Verdict::Store)),
        );
        if half.start == 0 {
            let (s, v) = srv.post("/timeseries/seal", json!({})).await;
            assert_eq!(s, 200, "{v}");
        }
    }
    (pk, t0)
}

/// Polls a run until it is no longer running.
async fn finished(srv: &TestServer, run: i64) -> Value {
    let deadline = std::time::Instant::now() + WAIT * 4;
    loop {
        let (s, v) = srv.get(&format!("/analytics/runs/{run}")).await;
        assert_eq!(s, 200, "{v}");
        if v["status"] != "running" {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "run still going: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn create(srv: &TestServer, body: Value) -> i64 {
    let (s, v) = srv.post("/analytics/jobs", body).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_i64().unwrap()
}

async fn run_now(srv: &TestServer, job: i64) -> Value {
    let (s, v) = srv
        .post(&format!("/analytics/jobs/{job}/runs"), json!({}))
        .await;
    assert_eq!(s, 202, "{v}");
    finished(srv, v["id"].as_i64().unwrap()).await
}

#[tokio::test]
async fn a_job_answers_sql_over_history_and_fleet_tables_with_pushdown() {
    let srv = start(|c| c.analytics.worker = worker()).await;
    let (pk, t0) = fleet(&srv).await;

    // A SQL error is refused at creation, with where it is.
    let (s, v) = srv
        .post(
            "/analytics/jobs",
            json!({"name": "broken", "query": "SELECT device_name,\n  avg(value FROM history"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["code"], "sql_error", "{v}");
    assert_eq!(v["line"], 2, "{v}");
    let (s, v) = srv
        .post(
            "/analytics/jobs",
            json!({"name": "broken", "query": "SELECT nope FROM history"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        (v["line"].as_u64(), v["column"].as_u64()),
        (Some(1), Some(8)),
        "{v}"
    );
    let (s, v) = srv
        .post(
            "/analytics/jobs",
            json!({"name": "bad-cron", "query": "SELECT 1 AS one", "schedule": "every tuesday"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    let query = format!(
        "SELECT h.device_name, avg(h.value) AS mean, count(*) AS n, d.status, max(h.ts) AS last
         FROM history h JOIN devices d
           ON h.product_key = d.product_key AND h.device_name = d.device_name
         WHERE h.product_key = '{pk}' AND h.identifier = 'temp'
           AND h.device_name IN ('dev1', 'dev2') AND h.ts >= {}
         GROUP BY h.device_name, d.status ORDER BY h.device_name",
        t0 + 10_000
    );
    let job = create(&srv, json!({"name": "mean-temp", "query": query})).await;
    let (s, v) = srv
        .post(
            "/analytics/jobs",
            json!({"name": "mean-temp", "query": "SELECT 1 AS one"}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let run = run_now(&srv, job).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    // Only dev1's and dev2's temperatures from t0 + 10 s were read (rows and chunks alike).
    assert_eq!(run["history_rows"], 180, "{run}");
    assert_eq!(run["result_rows"], 2, "{run}");
    let id = run["id"].as_i64().unwrap();
    let (s, v) = srv.get(&format!("/analytics/runs/{id}/result")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["columns"],
        json!(["device_name", "mean", "n", "status", "last"]),
        "{v}"
    );
    assert_eq!(v["total"], 2);
    assert_eq!(
        v["rows"][0],
        json!(["dev1", 10.0, 90, "unactive", "2025-11-24T16:01:39.000Z"]),
        "{v}"
    );
    assert_eq!(v["rows"][1][0], "dev2");
    assert_eq!(v["rows"][1][1], 20.0);
    // Paged.
    let (_, v) = srv
        .get(&format!("/analytics/runs/{id}/result?offset=1&limit=1"))
        .await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["rows"][0][0], "dev2", "{v}");
    // CSV and Parquet exports.
    let url = format!("{}/analytics/runs/{id}/result?format=csv", srv.base);
    let csv = srv
        .http
        .get(&url)
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    let csv = csv.text().await.unwrap();
    assert!(
        csv.starts_with(
            "device_name,mean,n,status,last\ndev1,10.0,90,unactive,2025-11-24T16:01:39"
        ),
        "{csv}"
    );
    let pq = srv
        .http
        .get(format!(
            "{}/analytics/runs/{id}/result?format=parquet",
            srv.base
        ))
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&pq[..4], b"PAR1");

    // Tags and text values; a window of the last N seconds reads nothing of 2025.
    let tags = create(
        &srv,
        json!({"name": "labels-by-site", "query": "SELECT t.tag_value AS site, count(*) AS n, max(h.text) AS last FROM history h JOIN device_tags t ON h.product_key = t.product_key AND h.device_name = t.device_name WHERE h.identifier = 'label' AND t.tag_key = 'site' GROUP BY t.tag_value"}),
    )
    .await;
    let run = run_now(&srv, tags).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let (_, v) = srv
        .get(&format!("/analytics/runs/{}/result", run["id"]))
        .await;
    assert_eq!(v["rows"], json!([["north", 100, "l99"]]), "{v}");
    let recent = create(
        &srv,
        json!({"name": "recent", "query": "SELECT count(*) AS n FROM history", "window_secs": 3600}),
    )
    .await;
    let run = run_now(&srv, recent).await;
    assert_eq!(run["history_rows"], 0, "{run}");

    // Run history, newest first; the job list shows every job.
    let (_, v) = srv.get(&format!("/analytics/jobs/{job}/runs")).await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let (_, v) = srv.get("/analytics/jobs").await;
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");

    // Deleting a job removes its runs and result files.
    let results = srv.dir.path().join("analytics/results");
    assert!(results
        .join(format!("job-{job}/run-{id}.parquet"))
        .is_file());
    let (s, _) = srv
        .call(Method::DELETE, &format!("/analytics/jobs/{job}"), None)
        .await;
    assert_eq!(s, 204);
    assert!(!results.join(format!("job-{job}")).exists());
    let (s, _) = srv.get(&format!("/analytics/runs/{id}")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn limits_fail_the_run_with_the_reason_and_the_cloud_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    // A worker that never answers: the time limit kills it.
    let stall = dir.path().join("stall.sh");
    std::fs::write(&stall, "#!/bin/sh\nexec sleep 600\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stall, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let srv = start(|c| {
        c.analytics.worker = worker();
        c.analytics.max_concurrent_runs = 2;
    })
    .await;
    fleet(&srv).await;

    // Rows: the job would read all 600 points, its limit is 250.
    let rows = create(
        &srv,
        json!({"name": "too-many", "query": "SELECT count(*) AS n FROM history", "max_rows": 250}),
    )
    .await;
    let run = run_now(&srv, rows).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("more than 250 history rows"),
        "{run}"
    );

    // Memory: a cross join of 600 × 600 × 600 rows in 256 MiB.
    let big = create(
        &srv,
        json!({"name": "too-big", "memory_mb": 256, "query": "SELECT a.ts, b.value, c.text FROM history a CROSS JOIN history b CROSS JOIN history c ORDER BY b.value"}),
    )
    .await;
    let run = run_now(&srv, big).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains("memory"), "{run}");

    // Cancel: a run stopped on request fails as cancelled.
    let job = create(&srv, json!({"name": "slow", "query": "SELECT 1 AS one"})).await;
    srv.running.shared.jobs.set_worker(Some(stall.clone()));
    let (_, v) = srv
        .post(&format!("/analytics/jobs/{job}/runs"), json!({}))
        .await;
    let id = v["id"].as_i64().unwrap();
    let (s, _) = srv
        .post(&format!("/analytics/runs/{id}/cancel"), json!({}))
        .await;
    assert_eq!(s, 202);
    let run = finished(&srv, id).await;
    assert_eq!(run["error"], "cancelled", "{run}");

    // Time: the stalled worker is killed at its limit.
    let (s, v) = srv
        .call(
            Method::PUT,
            &format!("/analytics/jobs/{job}"),
            Some(json!({"name": "slow", "query": "SELECT 1 AS one", "timeout_secs": 1})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let run = run_now(&srv, job).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"].as_str().unwrap().contains("time limit of 1 s"),
        "{run}"
    );

    // The cloud still answers, and a job still runs.
    srv.running.shared.jobs.set_worker(worker());
    let ok = create(
        &srv,
        json!({"name": "fine", "query": "SELECT count(*) AS n FROM devices"}),
    )
    .await;
    let run = run_now(&srv, ok).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[tokio::test]
async fn a_schedule_runs_the_job_by_itself() {
    let srv = start(|c| c.analytics.worker = worker()).await;
    let job = create(
        &srv,
        json!({"name": "every-second", "query": "SELECT count(*) AS n FROM products", "schedule": "* * * * * *"}),
    )
    .await;
    let (_, v) = srv.get(&format!("/analytics/jobs/{job}")).await;
    assert!(v["next_run_at"].as_i64().is_some(), "{v}");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, v) = srv.get(&format!("/analytics/jobs/{job}/runs")).await;
        if let Some(r) = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == "succeeded")
        {
            assert_eq!(r["trigger"], "schedule", "{r}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Disabled, it stops.
    let (s, _) = srv
        .call(
            Method::PUT,
            &format!("/analytics/jobs/{job}"),
            Some(json!({"name": "every-second", "query": "SELECT count(*) AS n FROM products", "schedule": "* * * * * *", "enabled": false})),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = srv.get(&format!("/analytics/jobs/{job}")).await;
    assert_eq!(v["next_run_at"], Value::Null, "{v}");
}

#[tokio::test]
async fn a_monitor_trained_on_history_raises_an_anomaly_event_for_a_spike() {
    let srv = start(|_| {}).await;
    let pk = srv
        .product_with_model(json!({"name": "watched"}), TSL)
        .await;
    let mut secrets = Vec::new();
    for dn in ["dev1", "dev2", "dev3", "dev4"] {
        secrets.push(srv.device(&pk, dn).await);
    }
    // Two days of a daily-ish wave with a little deterministic noise, a point a minute, ending
    // a minute ago.
    let db = &srv.running.shared.db;
    let keys: Vec<_> = ["dev1", "dev2", "dev3", "dev4"]
        .iter()
        .map(|d| (pk.clone(), (*d).to_owned(), "temp".to_owned()))
        .collect();
    let ids = db.series_ids(&keys).await.unwrap();
    let now = ironlink_cloud::registry::now_ms() / 60_000 * 60_000;
    let wave = |i: usize, t: i64| {
        let phase = t as f64 / 21_600_000.0 * std::f64::consts::TAU;
        let noise = (((t / 60_000) * 7919 + i as i64 * 104_729) % 101) as f64 / 100.0 - 0.5;
        20.0 + 2.0 * i as f64 + 5.0 * phase.sin() + 0.3 * noise
    };
    let mut rows = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        for m in (1..=2880i64).rev() {
            let t = now - m * 60_000;
            rows.push(PropertyRow {
                series_id: ids[k],
                ts: t,
                value: json!((wave(i, t) * 100.0).round() / 100.0).to_string(),
                history: true,
            });
        }
    }
    db.store_thing_data(&rows, &[], &[]).await.unwrap();
    srv.running.shared.tsdb.stored(
        rows.iter()
            .map(|r| Landed::new(r.series_id, r.ts, Verdict::Store)),
    );

    // Refusals: a text property, an unknown product, a bad sensitivity.
    for (body, status) in [
        (
            json!({"name": "m", "product_key": pk, "identifiers": ["label"]}),
            400,
        ),
        (
            json!({"name": "m", "product_key": "nope", "identifiers": ["temp"]}),
            404,
        ),
        (
            json!({"name": "m", "product_key": pk, "identifiers": ["temp"], "sensitivity": 0.2}),
            400,
        ),
    ] {
        let (s, v) = srv.post("/analytics/anomaly/monitors", body).await;
        assert_eq!(s, status, "{v}");
    }
    let (s, m) = srv
        .post(
            "/analytics/anomaly/monitors",
            json!({"name": "temp-watch", "product_key": pk, "identifiers": ["temp"], "train_days": 3}),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["state"], "ready", "{m}");
    assert_eq!(m["series"], 4, "{m}");

    // A rule reads the monitor's score of each posted value.
    let (s, v) = srv
        .post(
            "/rules",
            json!({
                "name": "scored",
                "sql": format!("SELECT anomaly('temp') AS score, items.temp.value AS v, anomaly('nope') AS none FROM \"/{pk}/+/thing/event/property/post\""),
                "actions": [{"type": "table", "table": "scores"}],
            }),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    // dev1 posts a value on its wave, then a spike.
    let mut d = device_v4(&srv, &pk, "dev1", &secrets[0]).await;
    let topic = format!("/sys/{pk}/dev1/thing/event/property/post");
    let reply = format!("{topic}_reply");
    d.subscribe_v4(&reply, 1).await;
    for (n, (t, v)) in [(now, wave(0, now)), (now + 60_000, 100.0)]
        .iter()
        .enumerate()
    {
        let body = json!({"id": n.to_string(), "params": {"temp": {"value": v, "time": t}}});
        d.publish_v4(
            &topic,
            body.to_string().as_bytes(),
            rumqttc::QoS::AtLeastOnce,
            n as u16 + 1,
        )
        .await;
        loop {
            match d.next_v4().await {
                Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) if p.topic == reply => break,
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    }
    let (s, v) = srv
        .get(&format!(
            "/devices/{pk}/dev1/events?identifier=anomaly&from=0"
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    let events = v["events"].as_array().unwrap();
    let spike = events
        .iter()
        .find(|e| e["output"]["value"] == 100.0)
        .unwrap_or_else(|| panic!("no anomaly event for the spike: {v}"));
    assert_eq!(spike["type"], "alert", "{spike}");
    assert_eq!(spike["output"]["property"], "temp", "{spike}");
    assert_eq!(spike["time"], now + 60_000, "{spike}");
    assert!(
        spike["output"]["upper"].as_f64().unwrap() < 100.0,
        "{spike}"
    );
    let (_, m) = srv.get("/analytics/anomaly/monitors").await;
    assert!(m[0]["alarms"].as_u64().unwrap() >= 1, "{m}");
    // The rule saw both scores: the spike's out of its interval, the wave's within.
    let deadline = std::time::Instant::now() + WAIT;
    let rows = loop {
        let (s, v) = srv.get("/rule-tables/scores?limit=10").await;
        assert_eq!(s, 200, "{v}");
        if v.as_array().unwrap().len() >= 2 {
            break v.as_array().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "rule rows: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let score = |v: f64| {
        rows.iter()
            .map(|r| &r["row"])
            .find(|r| r["v"].as_f64() == Some(v))
            .unwrap_or_else(|| panic!("no row for {v}: {rows:?}"))
            .clone()
    };
    let spike = score(100.0);
    assert_eq!(spike["score"]["anomaly"], true, "{spike}");
    assert_eq!(spike["score"]["monitor"], "temp-watch", "{spike}");
    assert!(spike["none"].is_null(), "{spike}");
    let calm = score(wave(0, now));
    assert_eq!(calm["score"]["anomaly"], false, "{calm}");
    let (lo, hi) = (
        calm["score"]["lower"].as_f64().unwrap(),
        calm["score"]["upper"].as_f64().unwrap(),
    );
    assert!(lo <= wave(0, now) && wave(0, now) <= hi, "{calm}");
    // Retrained on request; deleted, it stops.
    let id = m[0]["id"].as_i64().unwrap();
    let (s, v) = srv
        .post(
            &format!("/analytics/anomaly/monitors/{id}/train"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = srv
        .call(
            Method::DELETE,
            &format!("/analytics/anomaly/monitors/{id}"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (_, m) = srv.get("/analytics/anomaly/monitors").await;
    assert_eq!(m, json!([]));
}
