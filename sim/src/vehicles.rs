//! Simulated vehicle terminals: a JT/T 808 terminal (registers, authenticates, reports
//! locations, answers the platform's messages) and a GB/T 32960 vehicle (logs in, reports
//! real-time data), built on Ironlink's codecs. Used by the end-to-end tests and by
//! `bench vehicles`.

use anyhow::{anyhow, bail, Context, Result};
use ironlink_protocols::gb32960 as g;
use ironlink_protocols::jt808 as j;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a simulated terminal waits for the platform.
pub const ANSWER: Duration = Duration::from_secs(30);

/// A JT/T 808 terminal (2013 frames).
#[derive(Debug)]
pub struct Terminal {
    /// Its connection.
    pub stream: TcpStream,
    deframer: j::Deframer,
    got: VecDeque<j::Frame>,
    serial: u16,
    /// Its phone number (the device name in the cloud).
    pub phone: String,
}

impl Terminal {
    /// Connects.
    pub async fn connect(addr: SocketAddr, phone: &str) -> Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?,
            deframer: j::Deframer::new(),
            got: VecDeque::new(),
            serial: 1,
            phone: phone.into(),
        })
    }

    /// Sends a message; returns its serial number.
    pub async fn send(&mut self, m: &j::Message) -> Result<u16> {
        let serial = self.serial;
        self.serial = self.serial.wrapping_add(1);
        let h = j::Header::new_2013(m.msg_id(), &self.phone, serial);
        for f in j::encode_message(&h, m).map_err(|e| anyhow!("{e}"))? {
            self.stream.write_all(&f).await?;
        }
        Ok(serial)
    }

    /// The next message from the platform (bounded wait).
    pub async fn next(&mut self) -> Result<(j::Header, j::Message)> {
        let f = self.next_frame().await?;
        let m = j::decode(f.header.msg_id, false, &f.body).map_err(|e| anyhow!("{e}"))?;
        Ok((f.header, m))
    }

    /// The next frame from the platform, undecoded (a sub-package, say; bounded wait).
    pub async fn next_frame(&mut self) -> Result<j::Frame> {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            if let Some(f) = self.got.pop_front() {
                return Ok(f);
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| anyhow!("no answer from the platform within {ANSWER:?}"))??;
            if n == 0 {
                bail!("the platform closed the connection");
            }
            let mut out = Vec::new();
            self.deframer.feed(&buf[..n], &mut out);
            for f in out {
                let f = f.map_err(|e| anyhow!("{e}"))?;
                self.got
                    .push_back(j::parse_frame(&f).map_err(|e| anyhow!("{e}"))?);
            }
        }
    }

    /// Sends and returns the result of the platform's general response to it.
    pub async fn exchange(&mut self, m: &j::Message) -> Result<u8> {
        let serial = self.send(m).await?;
        loop {
            match self.next().await? {
                (_, j::Message::PlatformResponse(r)) if r.serial == serial => {
                    if r.msg_id != m.msg_id() {
                        bail!("answer for 0x{:04X}, sent 0x{:04X}", r.msg_id, m.msg_id());
                    }
                    return Ok(r.result);
                }
                // Something else (a command of the platform) first: keep it for later.
                (h, other) => {
                    let body = j::encode(&other, false);
                    self.got.push_back(j::Frame { header: h, body });
                    if self.got.len() > 64 {
                        bail!("no answer to 0x{:04X} among 64 messages", m.msg_id());
                    }
                }
            }
        }
    }

    /// Registers (0x0100); returns the platform's answer (0x8100) to it, whatever its result.
    pub async fn register(&mut self) -> Result<j::RegisterResponse> {
        let serial = self
            .send(&j::Message::Register(j::Register {
                province: 11,
                city: 100,
                maker: "70111".into(),
                model: "IRONLINK-SIM".into(),
                terminal_id: "SIM0001".into(),
                plate_color: 1,
                plate: format!("京A{}", &self.phone[self.phone.len().saturating_sub(5)..]),
            }))
            .await?;
        match self.next().await? {
            (_, j::Message::RegisterResponse(r)) if r.serial == serial => Ok(r),
            (_, other) => bail!("registration answered {other:?}"),
        }
    }

    /// Registers (0x0100) and authenticates (0x0102) with the code the platform gives.
    pub async fn register_and_authenticate(&mut self) -> Result<()> {
        let r = self.register().await?;
        if r.result != 0 {
            bail!("registration answered result {}", r.result);
        }
        let code = r.auth_code;
        let r = self
            .exchange(&j::Message::Auth(j::Auth {
                code,
                imei: None,
                software: None,
            }))
            .await?;
        if r != 0 {
            bail!("authentication answered {r}");
        }
        Ok(())
    }
}

