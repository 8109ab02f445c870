//! An Alink session over any async byte stream (`embedded-io-async`: an embassy-net
//! `TcpSocket`, or a TLS connection over one): the MQTT client and the device's request
//! handling driven with `embassy-time`'s clock. Enabled by the `embassy` feature.
//!
//! ```text
//! session.connect(&mut socket, &options).await?;     // CONNECT, CONNACK, subscriptions
//! loop {
//!     session.serve(&mut socket, &mut handler, next_report).await?;   // answer requests
//!     let n = alink::property_post(&mut buf, id, &[("Temperature", Value::Float(t))])?;
//!     session.publish(&mut socket, &mut handler, &topic, &buf[..n], QoS::AtLeastOnce).await?;
//! }
//! ```
//!
//! The session never drops a read half-way: it waits for the stream to be readable
//! ([`Transport::readable`], raced against its timers: keepalive, retransmission, the caller's
//! deadline), then reads. So streams whose reads are not cancel-safe, TLS among them, are safe
//! to use.

use crate::device::{Device, Handler};
use crate::mqtt::{Client, ConnectOptions, Event, QoS};
use embassy_futures::select::{select, Either};
use embassy_time::{Instant, Timer};
use embedded_io_async::{Read, Write};

/// A byte stream the session can wait on without reading. (Single-threaded executors, as
/// embassy's, need no `Send` bound on its future.)
#[allow(async_fn_in_trait)]
pub trait Transport: Read + Write {
    /// Returns once a read would not wait for the network (data is buffered, or has arrived,
    /// or the stream closed). Dropping it early loses nothing.
    async fn readable(&mut self) -> Result<(), Self::Error>;
}

impl Transport for embassy_net::tcp::TcpSocket<'_> {
    async fn readable(&mut self) -> Result<(), Self::Error> {
        self.wait_read_ready().await;
        Ok(())
    }
}

/// Why a session ended. After any of these, close the stream and connect again (the QoS 1
/// message in flight is sent again after the next CONNACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError<E> {
    /// The stream failed.
    Io(E),
    /// The broker closed the stream.
    Closed,
    /// CONNACK refused with this return code (4: bad credentials, 5: not authorised).
    Refused(u8),
    /// MQTT failed: a protocol error, an unanswered ping, a buffer too small.
    Mqtt(crate::mqtt::Error),
    /// No CONNACK or SUBACK within the time allowed.
    Timeout,
}

impl<E> From<crate::mqtt::Error> for SessionError<E> {
    fn from(e: crate::mqtt::Error) -> Self {
        SessionError::Mqtt(e)
    }
}

/// Buffers a session borrows: bytes received (also the largest packet accepted), bytes to
/// send, and a reply's topic and payload.
#[derive(Debug)]
pub struct Buffers<'b> {
    /// Received bytes; its size is the largest packet accepted (larger requests are answered
    /// 460 and skipped).
    pub rx: &'b mut [u8],
    /// Outgoing packets.
    pub tx: &'b mut [u8],
    /// A reply's topic.
    pub topic: &'b mut [u8],
    /// A reply's payload.
    pub reply: &'b mut [u8],
}

/// An Alink device session. `P`: the largest QoS 1 PUBLISH kept for retransmission.
#[derive(Debug)]
pub struct Session<'b, 'm, const P: usize> {
    client: Client<P>,
    device: Device<'m>,
    b: Buffers<'b>,
    rx_len: usize,
    acked: Option<u16>,
    subscribed: Option<u16>,
}

fn now_ms() -> u64 {
    Instant::now().as_millis()
}

/// How often the session looks at its timers while no byte arrives.
const TICK_MS: u64 = 1_000;

impl<'b, 'm, const P: usize> Session<'b, 'm, P> {
    /// A session for `device` over the given buffers.
    pub fn new(device: Device<'m>, b: Buffers<'b>) -> Self {
        let mut client = Client::new();
        client.set_max_packet(b.rx.len());
        Session {
            client,
            device,
            b,
            rx_len: 0,
            acked: None,
            subscribed: None,
        }
    }

    /// The MQTT client (to check whether a QoS 1 message is in flight).
    pub fn client(&self) -> &Client<P> {
        &self.client
    }

    /// Connects over a fresh stream: CONNECT, CONNACK, then the device's topic filters, each
    /// waited for (requests arriving meanwhile are answered by `h`). Returns the CONNACK's
    /// session-present flag.
    pub async fn connect<T: Transport, H: Handler>(
        &mut self,
        io: &mut T,
        h: &mut H,
        options: &ConnectOptions<'_>,
        timeout_ms: u64,
    ) -> Result<bool, SessionError<T::Error>> {
        self.client.connection_lost();
        self.rx_len = 0;
        let n = self.client.connect(options, now_ms(), self.b.tx)?;
        io.write_all(&self.b.tx[..n])
            .await
            .map_err(SessionError::Io)?;
        io.flush().await.map_err(SessionError::Io)?;
        let deadline = now_ms() + timeout_ms;
        let mut present = None;
        while present.is_none() {
            if now_ms() >= deadline {
                return Err(SessionError::Timeout);
            }
            present = self.step(io, h, deadline).await?;
        }
        let mut filter = [0u8; 128];
        let mut i = 0;
        while let Some(f) = self.device.filter(i, &mut filter) {
            let (n, id) = self.client.subscribe(f, QoS::AtLeastOnce, self.b.tx)?;
            io.write_all(&self.b.tx[..n])
                .await
                .map_err(SessionError::Io)?;
            io.flush().await.map_err(SessionError::Io)?;
            let deadline = now_ms() + timeout_ms;
            while self.subscribed != Some(id) {
                if now_ms() >= deadline {
                    return Err(SessionError::Timeout);
                }
                self.step(io, h, deadline).await?;
            }
            i += 1;
        }
        log_info!("ironlink: connected, {} topic filters subscribed", i as u32);
        Ok(present.unwrap_or(false))
    }

