//! Ironlink cloud as a child process, for end-to-end tests and benchmarks: started on
//! ephemeral loopback ports, killed with -9, signalled, and measured through /proc.

use anyhow::{anyhow, bail, Context, Result};
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
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
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

/// Path of a workspace binary next to the running executable (`target/<profile>/`, also
/// from `target/<profile>/deps/` for test executables). Refuses a binary older than its
/// package's sources, rather than testing stale code: `cargo test -p ironlink-tests` alone
/// does not rebuild it, `cargo test --workspace` does.
pub fn binary(package_dir: &str, name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let p = dir.join(name);
    let fix = format!("rebuild it: `cargo build -p {name}` (add --release for release binaries), or `cargo test --workspace`");
    let built = std::fs::metadata(&p)
        .and_then(|m| m.modified())
        .map_err(|_| anyhow!("{} not found: {fix}", p.display()))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(package_dir)
        .join("src");
    if src.exists() && built < newest_mtime(&src) {
        bail!("{} is older than {}: {fix}", p.display(), src.display());
    }
    Ok(p)
}

/// A cloud server process.
#[derive(Debug)]
pub struct Cloud {
    /// The child process.
    pub child: Child,
    /// Plain MQTT address.
    pub mqtt: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// AMQP over TLS address, when the server was started with one.
    pub amqps: Option<SocketAddr>,
    /// MQTT over TLS address, when the server was started with one.
    pub mqtts: Option<SocketAddr>,
    /// Admin token.
    pub token: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Lines the server printed before "ready".
    pub banner: Vec<String>,
}

