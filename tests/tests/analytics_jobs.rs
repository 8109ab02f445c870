//! Analytics jobs through kill -9: the cloud dies while workers run and runs wait; after the
//! restart no run is left "running", the interrupted ones say why, every succeeded run's result
//! reads back, no result file is left that no run holds, and the workers died with the cloud.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Children of `pid` whose command line names the analytics worker.
fn workers_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the command name may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
        if ppid == Some(pid) && String::from_utf8_lossy(&cmdline).contains("analytics-worker") {
            out.push(child);
        }
    }
    out
}

/// Starts a run of `job`; its id.
async fn start_run(cloud: &Cloud, job: i64) -> i64 {
    let (s, v) = cloud
        .api(
            Method::POST,
            &format!("/analytics/jobs/{job}/runs"),
            Some(json!({})),
        )
        .await
        .unwrap();
    assert_eq!(s, 202, "{v}");
    v["id"].as_i64().unwrap()
}

async fn runs(cloud: &Cloud, job: i64) -> Vec<Value> {
    let (s, v) = cloud
        .api(
            Method::GET,
            &format!("/analytics/jobs/{job}/runs?limit=100"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    v.as_array().unwrap().clone()
}

#[tokio::test]
async fn kill_9_during_runs_leaves_no_run_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(&config, "[analytics]\nmax_concurrent_runs = 1\n").unwrap();
    let cfg = config.to_str().unwrap();
    let data = dir.path().join("data");
    let cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    let pk = cloud
        .create_product(json!({"name": "fleet"}))
        .await
        .unwrap();
    cloud.create_devices(&pk, 200).await.unwrap();
    // 200³ = 8 million joined rows a run: long enough that the kill lands in a run.
    let (s, v) = cloud
        .api(
            Method::POST,
            "/analytics/jobs",
            Some(json!({"name": "pairs", "keep_runs": 100,
                "query": "SELECT a.status, count(*) AS n, max(b.device_name) AS m FROM devices a CROSS JOIN devices b CROSS JOIN devices c GROUP BY a.status"})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let job = v["id"].as_i64().unwrap();
    // Ten runs queued on one slot.
    for _ in 0..10 {
        start_run(&cloud, job).await;
    }
    // Kill once a worker is running.
    let deadline = std::time::Instant::now() + WAIT;
    let workers = loop {
        let w = workers_of(cloud.pid());
        if !w.is_empty() {
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "no worker started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    cloud.kill9().unwrap();
    // The workers notice (their standard input closes) and exit.
    let deadline = std::time::Instant::now() + WAIT;
    while workers
        .iter()
        .any(|w| std::path::Path::new(&format!("/proc/{w}")).exists() && !zombie(*w))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "workers {workers:?} outlived the cloud"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let cloud = Cloud::start(&data, &["--config", cfg]).unwrap();
    let all = runs(&cloud, job).await;
    assert_eq!(all.len(), 10, "{all:?}");
    let interrupted = all
        .iter()
        .filter(|r| r["error"] == "interrupted: the cloud stopped during the run")
        .count();
    assert!(interrupted >= 1, "{all:?}");
    let mut kept = std::collections::HashSet::new();
    for r in &all {
        assert_ne!(r["status"], "running", "{r}");
        if r["status"] == "succeeded" {
            let id = r["id"].as_i64().unwrap();
            let (s, v) = cloud
                .api(Method::GET, &format!("/analytics/runs/{id}/result"), None)
                .await
                .unwrap();
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["rows"][0][1], 8_000_000, "{v}");
            kept.insert(format!("run-{id}.parquet"));
        }
    }
    // Only the results of succeeded runs are on disk (no half-written file).
    let on_disk: std::collections::HashSet<String> =
        match std::fs::read_dir(data.join(format!("analytics/results/job-{job}"))) {
            Ok(d) => d
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Default::default(),
        };
    assert_eq!(on_disk, kept);
    // And the job runs again.
    let id = start_run(&cloud, job).await;
    let deadline = std::time::Instant::now() + WAIT * 4;
    loop {
        let (_, v) = cloud
            .api(Method::GET, &format!("/analytics/runs/{id}"), None)
            .await
            .unwrap();
        if v["status"] != "running" {
            assert_eq!(v["status"], "succeeded", "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}
