//! `ironlink-sim`: thin binary over the library.

use clap::{Parser, Subcommand};
use ironlink_sim::bench::{run_connections, ConnectionsBench};
use ironlink_sim::report::Report;
use std::path::PathBuf;

/// Ironlink fleet simulator and load generator.
#[derive(Debug, Parser)]
#[command(name = "ironlink-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs a scenario (TOML: fleets, value generators with labelled anomalies, faults) against
    /// a cloud started in this process; prints what was sent, acknowledged and stored.
    Run {
        /// The scenario file (see `sim/scenarios/`).
        scenario: PathBuf,
        /// Write the report (with the anomaly labels) as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A living plant in one command: the cloud on embedded defaults, an edge gateway polling
    /// simulated Modbus power meters, and MQTT sensors; prints what to open and try.
    Quickstart {
        /// Data directory (cloud database, edge queue, the devices created).
        #[arg(long, default_value = "ironlink-quickstart")]
        data_dir: PathBuf,
        /// HTTP API listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: std::net::SocketAddr,
        /// MQTT listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt_listen: std::net::SocketAddr,
        /// Edge status listener.
        #[arg(long, default_value = "127.0.0.1:9080")]
        edge_status_listen: std::net::SocketAddr,
        /// Modbus power meters behind the edge gateway.
        #[arg(long, default_value_t = 3)]
        meters: usize,
        /// Direct MQTT sensors.
        #[arg(long, default_value_t = 3)]
        sensors: usize,
    },
    /// Benchmarks (loopback only, bounded).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Authenticated connects per second and RSS per idle connection.
    Connections {
        /// Connections per target.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Baseline to measure in the same run (`mosquitto`).
        #[arg(long)]
        vs: Option<String>,
        /// Runs, alternating Ironlink and the baseline; the median run of each is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Device -> application over AMQP (consumer group) vs mosquitto, and backlog replay.
    Apps {
        /// Publishing devices.
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Messages per device (throughput phase).
        #[arg(long, default_value_t = 400)]
        messages: usize,
        /// Backlog size (messages queued while no application is connected).
        #[arg(long, default_value_t = 20_000)]
        backlog: usize,
        /// Fresh messages per second during the replay.
        #[arg(long, default_value_t = 200)]
        fresh_rate: u32,
        /// Baseline to measure in the same run (`mosquitto`).
        #[arg(long)]
        vs: Option<String>,
        /// Runs, alternating Ironlink and the baseline; the median run of each is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A product broadcast reaching N subscribed devices (QoS 0 or 1) vs mosquitto fanning
    /// one topic out to N subscribers.
    Fanout {
        /// Subscribed devices.
        #[arg(long, default_value_t = 1_000)]
        devices: usize,
        /// QoS (0 or 1).
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Broadcasts measured.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Baseline to measure in the same run (`mosquitto`).
        #[arg(long)]
        vs: Option<String>,
        /// Runs, alternating Ironlink and the baseline; the median run of each is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Application -> device property sets per second through the API vs a mosquitto
    /// publisher, devices answering each.
    Downlinks {
        /// Online devices.
        #[arg(long, default_value_t = 1_000)]
        devices: usize,
        /// Property sets in total.
        #[arg(long, default_value_t = 20_000)]
        sets: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Baseline to measure in the same run (`mosquitto`).
        #[arg(long)]
        vs: Option<String>,
        /// Runs, alternating Ironlink and the baseline; the median run of each is reported.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Sub-devices one gateway connection carries: topo/add, batch_login, one post each.
    Gateway {
        /// Sub-devices.
        #[arg(long, default_value_t = 10_000)]
        subs: usize,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
    },
    /// An OTA campaign over simulated sub-devices behind gateways (notices per minute,
    /// notice-to-success times, cloud CPU and RSS), then concurrent ranged downloads of the
    /// image vs nginx.
    Ota {
        /// Devices in the campaign.
        #[arg(long, default_value_t = 100_000)]
        devices: usize,
        /// Gateway connections carrying them.
        #[arg(long, default_value_t = 20)]
        gateways: usize,
        /// Concurrent ranged downloads (0: skip the download phase).
        #[arg(long, default_value_t = 1000)]
        downloads: usize,
        /// Image size for the download phase, KiB.
        #[arg(long, default_value_t = 1024)]
        image_kib: usize,
        /// Baseline for the downloads (`nginx`, from Debian's nginx-light).
        #[arg(long)]
        vs: Option<String>,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The edge gateway: Modbus TCP devices polled and forwarded to an application, then a
    /// backlog drained beside live data after a cloud outage.
    Edge {
        /// Simulated Modbus TCP devices.
        #[arg(long, default_value_t = 500)]
        devices: usize,
        /// Points per device.
        #[arg(long, default_value_t = 30)]
        points: u16,
        /// Poll interval, ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Steady-state measurement, s.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Cloud outage before the drain phase, s (0: skip the drain phase).
        #[arg(long, default_value_t = 30)]
        outage_seconds: u64,
        /// The edge's queue.drain_rate, messages/s.
        #[arg(long, default_value_t = 1000)]
        drain_rate: u32,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// ironlink-edge binary (default: next to this executable).
        #[arg(long)]
        edge_bin: Option<PathBuf>,
    },
    /// JT/T 808 terminals reporting locations through the edge gateway process: reports per
    /// second, answer latency, the edge's RSS per connected terminal and its CPU.
    Vehicles {
        /// Terminals.
        #[arg(long, default_value_t = 1_000)]
        terminals: usize,
        /// Seconds between a terminal's reports.
        #[arg(long, default_value_t = 10)]
        interval_s: u64,
        /// Reporting phase, s.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// ironlink-edge binary (default: next to this executable).
        #[arg(long)]
        edge_bin: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// ABP LoRa nodes behind Semtech packet forwarders through the edge's LoRaWAN server.
    Lora {
        /// Nodes.
        #[arg(long, default_value_t = 1_000)]
        nodes: usize,
        /// Packet forwarders.
        #[arg(long, default_value_t = 5)]
        forwarders: usize,
        /// Seconds between a node's uplinks.
        #[arg(long, default_value_t = 10)]
        interval_s: u64,
        /// Measured phase, s.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// ironlink-edge binary (default: next to this executable).
        #[arg(long)]
        edge_bin: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// NB-IoT devices posting over CoAP (Alibaba /auth, option 2088) through the edge.
    Coap {
        /// Devices.
        #[arg(long, default_value_t = 1_000)]
        devices: usize,
        /// Seconds between a device's posts.
        #[arg(long, default_value_t = 10)]
        interval_s: u64,
        /// Measured phase, s.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
        /// ironlink-edge binary (default: next to this executable).
        #[arg(long)]
        edge_bin: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Frames decoded per second on one core (JT/T 808, GB/T 32960).
    Codecs {
        /// Frames per protocol.
        #[arg(long, default_value_t = 1_000_000)]
        frames: usize,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Analytics jobs: a day of a fleet aggregated per device and property by a job (worker
    /// process over sealed chunks) and by SQLite SQL over the same points as rows.
    Jobs {
        /// Devices (10 properties each).
        #[arg(long, default_value_t = 1000)]
        devices: usize,
        /// Seconds between samples (a day of them).
        #[arg(long, default_value_t = 60)]
        step: u64,
        /// The ironlink-cloud binary (default: the one beside this program).
        #[arg(long)]
        cloud: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Analytics against the reference implementations in the same run: change points vs
    /// ruptures (time and identical breakpoints).
    Analytics {
        /// Points per change-point signal.
        #[arg(long, default_value_t = 20_000)]
        points: usize,
        /// A Python with ruptures (and pvlib, adtk).
        #[arg(long)]
        python: PathBuf,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Time-series storage on a generated fleet: bytes per point vs plain rows and Parquet+zstd
    /// (polars), ingest with sealing running, 1-minute downsampling.
    Timeseries {
        /// Devices (10 properties each, 1 Hz).
        #[arg(long, default_value_t = 300)]
        devices: usize,
        /// Seconds of data.
        #[arg(long, default_value_t = 3600)]
        seconds: usize,
        /// Points per chunk.
        #[arg(long, default_value_t = 4096)]
        chunk_points: usize,
        /// A Python with polars installed, for the Parquet baseline.
        #[arg(long)]
        python: Option<PathBuf>,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// TSL-validated property ingest into storage vs a plain batched insert of the same rows.
    Ingest {
        /// Publishing devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Messages per device, 10 properties each.
        #[arg(long, default_value_t = 1000)]
        messages: usize,
        /// Messages in flight per device.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// PostgreSQL URL (default: SQLite in a temp dir).
        #[arg(long)]
        database_url: Option<String>,
        /// ironlink-cloud binary (default: next to this executable).
        #[arg(long)]
        cloud_bin: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors are for people: the message and its causes, without a backtrace.
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run { scenario, json } => {
            let text = std::fs::read_to_string(&scenario)
                .map_err(|e| anyhow::anyhow!("{}: {e}", scenario.display()))?;
            let s = ironlink_sim::scenario::Scenario::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", scenario.display()))?;
            let dir = tempfile::tempdir()?;
            let r = ironlink_sim::scenario::run(&s, dir.path()).await?;
            print!("{}", ironlink_sim::scenario::table(&r));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&r)?)?;
            }
            if r.fleets.iter().any(|f| f.lost > 0) {
                anyhow::bail!("acknowledged messages missing from storage");
            }
            if r.gateways.iter().any(|g| g.lost > 0) {
                anyhow::bail!("polls answered by meters missing from storage");
            }
        }
        Cmd::Quickstart {
            data_dir,
            http_listen,
            mqtt_listen,
            edge_status_listen,
            meters,
            sensors,
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("IRONLINK_LOG")
                        .unwrap_or_else(|_| "warn".into()),
                )
                .init();
            let o = ironlink_sim::quickstart::Quickstart {
                data_dir,
                http_listen,
                mqtt_listen,
                edge_status_listen,
                meters: meters.clamp(1, 100),
                sensors: sensors.clamp(0, 100),
            };
            let running = ironlink_sim::quickstart::start(&o).await?;
            print!(
                "{}",
                ironlink_sim::quickstart::guide(&running.plant, &o.data_dir)
            );
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("stopping");
            running.shutdown().await;
        }
        Cmd::Bench {
            which:
                Bench::Apps {
                    devices,
                    messages,
                    backlog,
                    fresh_rate,
                    vs,
                    repeat,
                    cloud_bin,
                    json,
                },
        } => {
            if devices.saturating_mul(messages) > 10_000_000 {
                anyhow::bail!("--devices x --messages: at most 10,000,000 messages per run");
            }
            let o = ironlink_sim::apps_bench::AppsBench {
                devices: devices.clamp(1, 100_000),
                messages: messages.clamp(1, 100_000),
                backlog: backlog.min(1_000_000),
                fresh_rate: fresh_rate.clamp(1, 10_000),
                vs_mosquitto: vs_mosquitto(vs.as_deref())?,
                cloud_bin,
            };
            let r = repeat_runs(repeat, || ironlink_sim::apps_bench::run(&o)).await?;
            emit(&r, json.as_deref())?;
        }
        Cmd::Bench {
            which:
                Bench::Edge {
                    devices,
                    points,
                    interval_ms,
                    seconds,
                    outage_seconds,
                    drain_rate,
                    cloud_bin,
                    edge_bin,
                },
        } => {
            let o = ironlink_sim::edge_bench::EdgeBench {
                devices: devices.clamp(1, 5_000),
                points: points.clamp(1, 125),
                interval: std::time::Duration::from_millis(interval_ms.clamp(10, 60_000)),
                seconds: seconds.clamp(1, 600),
                outage_seconds: outage_seconds.min(600),
                drain_rate,
                cloud_bin,
                edge_bin,
            };
            let r = ironlink_sim::edge_bench::run(&o).await?;
            print!("{}", ironlink_sim::edge_bench::table(&r));
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Bench {
            which:
                Bench::Fanout {
                    devices,
                    qos,
                    rounds,
                    vs,
                    repeat,
                    cloud_bin,
                    json,
                },
        } => {
            if qos > 1 {
                anyhow::bail!("--qos: 0 or 1");
            }
            let o = ironlink_sim::fanout::FanoutBench {
                devices: devices.clamp(1, 100_000),
                qos,
                rounds: rounds.clamp(1, 200),
                vs_mosquitto: vs_mosquitto(vs.as_deref())?,
                cloud_bin,
            };
            let r = repeat_runs(repeat, || ironlink_sim::fanout::run(&o)).await?;
            emit(&r, json.as_deref())?;
        }
        Cmd::Bench {
            which:
                Bench::Downlinks {
                    devices,
                    sets,
                    concurrency,
                    vs,
                    repeat,
                    cloud_bin,
                    json,
                },
        } => {
            let o = ironlink_sim::downlink::DownlinkBench {
                devices: devices.clamp(1, 100_000),
                sets: sets.clamp(1, 1_000_000),
                concurrency: concurrency.clamp(1, 1024),
                vs_mosquitto: vs_mosquitto(vs.as_deref())?,
                cloud_bin,
            };
            let r = repeat_runs(repeat, || ironlink_sim::downlink::run(&o)).await?;
            emit(&r, json.as_deref())?;
        }
        Cmd::Bench {
            which:
                Bench::Vehicles {
                    terminals,
                    interval_s,
                    seconds,
                    cloud_bin,
                    edge_bin,
                    json,
                },
        } => {
            let o = ironlink_sim::vehicles_bench::VehiclesBench {
                terminals: terminals.clamp(1, 100_000),
                interval: std::time::Duration::from_secs(interval_s.clamp(1, 3600)),
                seconds: seconds.clamp(1, 3600),
                cloud_bin,
                edge_bin,
            };
            emit(
                &ironlink_sim::vehicles_bench::run(&o).await?,
                json.as_deref(),
            )?;
        }
        Cmd::Bench {
            which:
                Bench::Lora {
                    nodes,
                    forwarders,
                    interval_s,
                    seconds,
                    cloud_bin,
                    edge_bin,
                    json,
                },
        } => {
            let o = ironlink_sim::lora_bench::LoraBench {
                nodes: nodes.clamp(1, 100_000),
                forwarders: forwarders.clamp(1, 100),
                interval: std::time::Duration::from_secs(interval_s.clamp(1, 3600)),
                seconds: seconds.clamp(1, 3600),
                cloud_bin,
                edge_bin,
            };
            emit(&ironlink_sim::lora_bench::run(&o).await?, json.as_deref())?;
        }
        Cmd::Bench {
            which:
                Bench::Coap {
                    devices,
                    interval_s,
                    seconds,
                    cloud_bin,
                    edge_bin,
                    json,
                },
        } => {
            let o = ironlink_sim::coap_bench::CoapBench {
                devices: devices.clamp(1, 100_000),
                interval: std::time::Duration::from_secs(interval_s.clamp(1, 3600)),
                seconds: seconds.clamp(1, 3600),
                cloud_bin,
                edge_bin,
            };
            emit(&ironlink_sim::coap_bench::run(&o).await?, json.as_deref())?;
        }
        Cmd::Bench {
            which: Bench::Codecs { frames, json },
        } => {
            let r = ironlink_sim::vehicles_bench::codecs(frames.clamp(64, 100_000_000))?;
            emit(&r, json.as_deref())?;
        }
        Cmd::Bench {
            which:
                Bench::Ota {
                    devices,
                    gateways,
                    downloads,
                    image_kib,
                    vs,
                    cloud_bin,
                    json,
                },
        } => {
            let o = ironlink_sim::ota_bench::OtaBench {
                devices: devices.clamp(1, 1_000_000),
                gateways: gateways.clamp(1, 1000),
                downloads: downloads.min(10_000),
                image_kib: image_kib.clamp(1, 1 << 20),
                vs,
                cloud_bin,
            };
            let r = ironlink_sim::ota_bench::run(&o).await?;
            let text = serde_json::to_string_pretty(&r)?;
            println!("{text}");
            if let Some(path) = json {
                std::fs::write(path, text)?;
            }
        }
        Cmd::Bench {
            which: Bench::Gateway { subs, cloud_bin },
        } => {
            let o = ironlink_sim::gateway::GatewayBench {
                subs: subs.clamp(1, 100_000),
                cloud_bin,
            };
            let r = ironlink_sim::gateway::run(&o).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Bench {
            which:
                Bench::Analytics {
                    points,
                    python,
                    json,
                },
        } => {
            let o = ironlink_sim::analytics_bench::AnalyticsBench {
                points: points.clamp(200, 10_000_000),
                python,
            };
            let r = ironlink_sim::analytics_bench::run(&o)?;
            print!("{}", ironlink_sim::analytics_bench::table(&r));
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Bench {
            which:
                Bench::Jobs {
                    devices,
                    step,
                    cloud,
                    json,
                },
        } => {
            let step = step.clamp(1, 3600);
            let o = ironlink_sim::tsdb_bench::JobsBench {
                fleet: ironlink_sim::tsdb_bench::TsdbBench {
                    devices: devices.clamp(1, 100_000),
                    seconds: usize::try_from(86_400 / step).unwrap_or(1440),
                    step_secs: step,
                    chunk_points: 4096,
                    python: None,
                },
                cloud: match cloud {
                    Some(c) => c,
                    None => ironlink_sim::cloud_process::binary("cloud", "ironlink-cloud")?,
                },
            };
            let r = ironlink_sim::tsdb_bench::run_jobs(&o).await?;
            print!("{}", ironlink_sim::tsdb_bench::jobs_table(&r));
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Bench {
            which:
                Bench::Timeseries {
                    devices,
                    seconds,
                    chunk_points,
                    python,
                    json,
                },
        } => {
            let o = ironlink_sim::tsdb_bench::TsdbBench {
                devices: devices.clamp(1, 100_000),
                seconds: seconds.clamp(60, 86_400 * 7),
                step_secs: 1,
                chunk_points: chunk_points.clamp(16, 1 << 20),
                python,
            };
            let r = ironlink_sim::tsdb_bench::run(&o).await?;
            print!("{}", ironlink_sim::tsdb_bench::table(&r));
            if let Some(path) = json {
                std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
            }
        }
        Cmd::Bench {
            which:
                Bench::Ingest {
                    devices,
                    messages,
                    window,
                    database_url,
                    cloud_bin,
                },
        } => {
            let o = ironlink_sim::ingest::IngestBench {
                devices: devices.clamp(1, 10_000),
                messages: messages.clamp(1, 1_000_000),
                window: window.clamp(1, 1000),
                database_url,
                cloud_bin,
            };
            let r = ironlink_sim::ingest::run(&o).await?;
            print!("{}", ironlink_sim::ingest::table(&r));
            println!("{}", serde_json::to_string(&r)?);
        }
        Cmd::Bench {
            which:
                Bench::Connections {
                    devices,
                    concurrency,
                    vs,
                    repeat,
                    cloud_bin,
                    json,
                },
        } => {
            let vs_mosquitto = vs_mosquitto(vs.as_deref())?;
            let o = ConnectionsBench {
                devices: devices.min(100_000),
                concurrency,
                vs_mosquitto,
                cloud_bin,
            };
            let r = repeat_runs(repeat, || run_connections(&o)).await?;
            emit(&r, json.as_deref())?;
        }
    }
    Ok(())
}

/// `--repeat`: between 1 and 20 runs.
async fn repeat_runs<F, Fut>(n: usize, run: F) -> anyhow::Result<Report>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Report>>,
{
    if !(1..=20).contains(&n) {
        anyhow::bail!("--repeat: between 1 and 20");
    }
    ironlink_sim::report::repeat(n, run).await
}

/// Prints the report's table; writes its JSON to `json` when given.
fn emit(r: &Report, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    print!("{}", r.table());
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(r)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// `--vs`: only mosquitto is a baseline.
fn vs_mosquitto(vs: Option<&str>) -> anyhow::Result<bool> {
    match vs {
        None => Ok(false),
        Some("mosquitto") => Ok(true),
        Some(other) => anyhow::bail!("--vs {other}: only mosquitto is supported"),
    }
}