/// A location for simulations: `t_ms` (Unix ms), latitude in 1e-6 degrees, speed 0.1 km/h.
pub fn location(t_ms: i64, lat: u32, speed: u16) -> j::Location {
    j::Location {
        alarm: 0,
        status: 0x02,
        lat,
        lon: 116_397_128,
        altitude: 44,
        speed,
        direction: 90,
        time: j::Time::from_unix_ms(t_ms),
        extras: vec![j::Extra::Mileage(123_456), j::Extra::Fuel(405)],
    }
}

/// A GB/T 32960 vehicle.
#[derive(Debug)]
pub struct Vehicle {
    /// Its connection.
    pub stream: TcpStream,
    deframer: g::Deframer,
    got: VecDeque<g::Frame>,
    /// Its VIN.
    pub vin: String,
}

impl Vehicle {
    /// Connects.
    pub async fn connect(addr: SocketAddr, vin: &str) -> Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?,
            deframer: g::Deframer::new(),
            got: VecDeque::new(),
            vin: vin.into(),
        })
    }

    /// Sends a command frame.
    pub async fn send(&mut self, command: u8, m: &g::Message) -> Result<()> {
        let b = g::encode_frame(command, g::resp::COMMAND, &self.vin, &g::encode(m))
            .map_err(|e| anyhow!("{e}"))?;
        self.stream.write_all(&b).await?;
        Ok(())
    }

    /// The next frame from the platform (bounded wait).
    pub async fn next(&mut self) -> Result<g::Frame> {
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            if let Some(f) = self.got.pop_front() {
                return Ok(f);
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| anyhow!("no answer from the platform within {ANSWER:?}"))??;
            if n == 0 {
                bail!("the platform closed the connection");
            }
            let mut out = Vec::new();
            self.deframer.feed(&buf[..n], &mut out);
            for f in out {
                self.got.push_back(f.map_err(|e| anyhow!("{e}"))?);
            }
        }
    }

    /// Sends and returns the platform's response flag.
    pub async fn exchange(&mut self, command: u8, m: &g::Message) -> Result<u8> {
        self.send(command, m).await?;
        let f = self.next().await?;
        if f.command != command {
            bail!("answer for 0x{:02X}, sent 0x{command:02X}", f.command);
        }
        Ok(f.response)
    }

    /// Logs in.
    pub async fn login(&mut self, now_ms: i64) -> Result<()> {
        let r = self
            .exchange(
                g::cmd::LOGIN,
                &g::Message::Login(g::Login {
                    time: g::Time::from_unix_ms(now_ms),
                    serial: 1,
                    iccid: "89860117795950089298".into(),
                    systems: vec!["BAT01".into()],
                }),
            )
            .await?;
        if r != g::resp::OK {
            bail!("login answered 0x{r:02X}");
        }
        Ok(())
    }
}

/// A real-time report for simulations.
pub fn report(t_ms: i64, soc: u8, speed: u16) -> g::Report {
    g::Report {
        time: g::Time::from_unix_ms(t_ms),
        items: vec![
            g::Info::Vehicle(g::Vehicle {
                state: 1,
                charging: 3,
                mode: 1,
                speed,
                mileage: 123_456,
                voltage: 3_801,
                current: 10_250,
                soc,
                dcdc: 1,
                gear: 0x0E,
                insulation: 0xFFFF, // invalid: the platform leaves it out
                accelerator: 20,
                brake: 0,
            }),
            g::Info::Position(g::Position {
                status: 0,
                lon: 121_473_701,
                lat: 31_230_416,
            }),
            g::Info::Alarms(g::Alarms {
                level: 0,
                general: 0,
                storage: vec![],
                motor: vec![],
                engine: vec![],
                other: vec![],
            }),
        ],
        rest_error: None,
    }
}
