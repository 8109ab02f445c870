//! The admin CLI and `serve` as a user runs them, as processes: exit codes, JSON errors,
//! batches and CSV import, the data dir lock, SIGHUP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ironlink_sim::cloud_process::{binary, connect_device, Cloud};
use serde_json::Value;
use std::process::{Command, Output};

fn cli(cloud: &Cloud, url: Option<&str>, args: &[&str]) -> Output {
    let url = url.map_or_else(|| format!("http://{}", cloud.http), str::to_owned);
    Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(args)
        .args(["--url", &url, "--token", &cloud.token])
        .env_remove("IRONLINK_URL")
        .env_remove("IRONLINK_TOKEN")
        .output()
        .unwrap()
}

fn json_out(o: &Output) -> Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_calls_exit_non_zero_on_failure_and_speak_json() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let pk = json_out(&cli(&cloud, None, &["product", "create", "cli", "--json"]))["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    // A URL without a scheme works; garbage is refused with the reason.
    let host_port = cloud.http.to_string();
    let v = json_out(&cli(
        &cloud,
        Some(&host_port),
        &["product", "show", &pk, "--json"],
    ));
    assert_eq!(v["product_key"], pk.as_str());
    let o = cli(&cloud, Some("ftp://x"), &["product", "list"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--url"),
        "{o:?}"
    );
    // An API refusal under --json is one JSON object with status and code.
    let o = cli(&cloud, None, &["device", "show", &pk, "nobody", "--json"]);
    assert!(!o.status.success());
    let e: Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(404), Some("not_found")),
        "{e}"
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("ironlink-cloud device list"),
        "hints name CLI commands: {e}"
    );
    let model = dir.path().join("model.json");
    std::fs::write(
        &model,
        r#"{"properties": [{"identifier": "x", "accessMode": "rw", "dataType": {"type": "int", "specs": {"min": "0", "max": "9"}}}],
            "services": [{"identifier": "Reboot", "callType": "async", "inputData": []}]}"#,
    )
    .unwrap();
    let o = cli(
        &cloud,
        None,
        &[
            "product",
            "thing-model",
            &pk,
            "--import",
            model.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{o:?}");
    // A device that is online but never answers (nor subscribes): set and call end failed or
    // timed out, and the CLI exits non-zero.
    let created = json_out(&cli(
        &cloud,
        None,
        &["device", "create", &pk, "mute-01", "--json"],
    ));
    let secret = created["device_secret"].as_str().unwrap().to_owned();
    let _mute = connect_device(cloud.mqtt, &pk, "mute-01", &secret)
        .await
        .expect("connected");
    for args in [
        vec![
            "device",
            "set",
            &pk,
            "mute-01",
            "{\"x\": 1}",
            "--timeout-ms",
            "300",
            "--json",
        ],
        vec![
            "device",
            "call",
            &pk,
            "mute-01",
            "Reboot",
            "--timeout-ms",
            "300",
            "--wait",
            "--json",
        ],
    ] {
        let o = cli(&cloud, None, &args);
        assert!(!o.status.success(), "{args:?}: {o:?}");
        let e: Value = serde_json::from_slice(&o.stderr).unwrap();
        assert!(
            matches!(e["status"].as_str(), Some("failed" | "timed_out")),
            "{args:?}: {e}"
        );
    }
    // Times carry their zone.
    let o = cli(&cloud, None, &["device", "show", &pk, "mute-01"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(" UTC"), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_batches_above_the_api_limit_and_csv_import() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let pk = json_out(&cli(&cloud, None, &["product", "create", "many", "--json"]))["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = json_out(&cli(
        &cloud,
        None,
        &["device", "create", &pk, "--count", "2345", "--json"],
    ));
    assert_eq!(v["devices"].as_array().unwrap().len(), 2345);
    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "device_name,site,floor\ncsv-0001,north,3\ncsv-0002,south,\n",
    )
    .unwrap();
    let v = json_out(&cli(
        &cloud,
        None,
        &["device", "import", &pk, csv.to_str().unwrap(), "--json"],
    ));
    assert_eq!(v["devices"].as_array().unwrap().len(), 2);
    let (s, d) = cloud
        .api(
            reqwest::Method::GET,
            &format!("/devices/{pk}/csv-0001"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        d["tags"],
        serde_json::json!({"site": "north", "floor": "3"})
    );
    let (_, d) = cloud
        .api(
            reqwest::Method::GET,
            &format!("/products/{pk}/devices?page_size=1"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(d["total"], 2347);
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "name\nx\n").unwrap();
    let o = cli(
        &cloud,
        None,
        &["device", "import", &pk, bad.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("device_name"),
        "{o:?}"
    );
    // `device list | head -1`: the reader goes away after one line; the CLI ends quietly and
    // successfully (it used to panic on the broken pipe, failing `set -o pipefail` scripts).
    use std::io::BufRead;
    let mut child = Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(["device", "list", &pk, "--page-size", "1000"])
        .args([
            "--url",
            &format!("http://{}", cloud.http),
            "--token",
            &cloud.token,
        ])
        .env_remove("IRONLINK_URL")
        .env_remove("IRONLINK_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("DEVICE_NAME"), "{first}");
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A second `serve` on a data dir in use refuses to start and names the holder; the first
/// keeps its devices online. SIGHUP reloads instead of killing the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_data_dir_is_refused_and_sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cloud");
    let config = dir.path().join("cloud.toml");
    std::fs::write(&config, "").unwrap();
    let cloud = Cloud::start(&data, &["--config", config.to_str().unwrap()]).unwrap();
    let o = Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args([
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--mqtts-listen", "off", "--amqps-listen", "off"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("in use by process") && err.contains(&cloud.pid().to_string()),
        "{err}"
    );
    // SIGHUP: still serving afterwards, and it says what waits for a restart.
    std::fs::write(&config, "[mqtt]\nmax_connections = 5\n").unwrap();
    cloud.signal("HUP").unwrap();
    let log = data.join("cloud.log");
    let mut said = String::new();
    for _ in 0..100 {
        said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.contains("mqtt.max_connections") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (s, _) = cloud
        .api(reqwest::Method::GET, "/products", None)
        .await
        .unwrap();
    assert_eq!(s, 200, "still serving after SIGHUP; log: {said}");
    assert!(said.contains("next start: mqtt.max_connections"), "{said}");
    assert!(
        !said.contains('\u{1b}'),
        "no ANSI colours off a terminal: {said}"
    );
}

/// Runs the CLI with `stdin` on standard input and another token than the admin's.
fn cli_input(cloud: &Cloud, token: &str, stdin: &str, args: &[&str]) -> Output {
    use std::io::Write;
    let mut child = Command::new(binary("cloud", "ironlink-cloud").unwrap())
        .args(args)
        .args(["--url", &format!("http://{}", cloud.http), "--token", token])
        .env_remove("IRONLINK_URL")
        .env_remove("IRONLINK_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keys_and_the_audit_log_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud"), &[]).unwrap();
    let admin = cloud.token.clone();
    // The password comes on standard input, never on the command line.
    let o = cli_input(
        &cloud,
        &admin,
        "",
        &["user", "create", "ops", "--role", "operator"],
    );
    assert!(!o.status.success(), "no password: refused");
    let v = json_out(&cli_input(
        &cloud,
        &admin,
        "ops-pass-word\n",
        &["user", "create", "ops", "--role", "operator", "--json"],
    ));
    assert_eq!(v["role"], "operator", "{v}");
    // A viewer key for ops, made by the admin token; what it may not do is refused (exit 1).
    let v = json_out(&cli(
        &cloud,
        None,
        &[
            "key",
            "create",
            "--label",
            "dashboards",
            "--role",
            "viewer",
            "--user",
            "ops",
            "--json",
        ],
    ));
    let token = v["token"].as_str().unwrap().to_owned();
    let id = v["id"].as_str().unwrap().to_owned();
    let o = cli_input(&cloud, &token, "", &["product", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = cli_input(&cloud, &token, "", &["product", "create", "nope", "--json"]);
    assert!(!o.status.success());
    let e: Value = serde_json::from_slice(&o.stderr).unwrap();
    assert_eq!(
        (e["status"].as_u64(), e["code"].as_str()),
        (Some(403), Some("forbidden")),
        "{e}"
    );
    let listed = json_out(&cli(
        &cloud,
        None,
        &["key", "list", "--user", "ops", "--json"],
    ));
    assert!(listed.to_string().contains(&id), "{listed}");
    json_out(&cli(&cloud, None, &["key", "revoke", &id, "--json"]));
    let o = cli_input(&cloud, &token, "", &["product", "list", "--json"]);
    assert!(!o.status.success(), "revoked");
    // Role and password changes, then the log of all of it.
    json_out(&cli(
        &cloud,
        None,
        &["user", "set-role", "ops", "viewer", "--json"],
    ));
    let o = cli_input(
        &cloud,
        &admin,
        "new-pass-word\n",
        &["user", "password", "ops", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let users = json_out(&cli(&cloud, None, &["user", "list", "--json"]));
    assert_eq!(users["users"][0]["role"], "viewer", "{users}");
    let audit = json_out(&cli(&cloud, None, &["audit", "--limit", "100", "--json"]));
    let lines: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["actor"].as_str().unwrap(),
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap(),
                e["status"]
            )
        })
        .collect();
    for expected in [
        "admin POST /users 201",
        "admin POST /api-keys 201",
        "ops POST /products 403",
        &format!("admin DELETE /api-keys/{id} 204"),
        "admin PATCH /users/ops 204",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected} not in {lines:?}"
        );
    }
    json_out(&cli(&cloud, None, &["user", "delete", "ops", "--json"]));
}
