//! `ironlink-cloud ota ...`: signing keys and signatures (local), packages, campaigns with a
//! live progress view, and a device's OTA state (against a running server).

use super::{output, print_table, ApiCallError, Client, ClientArgs};
use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// `ota` actions.
#[derive(Debug, Subcommand)]
pub enum OtaCmd {
    /// Make a signing key: its seed goes to FILE (readable by you only; never overwritten), the
    /// public key to build into devices is printed.
    Keygen {
        /// Where to write the key.
        file: PathBuf,
    },
    /// Sign an image: prints its size, SHA-256, MD5, the ed25519 signature over its SHA-512
    /// and the public key, as one JSON object (the notice's `sign`, `md5` and `ed25519`).
    Sign {
        /// The key file `keygen` wrote.
        #[arg(long)]
        key: PathBuf,
        /// The firmware image.
        image: PathBuf,
    },
    /// Firmware packages on the server.
    Package {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Package action.
        #[command(subcommand)]
        cmd: PackageCmd,
    },
    /// Upgrade campaigns.
    Campaign {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Campaign action.
        #[command(subcommand)]
        cmd: CampaignCmd,
    },
    /// A device's reported module versions, its upgrade jobs and their history.
    Device {
        /// Server connection.
        #[command(flatten)]
        client: ClientArgs,
        /// Product key.
        product_key: String,
        /// Device name.
        device_name: String,
    },
}

