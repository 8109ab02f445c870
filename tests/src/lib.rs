//! Helpers for end-to-end tests that run Ironlink binaries as separate processes, so that
//! they can be killed (-9), signalled and measured like in production.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait is for an event, bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(newest)
        };
        newest = newest.max(t);
    }
    newest
}

/// Path of a workspace binary, built by `cargo test --workspace` next to the test executable.
/// Refuses a binary older than its package's sources (`cargo test -p ironlink-tests` alone
/// does not rebuild it), rather than testing stale code.
pub fn binary(package_dir: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    let fix = format!("run `cargo build -p {name}` or `cargo test --workspace`");
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} not found: {fix}", p.display()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(package_dir)
        .join("src");
    assert!(
        built >= newest_mtime(&src),
        "{} is older than {}: {fix}",
        p.display(),
        src.display()
    );
    p
}

/// A cloud server process.
#[derive(Debug)]
pub struct Cloud {
    pub child: Child,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub token: String,
    pub data_dir: PathBuf,
    /// Lines the server printed at start.
    pub banner: Vec<String>,
}

impl Cloud {
    /// Starts `ironlink-cloud serve` on ephemeral loopback ports with `data_dir`, plus any
    /// extra arguments, and waits for its start banner.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(binary("cloud", "ironlink-cloud"))
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--mqtt-listen",
                "127.0.0.1:0",
                "--mqtts-listen",
                "off",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("IRONLINK_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Read stdout on a thread so that a server that prints nothing cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let (mut mqtt, mut http) = (None, None);
        loop {
            let line = rx
                .recv_timeout(WAIT)
                .expect("server printed no ready line within the wait bound");
            let addr = |prefix: &str| -> Option<SocketAddr> {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(prefix))
                    .and_then(|a| a.trim_end_matches("/api/v1").parse().ok())
            };
            if line.starts_with("MQTT ") {
                mqtt = addr("mqtt://");
            }
            if line.starts_with("HTTP API") {
                http = addr("http://");
            }
            if line.starts_with("Ironlink cloud ready") {
                break;
            }
            banner.push(line);
        }
        // The reader thread keeps draining stdout, so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in rx {});
        let token = std::fs::read_to_string(data_dir.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            mqtt: mqtt.expect("MQTT address in banner"),
            http: http.expect("HTTP address in banner"),
            token,
            data_dir: data_dir.to_owned(),
            banner,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends a signal by name (TERM, INT) with the system `kill`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit; returns whether it exited with status 0.
    pub fn wait_exit(mut self) -> bool {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("http://{}/api/v1{path}", self.http))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connected device over plain MQTT 3.1.1; `None` when the CONNECT was refused or the
/// connection closed first.
pub async fn connect_device(
    addr: SocketAddr,
    pk: &str,
    dn: &str,
    secret: &str,
) -> Option<TcpStream> {
    let creds = ironlink_cloud::cli::credentials(
        pk,
        dn,
        secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        false,
        ironlink_cloud::registry::now_ms(),
    );
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut c = v4::Connect::new(creds["client_id"].as_str().unwrap());
    c.keep_alive = 120;
    c.set_login(
        creds["username"].as_str().unwrap(),
        creds["password"].as_str().unwrap(),
    );
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    s.write_all(&b).await.ok()?;
    let mut buf = BytesMut::new();
    loop {
        match v4::read(&mut buf, 1024) {
            Ok(v4::Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success => {
                return Some(s)
            }
            Ok(_) => return None,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
            Err(_) => return None,
        }
    }
}