impl Cloud {
    /// Starts `ironlink-cloud serve` on ephemeral loopback ports with `data_dir`, plus any
    /// extra arguments, and waits for its ready line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_bin(&binary("cloud", "ironlink-cloud")?, data_dir, extra)
    }

    /// Like [`Cloud::start`] with an explicit binary.
    pub fn start_bin(bin: &Path, data_dir: &Path, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(if extra.contains(&"--mqtt-listen") {
                &[][..]
            } else {
                &["--mqtt-listen", "127.0.0.1:0"][..]
            })
            .args(if extra.contains(&"--http-listen") {
                &[][..]
            } else {
                &["--http-listen", "127.0.0.1:0"][..]
            })
            .args(if extra.contains(&"--mqtts-listen") {
                &[][..]
            } else {
                &["--mqtts-listen", "off"][..]
            })
            .args(if extra.contains(&"--amqps-listen") {
                &[][..]
            } else {
                &["--amqps-listen", "off"][..]
            })
            .args(extra)
            .env("IRONLINK_LOG", "warn")
            .stdout(Stdio::piped())
            // Warnings and errors go to cloud.log in the data directory, for post-mortems.
            .stderr(
                std::fs::create_dir_all(data_dir)
                    .and_then(|_| std::fs::File::create(data_dir.join("cloud.log")))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Read stdout on a thread so that a server that prints nothing cannot hang us; the
        // thread keeps draining it afterwards so the server never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut banner = Vec::new();
        let (mut mqtt, mut http, mut amqps, mut mqtts) = (None, None, None, None);
        loop {
            let line = rx
                .recv_timeout(WAIT)
                .map_err(|_| anyhow!("server printed no ready line within {WAIT:?}"))?;
            if line.starts_with("Ironlink cloud ready") {
                break;
            }
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
            if line.starts_with("AMQP/TLS") {
                amqps = addr("amqps://");
            }
            if line.starts_with("MQTT/TLS") {
                mqtts = addr("mqtts://");
            }
            banner.push(line);
        }
        let token = std::fs::read_to_string(data_dir.join("admin-token"))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            mqtt: mqtt.context("no MQTT address in the banner")?,
            http: http.context("no HTTP address in the banner")?,
            amqps,
            mqtts,
            token,
            data_dir: data_dir.to_owned(),
            banner,
        })
    }

    /// Starts `bin` (default: the ironlink-cloud next to this executable) for a benchmark:
    /// `config` (TOML) written into `data_dir` and passed with `--config`. A benchmark drives
    /// each device far above a real device's rate, so the per-device message rate is raised
    /// out of the way (the bucket still runs: its cost is part of the figures).
    pub fn start_bench(bin: Option<&Path>, data_dir: &Path, config: &str) -> Result<Self> {
        Self::start_bench_with(bin, data_dir, config, &[])
    }

    /// Like [`Cloud::start_bench`], with extra `serve` flags.
    pub fn start_bench_with(
        bin: Option<&Path>,
        data_dir: &Path,
        config: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let bin = match bin {
            Some(b) => b.to_owned(),
            None => binary("cloud", "ironlink-cloud")?,
        };
        let cfg = data_dir.join("bench.toml");
        let config = if config.contains("[limits.device]") {
            config.to_owned()
        } else {
            format!("{config}\n[limits.device]\nmessages_per_second = 10000000\nmessage_burst = 10000000\n")
        };
        std::fs::write(&cfg, config)?;
        let mut args = vec!["--config", cfg.to_str().context("utf-8 path")?];
        args.extend_from_slice(extra);
        Self::start_bin(&bin, data_dir, &args)
    }

    /// Creates `n` devices of product `pk` (in batches of 1,000, the API's limit); returns
    /// their names and secrets.
    pub async fn create_devices(&self, pk: &str, n: usize) -> Result<Vec<(String, String)>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let batch = (n - out.len()).min(1000);
            let (s, v) = self
                .api(
                    reqwest::Method::POST,
                    &format!("/products/{pk}/devices"),
                    Some(serde_json::json!({"count": batch})),
                )
                .await?;
            if s != 201 || v["devices"].as_array().is_none_or(Vec::is_empty) {
                bail!("creating devices: {s} {v}");
            }
            for d in v["devices"].as_array().context("devices")? {
                out.push((
                    d["device_name"].as_str().context("device_name")?.to_owned(),
                    d["device_secret"]
                        .as_str()
                        .context("device_secret")?
                        .to_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// Creates a product through the API; returns its key.
    pub async fn create_product(&self, body: serde_json::Value) -> Result<String> {
        let (s, p) = self
            .api(reqwest::Method::POST, "/products", Some(body))
            .await?;
        if s != 201 {
            anyhow::bail!("creating a product: {s} {p}");
        }
        Ok(p["product_key"].as_str().context("product_key")?.to_owned())
    }

    /// Lets gateways register new devices of product `pk` (`thing/sub/register`).
    pub async fn allow_dynamic_register(&self, pk: &str) -> Result<()> {
        let (s, v) = self
            .api(
                reqwest::Method::PATCH,
                &format!("/products/{pk}"),
                Some(serde_json::json!({"dynamic_register": true})),
            )
            .await?;
        if s != 200 {
            anyhow::bail!("dynamic registration: {s} {v}");
        }
        Ok(())
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends a signal by name (TERM, INT) with the system `kill`.
    pub fn signal(&self, sig: &str) -> Result<()> {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()?;
        if !st.success() {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }

    /// Waits (bounded by [`WAIT`]) for the process to exit; true for exit status 0.
    pub fn wait_exit(mut self) -> Result<bool> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.success());
            }
            if std::time::Instant::now() > deadline {
                bail!("server did not exit within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// Calls the API; returns status and JSON body (Null when the body is not JSON).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = reqwest::Client::new()
            .request(method, format!("http://{}/api/v1{path}", self.http))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let s = r.status().as_u16();
        Ok((s, r.json().await.unwrap_or(Value::Null)))
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")
}

/// Fails with the reason when this process (and so the cloud or broker it starts, which
/// inherit its limit) cannot open `needed` more files: each simulated connection costs one
/// descriptor on each side.
pub fn fd_budget(needed: usize) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let soft: Option<usize> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    match soft {
        Some(max) if needed + 256 > max => bail!(
            "{needed} connections need about {} open files per process; the limit here is {max} (ulimit -n)",
            needed + 256
        ),
        _ => Ok(()),
    }
}

/// The last `n` lines of the cloud's log in `data_dir` (empty when there is none).
pub fn log_tail(data_dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(data_dir.join("cloud.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CPU time (user + system) of a process in clock ticks, from /proc.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// The CONNECT packet of an Alink device (MQTT 3.1.1, HMAC-SHA256, securemode=3).
pub fn alink_connect(pk: &str, dn: &str, secret: &str, keep_alive: u16) -> Result<BytesMut> {
    let creds = ironlink_cloud::cli::credentials(
        pk,
        dn,
        secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        false,
        ironlink_cloud::registry::now_ms(),
    );
    let field = |k: &str| {
        creds[k]
            .as_str()
            .map(str::to_owned)
            .context("credential field")
    };
    let mut c = v4::Connect::new(field("client_id")?);
    c.keep_alive = keep_alive;
    c.set_login(field("username")?, field("password")?);
    let mut b = BytesMut::new();
    c.write(&mut b)
        .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
    Ok(b)
}

/// Sends a prepared CONNECT and waits (bounded) for CONNACK; the stream when accepted,
/// `None` when refused or closed first.
pub async fn connect_raw(addr: SocketAddr, connect: &[u8]) -> Option<TcpStream> {
    connect_raw_why(addr, connect).await.ok()
}

/// [`connect_raw`], saying why a connection was not made.
pub async fn connect_raw_why(addr: SocketAddr, connect: &[u8]) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.context("TCP connect")?;
    s.write_all(connect).await.context("sending CONNECT")?;
    let mut buf = BytesMut::new();
    loop {
        match v4::Packet::read(&mut buf, 1024) {
            Ok(v4::Packet::ConnAck(a)) if a.code == v4::ConnectReturnCode::Success => return Ok(s),
            Ok(v4::Packet::ConnAck(a)) => bail!("CONNACK {:?}", a.code),
            Ok(p) => bail!("{p:?} before CONNACK"),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                match tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) => bail!("closed before CONNACK"),
                    Ok(Err(e)) => bail!("reading CONNACK: {e}"),
                    Err(_) => bail!("no CONNACK within {WAIT:?}"),
                }
            }
            Err(e) => bail!("malformed CONNACK: {e:?}"),
        }
    }
}

/// Connects an Alink device over plain MQTT 3.1.1.
pub async fn connect_device(
    addr: SocketAddr,
    pk: &str,
    dn: &str,
    secret: &str,
) -> Option<TcpStream> {
    let connect = alink_connect(pk, dn, secret, 120).ok()?;
    connect_raw(addr, &connect).await
}

/// rumqttc options of an Alink device (HMAC-SHA256, securemode=3) at `addr`.
pub fn device_options(
    addr: SocketAddr,
    pk: &str,
    dn: &str,
    secret: &str,
    keep_alive: std::time::Duration,
) -> Result<rumqttc::MqttOptions> {
    let (mut cid, mut user) = (String::new(), String::new());
    let sig = ironlink_shared::credentials::write_device_credentials(
        pk,
        dn,
        secret,
        ironlink_shared::sign::SignMethod::HmacSha256,
        3,
        None,
        &mut cid,
        &mut user,
    )
    .map_err(|_| anyhow!("cannot format credentials of {pk}/{dn}"))?;
    let mut o = rumqttc::MqttOptions::new(cid, addr.ip().to_string(), addr.port());
    o.set_credentials(user, sig.as_str().to_owned());
    o.set_keep_alive(keep_alive);
    Ok(o)
}
