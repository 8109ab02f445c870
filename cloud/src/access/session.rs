//! One device connection: CONNECT and authentication, then the packet loop with the ACL in
//! front of the router.
//!
//! Framing is checked by `ironlink_protocols::mqtt` before rumqttd's codec sees a byte, so an
//! oversize frame is refused before it is buffered and a reserved packet type never reaches
//! the codec. The codec itself runs under `catch_unwind`: a decoder bug costs one connection,
//! never the server.

use super::auth::{authenticate, AuthError, Authenticated};
use super::limits::{payload_limit, Bucket, Refusal};
use super::sessions::Kick;
use super::Shared;
use crate::metrics::Metrics;
use crate::presence::OfflineReason;
use crate::registry::now_ms;
use crate::router::{Delivery, Message, QueueBudget, SessionId};
use crate::storage::PresenceEvent;
use crate::thing::{Change, Origin, Outcome, Subs};
use bytes::{BufMut, BytesMut};
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use ironlink_protocols::mqtt::{self as frame, reason, FrameError, PacketType, PublishOut};
use ironlink_shared::acl::{device_may, Access};
use ironlink_shared::alink::{classify, topic_device};
use ironlink_shared::credentials::ClientId;
use ironlink_shared::DeviceRef;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, LastWill, Packet, PingResp, Protocol, PubAck,
    PubAckReason, QoS, SubAck, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The MQTT version a connection speaks, chosen from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

impl Version {
    fn read(self, buf: &mut BytesMut, max: usize) -> Result<Packet, String> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Self::V311 => V4.read_mut(buf, max),
            Self::V5 => V5.read_mut(buf, max),
        }));
        match r {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(format!("malformed packet: {e}")),
            Err(_) => Err("malformed packet: decoder failed".into()),
        }
    }

    fn write(self, packet: Packet, out: &mut BytesMut) {
        let r = match self {
            Self::V311 => V4.write(packet, out),
            Self::V5 => V5.write(packet, out),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "encoding a reply failed");
        }
    }
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// "Server unavailable" in the client's MQTT version.
fn server_unavailable(version: Version) -> ConnectReturnCode {
    match version {
        Version::V311 => ConnectReturnCode::ServiceUnavailable,
        Version::V5 => ConnectReturnCode::ServerUnavailable,
    }
}

fn refusal_code(version: Version, e: &AuthError) -> ConnectReturnCode {
    match (version, e) {
        (_, e) if e.is_server_side() => server_unavailable(version),
        (Version::V5, AuthError::Disabled(_)) => ConnectReturnCode::Banned,
        (_, e) if e.is_not_authorized() => ConnectReturnCode::NotAuthorized,
        _ => ConnectReturnCode::BadUserNamePassword,
    }
}