    /// Answers requests, keeps the connection alive and resends a late QoS 1 message until
    /// `until_ms` (on `embassy_time`'s clock, in ms).
    pub async fn serve<T: Transport, H: Handler>(
        &mut self,
        io: &mut T,
        h: &mut H,
        until_ms: u64,
    ) -> Result<(), SessionError<T::Error>> {
        while now_ms() < until_ms {
            self.step(io, h, until_ms).await?;
        }
        Ok(())
    }

    /// Publishes; for QoS 1, returns once the broker acknowledged it (serving requests while
    /// it waits; resent with DUP every 10 s). A QoS 1 message already in flight is waited for
    /// first.
    pub async fn publish<T: Transport, H: Handler>(
        &mut self,
        io: &mut T,
        h: &mut H,
        topic: &str,
        payload: &[u8],
        qos: QoS,
    ) -> Result<(), SessionError<T::Error>> {
        while self.client.is_busy() {
            self.step(io, h, now_ms() + TICK_MS).await?;
        }
        let (n, id) = self
            .client
            .publish(topic, payload, qos, false, now_ms(), self.b.tx)?;
        io.write_all(&self.b.tx[..n])
            .await
            .map_err(SessionError::Io)?;
        io.flush().await.map_err(SessionError::Io)?;
        if let Some(id) = id {
            while self.acked != Some(id) && self.client.is_busy() {
                self.step(io, h, now_ms() + TICK_MS).await?;
            }
        }
        Ok(())
    }

    /// One round: timers due, the packets buffered, then one read or a timer. Returns the
    /// CONNACK's session-present flag when one arrived.
    async fn step<T: Transport, H: Handler>(
        &mut self,
        io: &mut T,
        h: &mut H,
        deadline_ms: u64,
    ) -> Result<Option<bool>, SessionError<T::Error>> {
        let n = self.client.poll(now_ms(), self.b.tx)?;
        if n > 0 {
            io.write_all(&self.b.tx[..n])
                .await
                .map_err(SessionError::Io)?;
            io.flush().await.map_err(SessionError::Io)?;
        }
        let connected = self.drain(io, h).await?;
        if connected.is_some() {
            return Ok(connected);
        }
        let wake = deadline_ms.min(now_ms() + TICK_MS);
        match select(io.readable(), Timer::at(Instant::from_millis(wake))).await {
            Either::First(Ok(())) => {}
            Either::First(Err(e)) => return Err(SessionError::Io(e)),
            Either::Second(()) => return Ok(None),
        }
        // Readable: this read is never dropped half-way.
        match io.read(&mut self.b.rx[self.rx_len..]).await {
            Ok(0) => Err(SessionError::Closed),
            Ok(n) => {
                self.rx_len += n;
                self.drain(io, h).await
            }
            Err(e) => Err(SessionError::Io(e)),
        }
    }

    /// Handles every complete packet in the receive buffer.
    async fn drain<T: Transport, H: Handler>(
        &mut self,
        io: &mut T,
        h: &mut H,
    ) -> Result<Option<bool>, SessionError<T::Error>> {
        let mut connected = None;
        loop {
            let now = now_ms();
            let Session {
                client,
                device,
                b,
                rx_len,
                acked,
                subscribed,
            } = self;
            let r = client.receive(&b.rx[..*rx_len], now, b.tx)?;
            if r.consumed == 0 {
                return Ok(connected);
            }
            if r.reply > 0 {
                io.write_all(&b.tx[..r.reply])
                    .await
                    .map_err(SessionError::Io)?;
            }
            let answer = match r.event {
                Some(Event::Connected { session_present }) => {
                    connected = Some(session_present);
                    None
                }
                Some(Event::Refused(code)) => {
                    log_warn!("ironlink: CONNACK refused with code {}", code);
                    return Err(SessionError::Refused(code));
                }
                Some(Event::Published(id)) => {
                    *acked = Some(id);
                    None
                }
                Some(Event::Subscribed(id, _)) => {
                    *subscribed = Some(id);
                    None
                }
                Some(Event::Message { topic, payload, .. }) => {
                    device.handle(h, now, topic, payload, b.topic, b.reply)
                }
                Some(Event::Oversized {
                    topic, head, size, ..
                }) => {
                    log_warn!(
                        "ironlink: skipped a {}-byte message on {}",
                        size as u32,
                        topic
                    );
                    device.oversized(topic, head, b.topic, b.reply)
                }
                Some(Event::Unsubscribed(_) | Event::Pong) | None => None,
            };
            if let Some(a) = answer {
                let (n, _) =
                    client.publish(a.topic, a.payload, QoS::AtMostOnce, false, now, b.tx)?;
                io.write_all(&b.tx[..n]).await.map_err(SessionError::Io)?;
            }
            io.flush().await.map_err(SessionError::Io)?;
            let consumed = r.consumed;
            b.rx.copy_within(consumed..*rx_len, 0);
            *rx_len -= consumed;
        }
    }
}