/// Package actions.
#[derive(Debug, Subcommand)]
pub enum PackageCmd {
    /// Upload an image (streamed; the server digests it and signs it with its configured key
    /// unless a signature comes with it).
    Upload {
        /// Product whose devices take it.
        #[arg(long)]
        product: String,
        /// The version devices report once upgraded.
        #[arg(long)]
        version: String,
        /// OTA module (default `default`: the whole device).
        #[arg(long)]
        module: Option<String>,
        /// A version it may be installed over (repeat; default: any).
        #[arg(long = "src-version")]
        src_versions: Vec<String>,
        /// Digest in notices' `sign`: Md5 (what Alibaba's SDKs check by default) or SHA256.
        #[arg(long)]
        sign_method: Option<String>,
        /// ed25519 signature from `ota sign` (hex), or the JSON file `ota sign` printed.
        #[arg(long)]
        signature: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// List packages.
    List {
        /// Only this product's.
        #[arg(long)]
        product: Option<String>,
    },
    /// Show one package.
    Show {
        /// Package id.
        id: String,
    },
    /// Delete a package no campaign uses.
    Delete {
        /// Package id.
        id: String,
    },
}

/// Campaign actions.
#[derive(Debug, Subcommand)]
pub enum CampaignCmd {
    /// Start a campaign.
    Create(Box<CreateArgs>),
    /// List campaigns.
    List,
    /// Show one campaign with its devices counted by state.
    Show {
        /// Campaign id.
        id: String,
        /// Follow it live until it is over (a progress bar on a terminal).
        #[arg(long)]
        watch: bool,
    },
    /// Stop sending notices (devices already upgrading carry on).
    Pause {
        /// Campaign id.
        id: String,
    },
    /// Resume a paused campaign.
    Resume {
        /// Campaign id.
        id: String,
    },
    /// Cancel: queued and running jobs end; their download links stop.
    Cancel {
        /// Campaign id.
        id: String,
    },
    /// A campaign's devices and their jobs.
    Devices {
        /// Campaign id.
        id: String,
        /// Only jobs in this state (queued, notified, downloading, verifying, flashing,
        /// succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Skip this many.
        #[arg(long, default_value_t = 0)]
        offset: i64,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

/// `ota campaign create`: the target and the policy (flags override `--policy-file`).
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The package to install.
    #[arg(long)]
    package: String,
    /// A name for people.
    #[arg(long)]
    name: String,
    /// Only these devices (repeat).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Only devices that reported one of these versions (repeat).
    #[arg(long = "src-version")]
    src_versions: Vec<String>,
    /// Only devices with this tag, KEY=VALUE (repeat; all must match).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Gray release: this share of the devices, in percent.
    #[arg(long)]
    percent: Option<f64>,
    /// A policy as JSON (see the API's Policy schema); the flags below override its fields.
    #[arg(long)]
    policy_file: Option<PathBuf>,
    /// Notices per minute.
    #[arg(long)]
    rate: Option<u32>,
    /// Start at this many notices per minute and grow (with --ramp-factor, --ramp-every).
    #[arg(long)]
    ramp_start: Option<u32>,
    /// Ramp growth per step (default 2).
    #[arg(long)]
    ramp_factor: Option<f64>,
    /// Time between ramp steps (default 1m).
    #[arg(long)]
    ramp_every: Option<String>,
    /// Devices upgrading at once at most.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Silence after which an attempt times out, e.g. 30m.
    #[arg(long)]
    timeout: Option<String>,
    /// Further attempts after a timeout or a retryable failure.
    #[arg(long)]
    retries: Option<u32>,
    /// Abort when this share (0..1) of finished devices failed.
    #[arg(long)]
    abort_failure_rate: Option<f64>,
    /// Notify only in these local times of day, HH:MM-HH:MM (repeat).
    #[arg(long = "window")]
    windows: Vec<String>,
    /// The windows' offset from UTC, e.g. +08:00.
    #[arg(long)]
    utc_offset: Option<String>,
    /// A canary stage of this many devices first.
    #[arg(long)]
    canary: Option<u32>,
    /// A canary device (repeat).
    #[arg(long = "canary-device")]
    canary_devices: Vec<String>,
    /// Share (0..1) of canaries that must succeed (default 1).
    #[arg(long)]
    canary_success_rate: Option<f64>,
    /// Download bandwidth of the campaign, bytes per second.
    #[arg(long)]
    bandwidth: Option<u64>,
    /// How long download links stay valid, e.g. 24h.
    #[arg(long)]
    token_ttl: Option<String>,
    /// Keep running this long, picking up devices that start to match, e.g. 7d.
    #[arg(long)]
    run_for: Option<String>,
    /// Follow it live after starting it.
    #[arg(long)]
    watch: bool,
}

impl OtaCmd {
    /// True when the command asked for JSON.
    pub fn wants_json(&self) -> bool {
        match self {
            OtaCmd::Keygen { .. } | OtaCmd::Sign { .. } => false,
            OtaCmd::Package { client, .. }
            | OtaCmd::Campaign { client, .. }
            | OtaCmd::Device { client, .. } => client.json,
        }
    }
}

const PACKAGE_COLS: &[&str] = &[
    "id",
    "product_key",
    "module",
    "version",
    "size",
    "created_at",
];
const CAMPAIGN_COLS: &[&str] = &["id", "name", "state", "stage", "devices", "created_at"];
const JOB_COLS: &[&str] = &[
    "device_name",
    "state",
    "attempt",
    "step",
    "reason",
    "updated_at",
];

/// Runs an `ota` command.
pub async fn run(cmd: OtaCmd) -> anyhow::Result<()> {
    use crate::ota::sign;
    use reqwest::Method;
    match cmd {
        OtaCmd::Keygen { file } => {
            let public = sign::keygen(&file)?;
            println!("{public}");
            eprintln!(
                "signing key written to {} (keep it off devices and servers you do not trust); the public key above goes into devices",
                file.display()
            );
        }
        OtaCmd::Sign { key, image } => {
            let signed = sign::sign_file(&sign::read_key(&key)?, &image)?;
            println!("{}", serde_json::to_string_pretty(&signed)?);
        }
        OtaCmd::Device {
            client,
            product_key,
            device_name,
        } => {
            let c = Client::new(&client)?;
            let v = c
                .call(
                    Method::GET,
                    &format!("/devices/{product_key}/{device_name}/ota"),
                    None,
                )
                .await?;
            if c.json {
                output(&c, &v, None);
            } else {
                println!("modules:");
                print_table(list(&v, "modules"), &["module", "version", "reported_at"]);
                println!("\njobs:");
                print_table(
                    list(&v, "jobs"),
                    &[
                        "campaign_id",
                        "module",
                        "state",
                        "attempt",
                        "step",
                        "reason",
                        "updated_at",
                    ],
                );
                println!("\nhistory:");
                print_table(
                    list(&v, "history"),
                    &["at", "campaign_id", "attempt", "state", "step", "detail"],
                );
            }
        }
        OtaCmd::Package { client, cmd } => {
            let c = Client::new(&client)?;
            match cmd {
                PackageCmd::Upload {
                    product,
                    version,
                    module,
                    src_versions,
                    sign_method,
                    signature,
                    description,
                    image,
                } => {
                    let v = upload(
                        &c,
                        &product,
                        &version,
                        module,
                        src_versions,
                        sign_method,
                        signature,
                        description,
                        &image,
                    )
                    .await?;
                    output(&c, &v, None);
                }
                PackageCmd::List { product } => {
                    let path = match product {
                        Some(pk) => format!("/ota/packages?product_key={}", enc(&pk)),
                        None => "/ota/packages".into(),
                    };
                    let v = c.call(Method::GET, &path, None).await?;
                    output(&c, &v, Some(("packages", PACKAGE_COLS)));
                }
                PackageCmd::Show { id } => {
                    c.record(Method::GET, &format!("/ota/packages/{id}"), None)
                        .await?
                }
                PackageCmd::Delete { id } => {
                    c.call(Method::DELETE, &format!("/ota/packages/{id}"), None)
                        .await?;
                    if !c.json {
                        println!("package {id} deleted");
                    }
                }
            }
        }
        OtaCmd::Campaign { client, cmd } => {
            let c = Client::new(&client)?;
            match cmd {
                CampaignCmd::Create(a) => {
                    let watch = a.watch;
                    let body = campaign_body(*a)?;
                    let v = c.call(Method::POST, "/ota/campaigns", Some(body)).await?;
                    let id = v["id"].as_str().unwrap_or_default().to_owned();
                    if watch && !c.json {
                        println!(
                            "campaign {id}: {} devices ({} canaries); left out: {} already current, {} on another version, {} busy",
                            v["jobs"], v["canaries"], v["already_current"], v["wrong_source"], v["busy"]
                        );
                        return follow(&c, &id).await;
                    }
                    output(&c, &v, None);
                }
                CampaignCmd::List => {
                    let v = c.call(Method::GET, "/ota/campaigns", None).await?;
                    output(&c, &v, Some(("campaigns", CAMPAIGN_COLS)));
                }
                CampaignCmd::Show { id, watch } => {
                    if watch && !c.json {
                        return follow(&c, &id).await;
                    }
                    let v = c
                        .call(Method::GET, &format!("/ota/campaigns/{id}"), None)
                        .await?;
                    if c.json {
                        output(&c, &v, None);
                    } else {
                        println!("{}", summary(&v));
                    }
                }
                CampaignCmd::Pause { id } => control(&c, &id, "pause").await?,
                CampaignCmd::Resume { id } => control(&c, &id, "resume").await?,
                CampaignCmd::Cancel { id } => control(&c, &id, "cancel").await?,
                CampaignCmd::Devices {
                    id,
                    state,
                    offset,
                    limit,
                } => {
                    let mut path =
                        format!("/ota/campaigns/{id}/devices?offset={offset}&limit={limit}");
                    if let Some(s) = state {
                        path.push_str(&format!("&state={}", enc(&s)));
                    }
                    let v = c.call(Method::GET, &path, None).await?;
                    output(&c, &v, Some(("jobs", JOB_COLS)));
                }
            }
        }
    }
    Ok(())
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)] // the upload's flags, passed on once
async fn upload(
    c: &Client,
    product: &str,
    version: &str,
    module: Option<String>,
    src_versions: Vec<String>,
    sign_method: Option<String>,
    signature: Option<String>,
    description: Option<String>,
    image: &std::path::Path,
) -> anyhow::Result<Value> {
    let mut query = vec![
        ("product_key", product.to_owned()),
        ("version", version.to_owned()),
    ];
    if let Some(m) = module {
        query.push(("module", m));
    }
    if !src_versions.is_empty() {
        query.push(("src_versions", src_versions.join(",")));
    }
    if let Some(m) = sign_method {
        query.push(("sign_method", m));
    }
    if let Some(s) = signature {
        // The JSON file `ota sign` printed, or the signature itself.
        let sig = match std::fs::read_to_string(&s) {
            Ok(text) => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["ed25519"].as_str().map(str::to_owned))
                .with_context(|| format!("{s}: not the JSON `ota sign` prints"))?,
            Err(_) => s,
        };
        query.push(("ed25519", sig));
    }
    if let Some(d) = description {
        query.push(("description", d));
    }
    if let Some(name) = image.file_name().and_then(|n| n.to_str()) {
        query.push(("file_name", name.to_owned()));
    }
    let file = tokio::fs::File::open(image)
        .await
        .with_context(|| format!("opening {}", image.display()))?;
    let qs: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    let url = format!("{}/api/v1/ota/packages?{}", c.url, qs.join("&"));
    let resp = c
        .http
        .post(&url)
        .bearer_auth(&c.token)
        .header("Content-Type", "application/octet-stream")
        .body(reqwest::Body::from(file))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}: is `ironlink-cloud serve` running?"))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(ApiCallError {
            status: status.as_u16(),
            code: v["code"].as_str().unwrap_or("error").to_owned(),
            message: v["message"].as_str().unwrap_or("no message").to_owned(),
        }
        .into());
    }
    Ok(v)
}