/// Reads until `buf` holds one complete frame; `None` when the peer closed or failed first.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<frame::FrameHeader, String> {
    loop {
        match frame::check(buf, max) {
            Ok(h) => return Ok(h),
            Err(FrameError::Incomplete(n)) => {
                buf.reserve(n);
                match stream.read_buf(buf).await {
                    Ok(0) => return Err("closed before a complete packet".into()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("read failed: {e}")),
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Serves one accepted connection until it ends. `deadline` bounds the time to CONNECT.
pub async fn serve<S>(
    shared: Arc<Shared>,
    mut stream: S,
    peer: SocketAddr,
    tls: bool,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let max = shared.config.mqtt.max_packet_size;
    let mut buf = BytesMut::with_capacity(512);
    let header =
        match tokio::time::timeout_at(deadline, read_frame(&mut stream, &mut buf, max)).await {
            Err(_) => {
                Metrics::inc(&shared.metrics.connect_timeouts);
                tracing::info!(%peer, "closed: no CONNECT within the connect timeout");
                return;
            }
            Ok(Err(why)) => {
                Metrics::inc(&shared.metrics.protocol_errors);
                tracing::info!(%peer, %why, "closed before CONNECT");
                return;
            }
            Ok(Ok(h)) => h,
        };
    if header.kind != PacketType::Connect {
        Metrics::inc(&shared.metrics.protocol_errors);
        tracing::info!(%peer, kind = ?header.kind, "closed: first packet is not CONNECT");
        return;
    }
    let version = match frame::connect_protocol_level(&buf, &header) {
        Some(4) => Version::V311,
        Some(5) => Version::V5,
        level => {
            // CONNACK "unacceptable protocol version" in the 3.1.1 encoding, understood by all.
            let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            Metrics::inc(&shared.metrics.protocol_errors);
            tracing::info!(%peer, level = level.map_or(-1, i16::from), "refused: unsupported MQTT protocol level");
            return;
        }
    };
    let Ok(Packet::Connect(connect, _props, will, _will_props, login)) =
        version.read(&mut buf, max)
    else {
        Metrics::inc(&shared.metrics.protocol_errors);
        tracing::info!(%peer, "closed: malformed CONNECT");
        return;
    };
    let mut out = BytesMut::with_capacity(256);
    // Applications sign in with an access key (the AMQP username scheme) instead of a device.
    if let Some(l) = login
        .as_ref()
        .filter(|l| l.username.contains("authMode=aksign"))
    {
        let (user, pass) = (l.username.clone(), l.password.clone());
        // Boxed, like every rarely taken path below: an inline future would count in the
        // memory of every idle device connection.
        Box::pin(serve_app(
            shared,
            stream,
            buf,
            out,
            version,
            peer,
            &connect.client_id,
            &user,
            &pass,
            connect.keep_alive,
        ))
        .await;
        return;
    }
    let login_pair = login
        .as_ref()
        .map(|l| (l.username.as_str(), l.password.as_str()));
    // Boxed: the authentication future (sqlx queries) is large, and an unboxed one would set
    // the size of every connection's state machine for its whole life.
    let auth = Box::pin(authenticate(
        &shared.db,
        &connect.client_id,
        login_pair,
        tls,
        shared.config.mqtt.timestamp_window,
        now_ms(),
    ))
    .await;
    let (pk, dn, first_connect) = match auth {
        Err(e) => {
            Metrics::inc(&shared.metrics.auth_refused);
            tracing::warn!(%peer, client_id = %connect.client_id, username = %login.as_ref().map_or("", |l| l.username.as_str()), reason = %e, "CONNECT refused");
            version.write(connack(refusal_code(version, &e)), &mut out);
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
            return;
        }
        Ok(Authenticated::Register {
            product_key,
            device_name,
            device_secret,
        }) => {
            Metrics::inc(&shared.metrics.registrations);
            tracing::info!(%peer, product_key, device_name, "dynamic registration answered");
            version.write(connack(ConnectReturnCode::Success), &mut out);
            let body = serde_json::json!({
                "productKey": product_key,
                "deviceName": device_name,
                "deviceSecret": device_secret,
            })
            .to_string();
            let publish = PublishOut {
                topic: "/ext/register",
                payload: body.as_bytes(),
                qos: 0,
                packet_id: 0,
                retain: false,
                dup: false,
                v5: version == Version::V5,
            };
            let _ = frame::encode_publish(&publish, |b| out.extend_from_slice(b));
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
            // Let the device read the answer and close first (Alibaba's SDKs disconnect once
            // they have it): closing under it can make its SDK see the end of the connection
            // before it has handled the answer. Bounded, whatever the device does.
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut sink = [0u8; 512];
                while matches!(
                    tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await,
                    Ok(n) if n > 0
                ) {}
            })
            .await;
            let _ = stream.shutdown().await;
            return;
        }
        Ok(Authenticated::Device {
            product_key,
            device_name,
            first_connect,
        }) => (product_key, device_name, first_connect),
    };
    let device = DeviceRef::new(&pk, &dn);
    let cid = ClientId::parse(&connect.client_id).ok();
    let auto_subscribe = cid.as_ref().and_then(|c| c.param("_ss")) == Some("1");
    let ext_rrpc = cid.as_ref().and_then(|c| c.param("ext")) == Some("1");
    let will = match will {
        Some(w) => match std::str::from_utf8(&w.topic) {
            Ok(t) if device_may(Access::Publish, device, t) => Some(w),
            _ => {
                Metrics::inc(&shared.metrics.auth_refused);
                tracing::warn!(%peer, product_key = %pk, device_name = %dn, "CONNECT refused: will topic outside the device's topics");
                version.write(connack(ConnectReturnCode::NotAuthorized), &mut out);
                let _ = stream.write_all(&out).await;
                return;
            }
        },
        None => None,
    };
    Metrics::inc(&shared.metrics.auth_accepted);

    let registration = Box::pin(shared.sessions.register(&pk, &dn)).await;
    let keepalive = match Duration::from_secs(u64::from(connect.keep_alive)) {
        d if d.is_zero() || d > shared.config.mqtt.max_keepalive => {
            shared.config.mqtt.max_keepalive
        }
        d => d,
    };
    version.write(connack(ConnectReturnCode::Success), &mut out);
    let addr = peer.to_string();
    let online = PresenceEvent {
        product_key: pk.clone(),
        device_name: dn.clone(),
        status: "online".into(),
        reason: "connected".into(),
        client_addr: Some(addr.clone()),
        at: now_ms(),
    };
    // A device's activation (its first online) is committed before its CONNACK is sent, so it
    // survives a kill -9. Later changes are queued and written in batches within milliseconds:
    // a crash in that window loses those history rows, and the restart records every device
    // left online as offline ("server restart").
    let stored = if first_connect {
        shared.presence.record_durable(online).await
    } else {
        shared.presence.record(online).await;
        true
    };
    if !stored {
        tracing::error!(%peer, product_key = %pk, device_name = %dn, "CONNECT refused: activation could not be stored");
        out.clear();
        version.write(connack(server_unavailable(version)), &mut out);
        let _ = stream.write_all(&out).await;
        shared.sessions.remove(&pk, &dn, registration.serial);
        return;
    }
    shared
        .metrics
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(%peer, product_key = %pk, device_name = %dn, ?version, tls, "device online");

    if ext_rrpc {
        shared.thing.set_ext_rrpc(&pk, &dn, true);
    }
    let mut conn = Connection::new(
        &shared,
        version,
        (pk.clone(), dn.clone()),
        addr.clone(),
        out,
        None,
    );
    if auto_subscribe {
        conn.auto_subscribe(&pk, &dn, true);
    }
    let reason = conn
        .run(&mut stream, buf, registration.kicked, keepalive)
        .await;
    if ext_rrpc {
        shared.thing.set_ext_rrpc(&pk, &dn, false);
    }
    Box::pin(conn.logout_all(&format!("gateway offline ({reason})"))).await;

    // Clean-up: router first so nothing more is queued, then presence, then the registry.
    if let Some(sid) = conn.sid {
        shared.router.unregister(sid);
    }
    if let Some(w) = will.filter(|_| reason != OfflineReason::CleanDisconnect) {
        publish_will(&shared, w);
    }
    shared
        .metrics
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    shared
        .presence
        .record(PresenceEvent {
            product_key: pk.clone(),
            device_name: dn.clone(),
            status: "offline".into(),
            reason: reason.to_string(),
            client_addr: Some(addr),
            at: now_ms(),
        })
        .await;
    tracing::info!(%peer, product_key = %pk, device_name = %dn, %reason, "device offline");
    shared.sessions.remove(&pk, &dn, registration.serial);
    drop(registration.done);
    if conn.big {
        drop(conn);
        super::release_memory();
    }
}

/// A connection that held this many bytes at once gives the heap back when it closes.
const BIG_CONNECTION: usize = 1024 * 1024;

/// An application over MQTT: signed in with an access key, it may only subscribe, and only to
/// product-wide filters of the products its consumer group subscribes to (plain or as MQTT 5
/// shared subscriptions `$share/{name}/...`, which spread the messages over its instances).
#[allow(clippy::too_many_arguments)]
async fn serve_app<S>(
    shared: Arc<Shared>,
    mut stream: S,
    buf: BytesMut,
    mut out: BytesMut,
    version: Version,
    peer: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
    keep_alive: u16,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let window = shared.config.apps.timestamp_window;
    let login = match crate::apps::amqp::authenticate(&shared.apps, username, password, window) {
        Ok(l) => l,
        Err(why) => {
            Metrics::inc(&shared.metrics.auth_refused);
            tracing::warn!(%peer, %why, "application CONNECT refused");
            let code = if why.contains("consumer group") {
                ConnectReturnCode::NotAuthorized
            } else {
                ConnectReturnCode::BadUserNamePassword
            };
            version.write(connack(code), &mut out);
            let _ = stream.write_all(&out).await;
            return;
        }
    };
    let products: std::collections::HashSet<String> = match shared.db.list_subscriptions().await {
        Ok(subs) => subs
            .into_iter()
            .filter(|s| s.group_id == login.group_id)
            .map(|s| s.product_key)
            .collect(),
        Err(e) => {
            tracing::error!(%peer, error = %e, "application CONNECT refused: registry unavailable");
            version.write(connack(server_unavailable(version)), &mut out);
            let _ = stream.write_all(&out).await;
            return;
        }
    };
    Metrics::inc(&shared.metrics.auth_accepted);
    version.write(connack(ConnectReturnCode::Success), &mut out);
    tracing::info!(%peer, client_id, group = %login.group_id, "application online (MQTT)");
    let keepalive = match Duration::from_secs(u64::from(keep_alive)) {
        d if d.is_zero() || d > shared.config.mqtt.max_keepalive => {
            shared.config.mqtt.max_keepalive
        }
        d => d,
    };
    let mut conn = Connection::new(
        &shared,
        version,
        (String::new(), client_id.to_owned()),
        peer.to_string(),
        out,
        Some(products),
    );
    // Applications are not in the device session registry: nothing kicks them but shutdown
    // of the process.
    let (_never, kicked) = tokio::sync::oneshot::channel();
    let reason = conn.run(&mut stream, buf, kicked, keepalive).await;
    if let Some(sid) = conn.sid {
        shared.router.unregister(sid);
    }
    tracing::info!(%peer, client_id, group = %login.group_id, %reason, "application offline (MQTT)");
}

/// Next delivery, or never when the session has no queue yet.
async fn recv(rx: &mut Option<mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn publish_will(shared: &Shared, w: LastWill) {
    let Ok(topic) = String::from_utf8(w.topic.to_vec()) else {
        return;
    };
    shared.router.publish(Message {
        topic,
        payload: w.message,
        qos: u8::from(w.qos != QoS::AtMostOnce),
        retain: w.retain,
    });
}

/// An uplink being handled by the thing layer: the packet id to acknowledge once it is done.
type Work = Pin<Box<dyn Future<Output = (Option<u16>, Outcome)> + Send>>;
/// A logged-in sub-device's kick signal.
type SubKick = Pin<
    Box<
        dyn Future<
                Output = (
                    (String, String),
                    u64,
                    Result<Kick, tokio::sync::oneshot::error::RecvError>,
                ),
            > + Send,
    >,
>;

/// Uplinks handled at once per connection before it stops reading.
const MAX_WORK: usize = 1024;

struct Connection {
    shared: Arc<Shared>,
    version: Version,
    pk: String,
    dn: String,
    addr: String,
    /// Router registration and delivery queue, created at the first SUBSCRIBE: a device that
    /// only publishes costs neither.
    sid: Option<SessionId>,
    rx: Option<mpsc::Receiver<Delivery>>,
    out: BytesMut,
    inflight: HashMap<u16, Arc<Message>>,
    pending: VecDeque<Delivery>,
    next_pkid: u16,
    violations: u32,
    /// Sub-devices logged in through this connection.
    subs: Subs,
    /// Uplinks in the thing layer, finished in the order they arrived.
    work: FuturesOrdered<Work>,
    /// The bytes of each uplink in `work`, in the same order, and their sum: past
    /// `limits.inflight_bytes` the socket is not read (TCP back-pressure). With a reason when
    /// the entry is a refusal whose PUBACK waits for the packets before it (MQTT 4.6: in order).
    work_sizes: VecDeque<(usize, Option<PubAckReason>)>,
    work_bytes: usize,
    /// Set once `work` held [`BIG_CONNECTION`] bytes at once: the heap is trimmed at close.
    big: bool,
    /// Bytes of the QoS 1 deliveries waiting for their PUBACK.
    inflight_bytes: usize,
    /// Downlink bytes queued for this session, shared with the router (created with `sid`).
    budget: Option<Arc<QueueBudget>>,
    /// The connected device's message-rate bucket.
    bucket: Bucket,
    /// Logged-in sub-devices' buckets (gateways only).
    #[allow(clippy::box_collection)]
    // 8 bytes on every connection instead of 48: most are not gateways
    sub_buckets: Option<Box<HashMap<(String, String), Bucket>>>,
    /// Set while over the message rate: nothing is read until then.
    throttled_until: Option<Instant>,
    /// Filters this connection subscribed to itself (auto-subscriptions not counted).
    subscriptions: u32,
    /// True while a sub-device login/logout is in `work`: later packets wait for it.
    barrier: bool,
    /// Set while a custom-topic message waits for its `transformPayload`: the session's later
    /// custom-topic messages reach subscribers and groups after it, in the order they came.
    route_after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Kick signals of logged-in sub-devices (created at the first login: most connections
    /// are not gateways and should not pay for it).
    sub_kicks: Option<FuturesUnordered<SubKick>>,
    /// For an application connection: the products its consumer group subscribes to.
    app: Option<std::collections::HashSet<String>>,
}

/// What processing one packet decided.
enum Step {
    Continue,
    Close(OfflineReason),
    /// Over the message rate: leave the packet in the buffer and read nothing for this long.
    Throttle(Duration),
}

impl Connection {
    /// A connection of `identity` (product key, device name; for an application: empty, client
    /// id) that has just been sent its CONNACK in `out`.
    fn new(
        shared: &Arc<Shared>,
        version: Version,
        identity: (String, String),
        addr: String,
        out: BytesMut,
        app: Option<std::collections::HashSet<String>>,
    ) -> Self {
        let burst = shared.config.limits.for_product(&identity.0).message_burst;
        Self {
            shared: shared.clone(),
            version,
            pk: identity.0,
            dn: identity.1,
            addr,
            sid: None,
            rx: None,
            out,
            inflight: HashMap::new(),
            pending: VecDeque::new(),
            next_pkid: 1,
            violations: 0,
            subs: Subs::default(),
            work: FuturesOrdered::new(),
            work_sizes: VecDeque::new(),
            work_bytes: 0,
            big: false,
            inflight_bytes: 0,
            budget: None,
            bucket: Bucket::full(burst, Instant::now()),
            sub_buckets: None,
            throttled_until: None,
            subscriptions: 0,
            barrier: false,
            route_after: None,
            sub_kicks: None,
            app,
        }
    }

    async fn run<S>(
        &mut self,
        stream: &mut S,
        mut buf: BytesMut,
        mut kicked: tokio::sync::oneshot::Receiver<Kick>,
        keepalive: Duration,
    ) -> OfflineReason
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = keepalive + keepalive / 2;
        let max = self.shared.config.mqtt.max_packet_size;
        let queue_cap = self.queue_cap();
        let mut last_rx = Instant::now();
        loop {
            if !self.out.is_empty() {
                if let Err(e) = stream.write_all(&self.out).await {
                    return OfflineReason::ConnectionLost(format!("write failed: {e}"));
                }
                // Idle connections hold no buffer memory: the next write allocates again.
                self.out = BytesMut::new();
            }
            // Packets already buffered (pipelined after CONNECT, or several per read).
            loop {
                if self.paused() {
                    break;
                }
                match frame::check(&buf, max) {
                    Ok(h) => match self.on_frame(&mut buf, &h) {
                        Step::Continue => {}
                        Step::Throttle(wait) => {
                            self.throttled_until = Some(Instant::now() + wait);
                            break;
                        }
                        Step::Close(reason) => {
                            let _ = stream.write_all(&self.out).await;
                            let _ = stream.shutdown().await;
                            return reason;
                        }
                    },
                    Err(FrameError::Incomplete(n)) => {
                        if buf.is_empty() {
                            // Nothing pending: release the buffer while the device is idle.
                            buf = BytesMut::new();
                        } else {
                            buf.reserve(n);
                        }
                        break;
                    }
                    Err(e) => {
                        Metrics::inc(&self.shared.metrics.protocol_errors);
                        tracing::warn!(product_key = %self.pk, device_name = %self.dn, error = %e, "closing connection");
                        if matches!(e, FrameError::TooLarge { .. }) {
                            self.disconnect(reason::PACKET_TOO_LARGE);
                        } else {
                            self.disconnect(reason::MALFORMED_PACKET);
                        }
                        let _ = stream.write_all(&self.out).await;
                        let _ = stream.shutdown().await;
                        return OfflineReason::ProtocolError(e.to_string());
                    }
                }
            }
            if !self.out.is_empty() {
                continue;
            }
            let paused = self.paused();
            let throttle = self.throttled_until;
            tokio::select! {
                Some((pkid, outcome)) = self.work.next(), if !self.work.is_empty() => {
                    let (size, refused) = self.work_sizes.pop_front().unwrap_or((0, None));
                    self.work_bytes = self.work_bytes.saturating_sub(size);
                    if paused {
                        last_rx = Instant::now();
                    }
                    if let Step::Close(reason) = Box::pin(self.finish(pkid, outcome, refused)).await {
                        let _ = stream.write_all(&self.out).await;
                        let _ = stream.shutdown().await;
                        return reason;
                    }
                    if self.work.is_empty() {
                        self.barrier = false;
                    }
                },
                Some((key, serial, kick)) = async { self.sub_kicks.as_mut()?.next().await }, if self.sub_kicks.as_ref().is_some_and(|k| !k.is_empty()) => {
                    let still = self.subs.lock().get(&key).is_some_and(|e| e.serial == serial);
                    if still {
                        let why = match kick {
                            Ok(Kick::Replaced) => "replaced by a new login with the same identity".to_owned(),
                            Ok(Kick::Admin(why)) => format!("kicked: {why}"),
                            Ok(Kick::Shutdown) | Err(_) => "server shutdown".to_owned(),
                        };
                        Box::pin(self.logout(vec![key], &why)).await;
                    }
                },
                r = stream.read_buf(&mut buf), if !paused => match r {
                    Ok(0) => return OfflineReason::ConnectionLost("closed by peer without DISCONNECT".into()),
                    Ok(_) => last_rx = Instant::now(),
                    Err(e) => return OfflineReason::ConnectionLost(format!("read failed: {e}")),
                },
                d = recv(&mut self.rx), if self.pending.len() < queue_cap => {
                    if let Some(d) = d {
                        self.deliver(d);
                        // Drain what is already queued so that one write carries many.
                        while self.pending.len() < queue_cap {
                            match self.rx.as_mut().map(|rx| rx.try_recv()) {
                                Some(Ok(d)) => self.deliver(d),
                                _ => break,
                            }
                        }
                    }
                },
                k = &mut kicked => {
                    let (code, reason) = match k {
                        Ok(Kick::Replaced) => (reason::SESSION_TAKEN_OVER, OfflineReason::Replaced),
                        Ok(Kick::Admin(why)) => (reason::ADMINISTRATIVE_ACTION, OfflineReason::Kicked(why)),
                        Ok(Kick::Shutdown) | Err(_) => (reason::SERVER_SHUTTING_DOWN, OfflineReason::ServerShutdown),
                    };
                    self.disconnect(code);
                    let _ = stream.write_all(&self.out).await;
                    let _ = stream.shutdown().await;
                    return reason;
                },
                _ = tokio::time::sleep_until(throttle.unwrap_or_else(Instant::now)), if throttle.is_some() => {
                    self.throttled_until = None;
                    // The silence while we did not read was ours, not the device's.
                    last_rx = Instant::now();
                },
                // While reading is paused for the thing layer, silence is ours, not the device's.
                _ = tokio::time::sleep_until(last_rx + idle), if !paused => {
                    self.disconnect(reason::KEEP_ALIVE_TIMEOUT);
                    let _ = stream.write_all(&self.out).await;
                    return OfflineReason::KeepaliveTimeout;
                }
            }
        }
    }

    /// MQTT 5 clients get a DISCONNECT with a reason; MQTT 3.1.1 has no server DISCONNECT.
    ///
    /// Encoded here: rumqttd 0.20 writes a reason-code-only DISCONNECT one byte longer than
    /// its remaining length says.
    fn disconnect(&mut self, code: u8) {
        if self.version == Version::V5 {
            self.out.put_slice(&frame::disconnect_v5(code));
        }
    }

    /// Messages this session may have waiting: an application's fan-in queue is deeper.
    fn queue_cap(&self) -> usize {
        if self.app.is_some() {
            self.shared.config.apps.mqtt_session_queue
        } else {
            self.shared.config.mqtt.session_queue
        }
    }

    fn router_session(&mut self) -> SessionId {
        match self.sid {
            Some(sid) => sid,
            None => {
                let (tx, rx) = mpsc::channel(self.queue_cap().max(1));
                let bytes = self.shared.config.limits.queued_bytes;
                let budget = Arc::new(QueueBudget::new(if self.app.is_some() {
                    bytes.saturating_mul(16)
                } else {
                    bytes
                }));
                let sid = self.shared.router.register_with(tx, Some(budget.clone()));
                self.budget = Some(budget);
                self.sid = Some(sid);
                self.rx = Some(rx);
                sid
            }
        }
    }

    fn device(&self) -> DeviceRef<'_> {
        DeviceRef::new(&self.pk, &self.dn)
    }

    /// True while an earlier custom-topic message of this session still waits for its script.
    fn routing_pending(&mut self) -> bool {
        let pending = self.route_after.as_mut().is_some_and(|r| {
            matches!(
                r.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        });
        if !pending {
            self.route_after = None;
        }
        pending
    }

    /// The ACL: the connection's own topics, and those of its logged-in sub-devices.
    fn may(&self, access: Access, topic: &str) -> bool {
        if let Some(products) = &self.app {
            return access == Access::Subscribe && app_may_subscribe(products, topic);
        }
        if device_may(access, self.device(), topic) {
            return true;
        }
        match topic_device(topic) {
            Some(d)
                if !d.device_name.is_empty()
                    && self.subs.contains(d.product_key, d.device_name) =>
            {
                device_may(access, d, topic)
            }
            _ => false,
        }
    }

    /// True while packets must wait: a login/logout is being handled, too much is in flight
    /// (in count or bytes), or the device is over its message rate.
    fn paused(&self) -> bool {
        (self.barrier && !self.work.is_empty())
            || self.work.len() >= MAX_WORK
            || self.work_bytes >= self.shared.config.limits.inflight_bytes
            || self.throttled_until.is_some()
    }

    /// Queues an uplink's processing, counting its bytes until it finishes.
    fn push_work(&mut self, size: usize, work: Work) {
        self.work_sizes.push_back((size, None));
        self.work_bytes += size;
        self.big |= self.work_bytes >= BIG_CONNECTION;
        self.work.push_back(work);
    }

    /// The device a message on `topic` speaks for: a logged-in sub-device named in the
    /// topic, else the connected device.
    fn speaker<'a>(&'a self, topic: &'a str) -> (&'a str, &'a str) {
        match topic_device(topic) {
            Some(d)
                if (d.product_key != self.pk || d.device_name != self.dn)
                    && !d.device_name.is_empty()
                    && self.subs.contains(d.product_key, d.device_name) =>
            {
                (d.product_key, d.device_name)
            }
            _ => (&self.pk, &self.dn),
        }
    }

    /// Takes a token from the bucket of the device the PUBLISH speaks for; when empty, says
    /// how long until the next token (the packet stays unread until then).
    fn take_token(&mut self, topic: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let (pk, dn) = self.speaker(topic);
        let l = self.shared.config.limits.for_product(pk);
        let own = pk == self.pk && dn == self.dn;
        let result = if own {
            self.bucket
                .take(l.messages_per_second, l.message_burst, now)
        } else {
            let key = (pk.to_owned(), dn.to_owned());
            self.sub_buckets
                .get_or_insert_with(Default::default)
                .entry(key)
                .or_insert_with(|| Bucket::full(l.message_burst, now))
                .take(l.messages_per_second, l.message_burst, now)
        };
        if let Err(wait) = result {
            let (pk, dn) = self.speaker(topic);
            let why = format!(
                "over {} messages per second (burst {}): reading paused {} ms",
                l.messages_per_second,
                l.message_burst,
                wait.as_millis().max(1)
            );
            self.shared
                .thing
                .limits
                .refuse(pk, dn, Refusal::Throttled, &why, now_ms());
        }
        result
    }

    /// Whether a QoS 1 delivery of `size` bytes may go out now: the in-flight window has room
    /// in count and in bytes (one message always fits an empty window).
    fn window_open(&self, size: usize) -> bool {
        self.inflight.len() < self.shared.config.mqtt.max_inflight
            && (self.inflight.is_empty()
                || self.inflight_bytes + size <= self.shared.config.limits.inflight_bytes)
    }

    /// Subscribes this connection to a device's downlink topics (Alibaba's "auto-subscribe",
    /// asked for with `_ss=1` in the client id), then sends it any pending shadow delta.
    fn auto_subscribe(&mut self, pk: &str, dn: &str, own: bool) {
        let sid = self.router_session();
        for f in auto_filters(pk, dn, own) {
            self.shared.router.subscribe(sid, &f, 0);
        }
        let thing = self.shared.thing.clone();
        let (pk, dn) = (pk.to_owned(), dn.to_owned());
        tokio::spawn(async move { crate::thing::shadow::push_delta(&thing, &pk, &dn).await });
    }

    /// Applies a finished uplink: close on a storage failure (unacknowledged), else apply
    /// sub-device changes, acknowledge, and send the replies.
    async fn finish(
        &mut self,
        pkid: Option<u16>,
        outcome: Outcome,
        refused: Option<PubAckReason>,
    ) -> Step {
        if outcome.failed {
            tracing::error!(product_key = %self.pk, device_name = %self.dn, "closing connection: an uplink could not be stored");
            self.disconnect(reason::UNSPECIFIED_ERROR);
            return Step::Close(OfflineReason::StorageFailed);
        }
        match outcome.change {
            Some(Change::Login(logins)) => {
                for l in logins {
                    let key = (l.product_key.clone(), l.device_name.clone());
                    let serial = l.registration.serial;
                    let kicked = l.registration.kicked;
                    let k2 = key.clone();
                    self.sub_kicks
                        .get_or_insert_with(FuturesUnordered::new)
                        .push(Box::pin(async move { (k2, serial, kicked.await) }));
                    self.subs.lock().insert(
                        key,
                        crate::thing::SubEntry {
                            serial,
                            done: l.registration.done,
                        },
                    );
                    self.shared
                        .metrics
                        .sub_devices
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.shared
                        .presence
                        .record(PresenceEvent {
                            product_key: l.product_key.clone(),
                            device_name: l.device_name.clone(),
                            status: "online".into(),
                            reason: format!("login through gateway {}/{}", self.pk, self.dn),
                            client_addr: Some(self.addr.clone()),
                            at: now_ms(),
                        })
                        .await;
                    if l.auto_subscribe {
                        self.auto_subscribe(&l.product_key, &l.device_name, false);
                    }
                }
            }
            Some(Change::Logout(subs, why)) => Box::pin(self.logout(subs, &why)).await,
            None => {}
        }
        if let Some(pkid) = pkid {
            self.version.write(
                Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: refused.unwrap_or(PubAckReason::Success),
                    },
                    None,
                ),
                &mut self.out,
            );
        }
        for m in outcome.replies {
            self.shared.router.publish(m);
        }
        Step::Continue
    }

    /// Takes sub-devices offline.
    async fn logout(&mut self, subs: Vec<(String, String)>, why: &str) {
        for key in subs {
            let Some(entry) = self.subs.lock().remove(&key) else {
                continue;
            };
            if let Some(b) = self.sub_buckets.as_mut() {
                b.remove(&key);
            }
            if let Some(sid) = self.sid {
                for f in auto_filters(&key.0, &key.1, false) {
                    self.shared.router.unsubscribe(sid, &f);
                }
            }
            self.shared
                .metrics
                .sub_devices
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.shared
                .presence
                .record(PresenceEvent {
                    product_key: key.0.clone(),
                    device_name: key.1.clone(),
                    status: "offline".into(),
                    reason: why.to_owned(),
                    client_addr: Some(self.addr.clone()),
                    at: now_ms(),
                })
                .await;
            self.shared.sessions.remove(&key.0, &key.1, entry.serial);
            drop(entry.done);
        }
    }

    /// Takes every sub-device offline (the gateway's connection ended).
    async fn logout_all(&mut self, why: &str) {
        // Most connections are not gateways: nothing to do, and no timer to arm.
        if self.work.is_empty() && self.subs.lock().is_empty() {
            return;
        }
        // Logins still in flight registered their sub-devices: release those registrations
        // (bounded wait), so that no sub-device stays "online" without a connection.
        let pending = std::mem::take(&mut self.work);
        self.work_sizes.clear();
        self.work_bytes = 0;
        let sessions = self.shared.sessions.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), async move {
            let mut pending = pending;
            while let Some((_, outcome)) = pending.next().await {
                if let Some(Change::Login(logins)) = outcome.change {
                    for l in logins {
                        sessions.remove(&l.product_key, &l.device_name, l.registration.serial);
                    }
                }
            }
        })
        .await;
        let all: Vec<(String, String)> = self.subs.lock().keys().cloned().collect();
        self.logout(all, why).await;
    }

    /// Checks a PUBLISH the ACL allowed against the limits of the device it speaks for: its
    /// payload size per topic class, and for RETAIN its retained messages (kept here when
    /// within them). `Some` when refused: acknowledged (MQTT 5: "quota exceeded"), not routed,
    /// counted, and a violation of the connection.
    fn over_limits(
        &mut self,
        topic: &str,
        payload: &bytes::Bytes,
        qos: u8,
        ack: Option<u16>,
        retain: bool,
    ) -> Option<Step> {
        let l = self.shared.config.limits.for_product(self.speaker(topic).0);
        let max = payload_limit(&l, topic);
        let refusal = if payload.len() > max {
            Some((
                Refusal::PayloadTooLarge,
                format!(
                    "payload of {} bytes on {topic} is over its limit of {max} bytes",
                    payload.len()
                ),
            ))
        } else if retain {
            let m = Message {
                topic: topic.to_owned(),
                payload: payload.clone(),
                qos,
                retain: true,
            };
            self.shared
                .router
                .retain(
                    self.speaker(topic),
                    &m,
                    l.retained_messages,
                    l.retained_bytes,
                )
                .err()
                .map(|e| {
                    (
                        Refusal::Retained,
                        format!("retained message on {topic} not kept: {e}"),
                    )
                })
        } else {
            None
        };
        let (kind, why) = refusal?;
        let (pk, dn) = self.speaker(topic);
        self.shared
            .thing
            .limits
            .refuse(pk, dn, kind, &why, now_ms());
        if let Some(pkid) = ack {
            self.puback(pkid, PubAckReason::QuotaExceeded);
        }
        Some(self.violation())
    }

    /// Acknowledges a PUBLISH that is not processed (refused, or with nothing to do): at once,
    /// or behind the packets still in the thing layer, as MQTT wants PUBACKs in order.
    fn puback(&mut self, pkid: u16, reason: PubAckReason) {
        if self.work.is_empty() {
            self.version
                .write(Packet::PubAck(PubAck { pkid, reason }, None), &mut self.out);
        } else {
            self.work_sizes.push_back((0, Some(reason)));
            self.work.push_back(Box::pin(std::future::ready((
                Some(pkid),
                Outcome::default(),
            ))));
        }
    }

    fn violation(&mut self) -> Step {
        self.violations += 1;
        if self.violations > self.shared.config.mqtt.max_acl_violations {
            tracing::warn!(product_key = %self.pk, device_name = %self.dn, violations = self.violations, "closing connection after repeated ACL violations");
            self.disconnect(reason::NOT_AUTHORIZED);
            Step::Close(OfflineReason::AclViolations)
        } else {
            Step::Continue
        }
    }

    fn on_frame(&mut self, buf: &mut BytesMut, h: &frame::FrameHeader) -> Step {
        let max = self.shared.config.mqtt.max_packet_size;
        if !h.flags_valid() {
            return self.protocol_error(
                reason::MALFORMED_PACKET,
                format!(
                    "{:?} with invalid fixed-header flags {:04b}",
                    h.kind, h.flags
                ),
            );
        }
        if h.kind == PacketType::Publish && self.app.is_none() {
            if let Some(Ok(topic)) = frame::publish_topic(buf, h).map(std::str::from_utf8) {
                if let Err(wait) = self.take_token(topic) {
                    return Step::Throttle(wait);
                }
            }
        }
        let (qos, pkid) = match h.kind {
            PacketType::Publish => (h.qos(), frame::publish_packet_id(buf, h)),
            // rumqttd's 3.1.1 decoder has no AUTH packet; refuse it here, before the codec.
            PacketType::Auth if self.version == Version::V311 => {
                return self
                    .protocol_error(reason::PROTOCOL_ERROR, "AUTH packet in MQTT 3.1.1".into());
            }
            _ => (0, None),
        };
        let packet = match self.version.read(buf, max) {
            Ok(p) => p,
            Err(e) => return self.protocol_error(reason::MALFORMED_PACKET, e),
        };
        match packet {
            Packet::Publish(publish, _) => {
                if qos == 2 {
                    return self.protocol_error(
                        reason::QOS_NOT_SUPPORTED,
                        "QoS 2 is not supported (Alink uses QoS 0 and 1)".into(),
                    );
                }
                let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
                    return self
                        .protocol_error(reason::MALFORMED_PACKET, "topic is not UTF-8".into());
                };
                // MQTT 4.7: a topic name is not empty and holds no wildcard and no NUL; such
                // a PUBLISH is a protocol error, not something to acknowledge.
                if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                    return self.protocol_error(
                        reason::TOPIC_NAME_INVALID,
                        format!(
                            "PUBLISH topic `{}` is empty or holds a wildcard or NUL",
                            topic.escape_debug()
                        ),
                    );
                }
                // Alibaba's parsing tag: a custom topic published as `<topic>?_sn=default` is
                // the topic without the tag, its payload turned into JSON by the product's
                // `transformPayload` before subscribers, consumer groups and rules see it.
                let (topic, parse) = match topic.strip_suffix(PARSE_TAG) {
                    Some(t) => (t.to_owned(), true),
                    None => (topic, false),
                };
                let allowed = self.may(Access::Publish, &topic);
                let ack = (qos == 1).then_some(pkid).flatten();
                let mut retain = publish.retain;
                if allowed {
                    // A retained message with the parsing tag is kept once transformed (by
                    // the router, within the server's totals), so not checked here.
                    if let Some(step) =
                        self.over_limits(&topic, &publish.payload, qos, ack, retain && !parse)
                    {
                        return step;
                    }
                    // Kept by `over_limits`; routed live from here.
                    retain &= parse;
                    Metrics::inc(&self.shared.metrics.messages_in);
                    let system = classify(&topic);
                    let tagged = parse
                        && system.is_none()
                        && custom_topic(&topic).is_some_and(|pk| self.shared.thing.scripts.has(pk));
                    if tagged || (system.is_none() && self.routing_pending()) {
                        let pk = custom_topic(&topic).map(str::to_owned);
                        let shared = self.shared.clone();
                        let raw = publish.payload;
                        let size = topic.len() + raw.len();
                        let before = self.route_after.take();
                        let (done, after) = tokio::sync::oneshot::channel();
                        self.route_after = Some(after);
                        self.push_work(
                            size,
                            Box::pin(async move {
                                let payload = match (&pk, tagged) {
                                    (Some(pk), true) => transform(&shared, pk, &topic, raw).await,
                                    _ => raw,
                                };
                                if let Some(before) = before {
                                    let _ = before.await;
                                }
                                let failed = publish_custom(
                                    &shared,
                                    pk.as_deref(),
                                    topic,
                                    payload,
                                    qos,
                                    retain,
                                )
                                .await;
                                let _ = done.send(());
                                (
                                    ack,
                                    Outcome {
                                        failed,
                                        ..Outcome::default()
                                    },
                                )
                            }),
                        );
                        return Step::Continue;
                    }
                    // A device's uplinks on system topics are for the platform: never echoed
                    // back to the device's own subscriptions.
                    let origin = system.and(self.sid);
                    let barrier = system.is_some_and(|(_, k)| k.is_barrier());
                    let is_system = system.is_some();
                    let payload = publish.payload.clone();
                    let size = topic.len() + payload.len();
                    self.shared.router.publish_from(
                        Message {
                            topic: topic.clone(),
                            payload: publish.payload,
                            qos,
                            retain,
                        },
                        origin,
                    );
                    if is_system {
                        let origin = Origin {
                            product_key: self.pk.clone(),
                            device_name: self.dn.clone(),
                            subs: self.subs.clone(),
                            addr: self.addr.clone(),
                        };
                        let fut = self.shared.thing.clone().handle(origin, topic, payload);
                        self.push_work(size, Box::pin(async move { (ack, fut.await) }));
                        self.barrier |= barrier;
                        return Step::Continue;
                    }
                    // A custom topic that a consumer group takes: acknowledged once queued.
                    if let Some(pk) = custom_topic(&topic)
                        .filter(|pk| self.shared.apps.wants(pk, crate::apps::MessageType::Custom))
                    {
                        let m = crate::apps::Outgoing {
                            product_key: pk.to_owned(),
                            kind: crate::apps::MessageType::Custom,
                            topic: topic.clone(),
                            payload: payload.to_vec(),
                            generated_at: now_ms(),
                        };
                        let apps = self.shared.apps.clone();
                        self.push_work(
                            size,
                            Box::pin(async move {
                                let failed = !apps.publish(m).await;
                                (
                                    ack,
                                    Outcome {
                                        failed,
                                        ..Outcome::default()
                                    },
                                )
                            }),
                        );
                        return Step::Continue;
                    }
                    if !self.work.is_empty() {
                        // QoS 1 acknowledgements go out in the order the packets arrived.
                        self.push_work(0, Box::pin(std::future::ready((ack, Outcome::default()))));
                        return Step::Continue;
                    }
                } else {
                    Metrics::inc(&self.shared.metrics.acl_publish_refused);
                    tracing::warn!(product_key = %self.pk, device_name = %self.dn, %topic, "PUBLISH refused by ACL, dropped");
                }
                if let (1, Some(pkid)) = (qos, pkid) {
                    let reason = if allowed {
                        PubAckReason::Success
                    } else {
                        PubAckReason::NotAuthorized
                    };
                    self.puback(pkid, reason);
                }
                if !allowed {
                    return self.violation();
                }
            }
            Packet::Subscribe(sub, _) => {
                let mut codes = Vec::with_capacity(sub.filters.len());
                let mut refused = 0;
                let mut shadows = Vec::new();
                let max_subs = self
                    .shared
                    .config
                    .limits
                    .for_product(&self.pk)
                    .max_subscriptions;
                for f in &sub.filters {
                    let known = self
                        .sid
                        .is_some_and(|sid| self.shared.router.has_filter(sid, &f.path));
                    if !known && self.subscriptions as usize >= max_subs && self.app.is_none() {
                        let why = format!(
                            "SUBSCRIBE {} refused: the connection holds {} filters, its limit",
                            f.path, self.subscriptions
                        );
                        self.shared.thing.limits.refuse(
                            &self.pk,
                            &self.dn,
                            Refusal::Subscriptions,
                            &why,
                            now_ms(),
                        );
                        refused += 1;
                        codes.push(match self.version {
                            Version::V311 => SubscribeReasonCode::Failure,
                            Version::V5 => SubscribeReasonCode::QuotaExceeded,
                        });
                        continue;
                    }
                    if self.may(Access::Subscribe, &f.path) {
                        if !known {
                            self.subscriptions += 1;
                        }
                        if let Some(d) = f
                            .path
                            .strip_prefix("/shadow/get/")
                            .and_then(|_| topic_device(&f.path))
                        {
                            shadows.push((d.product_key.to_owned(), d.device_name.to_owned()));
                        }
                        let granted = if f.qos == QoS::AtMostOnce { 0 } else { 1 };
                        let sid = self.router_session();
                        self.shared.router.subscribe(sid, &f.path, granted);
                        codes.push(SubscribeReasonCode::Success(if granted == 0 {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        }));
                    } else {
                        refused += 1;
                        Metrics::inc(&self.shared.metrics.acl_subscribe_refused);
                        tracing::warn!(product_key = %self.pk, device_name = %self.dn, filter = %f.path, "SUBSCRIBE refused by ACL");
                        codes.push(match self.version {
                            Version::V311 => SubscribeReasonCode::Failure,
                            Version::V5 => SubscribeReasonCode::NotAuthorized,
                        });
                    }
                }
                self.version.write(
                    Packet::SubAck(
                        SubAck {
                            pkid: sub.pkid,
                            return_codes: codes,
                        },
                        None,
                    ),
                    &mut self.out,
                );
                for (pk, dn) in shadows {
                    let thing = self.shared.thing.clone();
                    tokio::spawn(async move {
                        crate::thing::shadow::push_delta(&thing, &pk, &dn).await
                    });
                }
                for _ in 0..refused {
                    if let Step::Close(r) = self.violation() {
                        return Step::Close(r);
                    }
                }
            }
            Packet::Unsubscribe(unsub, _) => {
                let reasons = unsub
                    .filters
                    .iter()
                    .map(|f| {
                        if self
                            .sid
                            .is_some_and(|sid| self.shared.router.unsubscribe(sid, f))
                        {
                            self.subscriptions = self.subscriptions.saturating_sub(1);
                            UnsubAckReason::Success
                        } else {
                            UnsubAckReason::NoSubscriptionExisted
                        }
                    })
                    .collect();
                self.version.write(
                    Packet::UnsubAck(
                        UnsubAck {
                            pkid: unsub.pkid,
                            reasons,
                        },
                        None,
                    ),
                    &mut self.out,
                );
            }
            Packet::PubAck(ack, _) => {
                if let Some(m) = self.inflight.remove(&ack.pkid) {
                    self.inflight_bytes = self.inflight_bytes.saturating_sub(m.size());
                }
                while let Some(size) = self.pending.front().map(|d| d.message.size()) {
                    if !self.window_open(size) {
                        break;
                    }
                    if let Some(d) = self.pending.pop_front() {
                        self.deliver(d);
                    }
                }
            }
            Packet::PingReq(_) => self
                .version
                .write(Packet::PingResp(PingResp), &mut self.out),
            Packet::Disconnect(d, _) => {
                return Step::Close(
                    if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                        OfflineReason::ConnectionLost(
                            "DISCONNECT asking for the will message".into(),
                        )
                    } else {
                        OfflineReason::CleanDisconnect
                    },
                );
            }
            other => {
                return self.protocol_error(
                    reason::PROTOCOL_ERROR,
                    format!("unexpected {} packet", packet_name(&other)),
                );
            }
        }
        Step::Continue
    }

    /// Closes the connection for a protocol error; MQTT 5 clients get `code` as the reason.
    fn protocol_error(&mut self, code: u8, why: String) -> Step {
        Metrics::inc(&self.shared.metrics.protocol_errors);
        tracing::warn!(product_key = %self.pk, device_name = %self.dn, %why, "closing connection");
        self.disconnect(code);
        Step::Close(OfflineReason::ProtocolError(why))
    }

    /// Writes a delivery, or parks it while the in-flight window is full.
    fn deliver(&mut self, d: Delivery) {
        let qos = d.qos;
        let size = d.message.size();
        let mut packet_id = 0;
        if qos > 0 {
            if !self.window_open(size) {
                self.pending.push_back(d);
                return;
            }
            packet_id = self.alloc_pkid();
            self.inflight.insert(packet_id, d.message.clone());
            self.inflight_bytes += size;
        }
        // Out of the queue: its bytes no longer count against the queue budget.
        if let Some(b) = &self.budget {
            b.release(size);
        }
        let m = &d.message;
        let p = PublishOut {
            topic: &m.topic,
            payload: &m.payload,
            qos,
            packet_id,
            retain: d.retained,
            dup: false,
            v5: self.version == Version::V5,
        };
        let out = &mut self.out;
        match frame::encode_publish(&p, |b| out.put_slice(b)) {
            Ok(_) => Metrics::inc(&self.shared.metrics.messages_out),
            Err(e) => tracing::error!(topic = %m.topic, error = ?e, "cannot encode PUBLISH"),
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

/// An application's filter (possibly `$share/{name}/...`) must stay inside one of its products:
/// `/sys/{pk}/...`, `/{pk}/...` (custom topics) or `/as/mqtt/status/{pk}/...` (lifecycle).
fn app_may_subscribe(products: &std::collections::HashSet<String>, filter: &str) -> bool {
    let f = crate::router::parse_shared(filter).map_or(filter, |(_, f)| f);
    if f.starts_with("$share/") || !ironlink_shared::acl::valid_topic_filter(f) {
        return false;
    }
    products.iter().any(|pk| {
        [
            format!("/sys/{pk}/"),
            format!("/{pk}/"),
            format!("/as/mqtt/status/{pk}/"),
        ]
        .iter()
        .any(|prefix| f.starts_with(prefix.as_str()))
    })
}

/// The downlink topics of a device that auto-subscription covers. A gateway also gets its
/// session replies; its uplinks on these topics are never echoed back (see `publish_from`).
fn auto_filters(pk: &str, dn: &str, own: bool) -> Vec<String> {
    let mut f = vec![
        format!("/sys/{pk}/{dn}/#"),
        format!("/shadow/get/{pk}/{dn}"),
        format!("/ota/device/upgrade/{pk}/{dn}"),
    ];
    if own {
        f.push(format!("/ext/session/{pk}/{dn}/#"));
        f.push(format!("/ext/ntp/{pk}/{dn}/response"));
    }
    f
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::SubAck(..) => "SUBACK",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingResp(..) => "PINGRESP",
        _ => "unexpected",
    }
}

/// The tag a device appends to a custom topic to have its payload parsed by the product's
/// `transformPayload` (Alibaba's `?_sn=default`).
const PARSE_TAG: &str = "?_sn=default";

/// The product key of a custom topic (`/{pk}/{dn}/user/...`).
fn custom_topic(topic: &str) -> Option<&str> {
    let d = topic_device(topic)?;
    let tail = topic
        .strip_prefix('/')?
        .strip_prefix(d.product_key)?
        .strip_prefix('/')?
        .strip_prefix(d.device_name)?;
    (!d.device_name.is_empty() && tail.starts_with("/user/")).then_some(d.product_key)
}

/// A tagged custom topic's payload as the product's `transformPayload` returns it (JSON). When
/// the script fails, the payload goes on as it came (nothing is lost) and the failure is counted
/// in the script's counters and logged with the reason.
async fn transform(shared: &Shared, pk: &str, topic: &str, raw: bytes::Bytes) -> bytes::Bytes {
    use crate::rules::script::{Answer, Call};
    let call = Call::Transform(topic.to_owned(), raw.to_vec());
    match shared.thing.scripts.call(pk, call).await {
        Ok(Answer::Json(v)) => bytes::Bytes::from(v.to_string()),
        Ok(Answer::Bytes(_)) => raw,
        Err(e) => {
            tracing::warn!(product_key = %pk, %topic, error = %e, "transformPayload failed: the payload goes on unparsed");
            raw
        }
    }
}

/// Publishes a device's message to subscribers and, for a custom topic (`pk`) that a consumer
/// group or rule takes, to them. True when queueing for them failed.
async fn publish_custom(
    shared: &Shared,
    pk: Option<&str>,
    topic: String,
    payload: bytes::Bytes,
    qos: u8,
    retain: bool,
) -> bool {
    let wanted = pk.filter(|pk| shared.apps.wants(pk, crate::apps::MessageType::Custom));
    let m = wanted.map(|pk| crate::apps::Outgoing {
        product_key: pk.to_owned(),
        kind: crate::apps::MessageType::Custom,
        topic: topic.clone(),
        payload: payload.to_vec(),
        generated_at: now_ms(),
    });
    shared.router.publish_from(
        Message {
            topic,
            payload,
            qos,
            retain,
        },
        None,
    );
    match m {
        Some(m) => !shared.apps.publish(m).await,
        None => false,
    }
}
