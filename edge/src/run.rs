//! The gateway: one task per southbound link (a TCP device, or a serial bus of RTU devices)
//! appending readings to the queue and carrying out the cloud's writes, a syncer making the
//! queue durable every second, and the uplink draining it.

use crate::config::{Config, WhenFull};
use crate::link::{self, Sink};
use crate::now_ms;
use crate::queue::{FullPolicy, Limits, Queue, QueueError};
use crate::status::Status;
use crate::uplink::{self, State};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// The queue (for status and tests).
    pub queue: Arc<Mutex<Queue>>,
    /// Uplink state.
    pub uplink: watch::Receiver<State>,
    /// Bound address of the status endpoint, when enabled.
    pub status_addr: Option<std::net::SocketAddr>,
    /// Per-device status.
    pub status: Arc<Status>,
    /// Bound address of the JT/T 808 server, when enabled.
    pub jt808_addr: Option<std::net::SocketAddr>,
    /// Bound address of the GB/T 32960 server, when enabled.
    pub gb32960_addr: Option<std::net::SocketAddr>,
    /// Bound UDP address of the LoRaWAN packet forwarder server, when enabled.
    pub lorawan_addr: Option<std::net::SocketAddr>,
    /// Bound UDP address of the CoAP server, when enabled.
    pub coap_addr: Option<std::net::SocketAddr>,
    /// Turns to an exit code when the process should end by itself (a self-upgrade
    /// installed a new binary: [`crate::ota::RESTART_FOR_UPGRADE`]).
    pub exit: watch::Receiver<Option<i32>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task and syncs the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if let Ok(mut q) = self.queue.lock() {
            let _ = q.sync();
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The queue could not be opened.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The run-time sub-devices file could not be read.
    #[error("sub-devices file: {0}")]
    SubDevices(std::io::Error),
    /// A listener could not be bound.
    #[error("{what} listener {addr}: {source}")]
    Listen {
        /// Which.
        what: &'static str,
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The status listener could not be bound.
    #[error("status listener {addr}: {source}")]
    Status {
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Receive buffer asked for the UDP servers: a burst of forwarder datagrams or CoAP requests
/// waits in the kernel while the server is busy, rather than being dropped (the kernel caps it
/// at `net.core.rmem_max`, 4 MiB on Debian's defaults here; 208 KiB otherwise).
pub const UDP_RECV_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket bound to `addr` with a receive buffer of [`UDP_RECV_BUFFER`]
/// (what the kernel grants is logged).
fn udp_socket(what: &str, addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = s.set_recv_buffer_size(UDP_RECV_BUFFER) {
        tracing::warn!(server = what, error = %e, "UDP receive buffer left at the default");
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    tracing::info!(
        server = what,
        %addr,
        recv_buffer = s.recv_buffer_size().unwrap_or(0),
        "UDP server bound"
    );
    Ok(s.into())
}

/// Opens the queue and starts the pollers, the syncer, the uplink and the status endpoint.
/// How the process runs the gateway.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Under `run --supervise`: a new binary can be tried and rolled back, so self-upgrades
    /// are carried out.
    pub supervised: bool,
}

/// Starts the gateway (not supervised: self-upgrade notices are refused with the reason).
pub fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, StartOptions::default())
}

/// Starts the gateway.
pub fn start_with(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let limits = Limits {
        max_bytes: config.queue.max_bytes,
        max_age_ms: i64::try_from(config.queue.max_age.as_millis()).unwrap_or(i64::MAX),
        policy: match config.queue.when_full {
            WhenFull::DropOldest => FullPolicy::DropOldest,
            WhenFull::RefuseNewest => FullPolicy::RefuseNewest,
        },
        ..Limits::default()
    };
    let queue = Arc::new(Mutex::new(Queue::open(&config.queue.dir, limits)?));
    let config = Arc::new(config);
    let wake = Arc::new(Notify::new());
    let (stop, stop_rx) = watch::channel(false);
    let (state_tx, state) = watch::channel(State::Down);
    let mut tasks = Vec::new();
    let status = Arc::new(Status::default());
    let sink = Sink {
        queue: queue.clone(),
        wake: wake.clone(),
        status: status.clone(),
    };
    // Commands from the cloud, routed by device name to the link that reaches the device.
    let mut routes: HashMap<String, link::Inbox> = HashMap::new();
    let links = link::links(&config.devices);
    let n = links.len().max(1) as f64;
    for (k, devices) in links.into_iter().enumerate() {
        let (tx, rx) = link::inbox(64);
        for d in &devices {
            routes.insert(d.name.clone(), tx.clone());
        }
        tasks.push(tokio::spawn(link::run(
            devices,
            k as f64 / n,
            sink.clone(),
            rx,
            stop_rx.clone(),
        )));
    }
    let subs = Arc::new(
        crate::subdevices::SubDevices::open(&config.queue.dir).map_err(StartError::SubDevices)?,
    );
    let (rpc_tx, rpc_rx) = mpsc::channel(64);
    let offers = Arc::new(crate::sub_ota::Offers::default());
    let mut vehicle_counters = Vec::new();
    let mut bound_addrs = [None, None];
    for (i, (what, server)) in [("jt808", &config.jt808), ("gb32960", &config.gb32960)]
        .into_iter()
        .enumerate()
    {
        let Some(cfg) = server else { continue };
        let addr = cfg.listen;
        let l = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| StartError::Listen { what, addr, source })?;
        bound_addrs[i] = l.local_addr().ok();
        let ctx = Arc::new(crate::vehicle::Ctx {
            cfg: cfg.clone(),
            sink: sink.clone(),
            subs: subs.clone(),
            rpc: rpc_tx.clone(),
            stop: stop_rx.clone(),
            counters: Arc::default(),
            offers: offers.clone(),
        });
        vehicle_counters.push((what, ctx.counters.clone()));
        tasks.push(if i == 0 {
            tokio::spawn(crate::vehicle::serve(l, ctx, |s, c| {
                crate::jt808::connection(s, c)
            }))
        } else {
            tokio::spawn(crate::vehicle::serve(l, ctx, |s, c| {
                crate::gb32960::connection(s, c)
            }))
        });
    }
    // UDP servers: a socket and a context (the registry, the queue, counters) each.
    let udp = |what: &'static str, addr: std::net::SocketAddr, product_key: &str| {
        let sock = udp_socket(what, addr)
            .and_then(tokio::net::UdpSocket::from_std)
            .map_err(|source| StartError::Listen { what, addr, source })?;
        let ctx = Arc::new(crate::vehicle::Ctx {
            cfg: crate::config::VehicleServer {
                listen: addr,
                product_key: product_key.to_owned(),
                idle_timeout: Duration::from_secs(3600),
                answer_timeout: Duration::from_secs(10),
                max_terminals: 0,
            },
            sink: sink.clone(),
            subs: subs.clone(),
            rpc: rpc_tx.clone(),
            stop: stop_rx.clone(),
            counters: Arc::default(),
            offers: offers.clone(),
        });
        Ok::<_, StartError>((sock, ctx))
    };
    let mut lorawan_addr = None;
    if let Some(l) = &config.lorawan {
        let (sock, ctx) = udp("lorawan", l.listen, &l.product_key)?;
        lorawan_addr = sock.local_addr().ok();
        vehicle_counters.push(("lorawan", ctx.counters.clone()));
        // Checked when the configuration was loaded.
        let nodes = l
            .devices
            .iter()
            .filter_map(|d| crate::lorawan_server::resolve(d).ok())
            .collect();
        tasks.push(tokio::spawn(crate::lorawan_server::serve(
            sock,
            ctx,
            l.clone(),
            nodes,
            config.queue.dir.clone(),
        )));
    }
    let mut coap_addr = None;
    if let Some(c) = &config.coap {
        let (sock, ctx) = udp("coap", c.listen, &c.product_key)?;
        coap_addr = sock.local_addr().ok();
        vehicle_counters.push(("coap", ctx.counters.clone()));
        let advertise = c
            .advertise
            .clone()
            .or_else(|| coap_addr.map(|a| a.to_string()))
            .unwrap_or_else(|| c.listen.to_string());
        tasks.push(tokio::spawn(crate::coap_server::serve(
            sock, ctx, advertise,
        )));
    }
    let mut status_addr = None;
    if let Some(addr) = config.status.listen {
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| StartError::Status { addr, source })?;
        status_addr = bound.local_addr().ok();
        let app = crate::status::router(
            status.clone(),
            queue.clone(),
            state.clone(),
            vehicle_counters.clone(),
            Some(subs.clone()),
        );
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(bound, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    let subs_sync = subs.clone();
    {
        let queue = queue.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let q = queue.clone();
                let subs = subs_sync.clone();
                // The fsyncs run without the queue's lock: pollers and the uplink go on.
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = subs.sync() {
                        tracing::error!(error = %e, "sub-devices file sync failed");
                    }
                    let job = q.lock().map(|mut q| q.begin_sync());
                    let Ok(job) = job else { return };
                    let done = job.and_then(|j| j.run());
                    if let Ok(mut q) = q.lock() {
                        if let Err(e) = q.finish_sync(done) {
                            tracing::error!(error = %e, "queue sync failed");
                        }
                        let _ = q.expire(now_ms());
                    }
                })
                .await;
            }
        }));
    }
    let (notices_tx, notices_rx) = mpsc::channel(4);
    let (outbox_tx, outbox_rx) = mpsc::channel(64);
    let (exit_tx, exit) = watch::channel(None);
    let upgrade = crate::ota::SelfUpgrade {
        config: config.ota.clone(),
        gateway: (
            config.gateway.product_key.clone(),
            config.gateway.device_name.clone(),
        ),
        supervised: options.supervised,
        exe: std::env::var_os("IRONLINK_EDGE_EXE")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| "ironlink-edge".into()),
        outbox: outbox_tx,
        exit: exit_tx,
    };
    tasks.push(tokio::spawn(upgrade.run(
        notices_rx,
        state.clone(),
        stop_rx.clone(),
    )));
    let routes = Arc::new(routes);
    let (sub_notices_tx, sub_notices_rx) = mpsc::channel(256);
    let sub_upgrades = crate::sub_ota::SubUpgrades::new(
        config.ota.clone(),
        config.queue.dir.join("ota-images"),
        sink.clone(),
        routes.clone(),
        subs.clone(),
        offers,
    );
    tasks.push(tokio::spawn(
        sub_upgrades.run(sub_notices_rx, stop_rx.clone()),
    ));
    tasks.push(tokio::spawn(uplink::run(
        config.clone(),
        queue.clone(),
        wake,
        routes,
        subs,
        rpc_rx,
        uplink::OtaLink {
            notices: notices_tx,
            outbox: outbox_rx,
            sub_notices: sub_notices_tx,
        },
        state_tx,
        stop_rx,
        status.uplink_rtt.clone(),
    )));
    Ok(Running {
        queue,
        uplink: state,
        status_addr,
        status,
        jt808_addr: bound_addrs[0],
        gb32960_addr: bound_addrs[1],
        lorawan_addr,
        coap_addr,
        exit,
        stop,
        tasks,
    })
}