fn campaign_body(a: CreateArgs) -> anyhow::Result<Value> {
    let mut policy: Value = match &a.policy_file {
        Some(f) => serde_json::from_str(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )
        .with_context(|| format!("{}: not JSON", f.display()))?,
        None => json!({}),
    };
    let Some(p) = policy.as_object_mut() else {
        bail!("the policy file must hold a JSON object");
    };
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            p.insert(k.into(), v);
        }
    };
    set("pushes_per_minute", a.rate.map(Value::from));
    set("max_concurrent", a.max_concurrent.map(Value::from));
    set("timeout", a.timeout.map(Value::from));
    set("retries", a.retries.map(Value::from));
    set("abort_failure_rate", a.abort_failure_rate.map(Value::from));
    set("utc_offset", a.utc_offset.map(Value::from));
    set("download_bytes_per_second", a.bandwidth.map(Value::from));
    set("token_ttl", a.token_ttl.map(Value::from));
    set("run_for", a.run_for.map(Value::from));
    if a.ramp_start.is_some() || a.ramp_factor.is_some() || a.ramp_every.is_some() {
        let mut r = serde_json::Map::new();
        if let Some(s) = a.ramp_start {
            r.insert("start_per_minute".into(), s.into());
        }
        if let Some(f) = a.ramp_factor {
            r.insert("factor".into(), f.into());
        }
        if let Some(e) = a.ramp_every {
            r.insert("every".into(), e.into());
        }
        set("ramp", Some(Value::Object(r)));
    }
    if !a.windows.is_empty() {
        let mut ws = Vec::new();
        for w in &a.windows {
            let (from, to) = w
                .split_once('-')
                .with_context(|| format!("--window {w}: use HH:MM-HH:MM"))?;
            ws.push(json!({"from": from, "to": to}));
        }
        set("windows", Some(Value::Array(ws)));
    }
    if a.canary.is_some() || !a.canary_devices.is_empty() {
        let mut k = json!({"count": a.canary.unwrap_or(0), "devices": a.canary_devices});
        if let (Some(r), Some(o)) = (a.canary_success_rate, k.as_object_mut()) {
            o.insert("success_rate".into(), r.into());
        }
        set("canary", Some(k));
    }
    let mut tags = serde_json::Map::new();
    for t in &a.tags {
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("--tag {t}: use KEY=VALUE"))?;
        tags.insert(k.into(), v.into());
    }
    let mut target = json!({"devices": a.devices, "src_versions": a.src_versions, "tags": tags});
    if let (Some(p), Some(o)) = (a.percent, target.as_object_mut()) {
        o.insert("percent".into(), p.into());
    }
    Ok(json!({"name": a.name, "package_id": a.package, "target": target, "policy": policy}))
}

async fn control(c: &Client, id: &str, action: &str) -> anyhow::Result<()> {
    let v = c
        .call(
            reqwest::Method::POST,
            &format!("/ota/campaigns/{id}/{action}"),
            None,
        )
        .await?;
    if c.json {
        output(c, &v, None);
    } else {
        println!("{}", summary(&v));
    }
    Ok(())
}

/// One line per state with a count, then the failure reasons.
fn counts(v: &Value) -> String {
    let states = &v["states"];
    crate::ota::plan::JobState::ALL
        .iter()
        .map(|s| (s.as_str(), states[s.as_str()].as_u64().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary(v: &Value) -> String {
    let mut out = format!(
        "campaign {} ({}): {}, stage {}, {} devices: {}",
        v["id"].as_str().unwrap_or("?"),
        v["name"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or("?"),
        v["stage"].as_str().unwrap_or("?"),
        v["devices"],
        counts(v)
    );
    if let Some(r) = v["reason"].as_str().filter(|r| !r.is_empty()) {
        out.push_str(&format!("\nreason: {r}"));
    }
    for f in list(v, "failures") {
        out.push_str(&format!(
            "\nfailed {}: {}",
            f["count"],
            f["reason"].as_str().unwrap_or("")
        ));
    }
    out
}

/// Follows a campaign until it is over: a progress bar (finished devices of all) with the
/// counts per state on a terminal, a line per change otherwise.
async fn follow(c: &Client, id: &str) -> anyhow::Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if tty {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} done  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = String::new();
    loop {
        let v = c
            .call(reqwest::Method::GET, &format!("/ota/campaigns/{id}"), None)
            .await?;
        let s = &v["states"];
        let done: u64 = ["succeeded", "failed", "cancelled"]
            .iter()
            .map(|k| s[*k].as_u64().unwrap_or(0))
            .sum();
        bar.set_length(v["devices"].as_u64().unwrap_or(0));
        bar.set_position(done);
        let line = format!(
            "{} ({}): {}",
            v["state"].as_str().unwrap_or("?"),
            v["stage"].as_str().unwrap_or("?"),
            counts(&v)
        );
        bar.set_message(line.clone());
        if !tty && line != last {
            println!("{line}");
        }
        last = line;
        let state = v["state"].as_str().unwrap_or("");
        if state != "running" && state != "paused" {
            bar.finish_and_clear();
            println!("{}", summary(&v));
            if state == "aborted" {
                bail!("campaign {id} aborted");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
