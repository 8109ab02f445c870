//! An example device built on the firmware SDK, run on the host: a lamp on embassy-net over a
//! TAP device (the same network stack, session and handler code a microcontroller runs; only
//! the Ethernet driver and the time driver are the host's). It reports its properties every
//! period, answers property sets and gets, the `Blink` service (async) and `Toggle` (sync, over
//! RRPC), and syncs its clock over NTP. Events go to stdout, one line each, for tests to read.
//!
//! ```text
//! ip tuntap add dev tap0 mode tap && ip addr add 192.168.69.1/24 dev tap0 && ip link set tap0 up
//! ironlink-lamp --tap tap0 --ip 192.168.69.2/24 --broker 192.168.69.1:1883 \
//!     --product-key PK --device-name lamp-01 --device-secret SECRET
//! ```

use clap::Parser;
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Config, Ipv4Cidr, Runner, StackResources, StaticConfigV4};
use embassy_net_tuntap::TunTapDevice;
use embassy_time::{Duration, Instant, Timer};
use ironlink_firmware::alink::{self, Value};
use ironlink_firmware::device::{Device, Handler, Output, Refusal};
use ironlink_firmware::json::Json;
use ironlink_firmware::mqtt::{Backoff, ConnectOptions, QoS};
use ironlink_firmware::session::{Buffers, Session, SessionError};
use ironlink_firmware::{Credentials, Transport};
use ironlink_shared::sign::SignMethod;
use static_cell::StaticCell;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;

include!(concat!(env!("OUT_DIR"), "/model.rs"));

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Ironlink firmware SDK example: a lamp on embassy-net over a TAP device"
)]
struct Args {
    /// TAP device to use (created beforehand, e.g. `ip tuntap add dev tap0 mode tap`).
    #[arg(long, default_value = "tap0")]
    tap: String,
    /// The lamp's address and prefix on the TAP network.
    #[arg(long, default_value = "192.168.69.2/24")]
    ip: String,
    /// Default gateway, when the broker is not on the TAP network.
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Broker address (plain MQTT).
    #[arg(long)]
    broker: SocketAddrV4,
    /// Product key.
    #[arg(long)]
    product_key: String,
    /// Device name.
    #[arg(long)]
    device_name: String,
    /// Device secret.
    #[arg(long, env = "IRONLINK_DEVICE_SECRET", hide_env_values = true)]
    device_secret: String,
    /// Milliseconds between property reports.
    #[arg(long, default_value_t = 2_000)]
    period_ms: u64,
    /// MQTT keepalive, seconds.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Stop after this many acknowledged reports (runs until killed without it).
    #[arg(long)]
    reports: Option<u32>,
}

/// The lamp's state, changed by the cloud.
#[derive(Debug, Default)]
struct Lamp {
    switch: bool,
    brightness: i64,
    mode: i64,
    blinks: i64,
    clock_offset_ms: Option<i64>,
}

impl Handler for Lamp {
    fn set(&mut self, params: Json<'_>) -> Result<(), Refusal> {
        for (k, v) in params.members() {
            if k.eq_str("Switch") {
                self.switch = v.as_i64() == Some(1) || v.as_bool() == Some(true);
            } else if k.eq_str("Brightness") {
                self.brightness = v.as_i64().unwrap_or(self.brightness);
            } else if k.eq_str("Mode") {
                self.mode = v.as_i64().unwrap_or(self.mode);
            }
        }
        println!("set {}", params.raw());
        Ok(())
    }

    fn get(&mut self, property: &str) -> Option<Value<'_>> {
        match property {
            "Switch" => Some(Value::Bool(self.switch)),
            "Brightness" => Some(Value::Int(self.brightness)),
            "Mode" => Some(Value::Int(self.mode)),
            "Temperature" => Some(Value::Float(temperature())),
            _ => None,
        }
    }

    fn call(
        &mut self,
        service: &str,
        input: Json<'_>,
        output: &mut Output<'_, '_>,
    ) -> Result<(), Refusal> {
        println!("call {service} {}", input.raw());
        match service {
            "Blink" => {
                let n = input.get("Times").and_then(|t| t.as_i64()).unwrap_or(1);
                self.blinks += n;
                output.put("Done", Value::Int(n))
            }
            "Toggle" => {
                self.switch = !self.switch;
                output.put("Switch", Value::Bool(self.switch))
            }
            _ => Err(Refusal {
                code: ironlink_shared::alink::code::NO_METHOD,
                message: "not implemented",
            }),
        }
    }

    fn time(&mut self, utc_ms: u64) {
        let offset = utc_ms as i64 - Instant::now().as_millis() as i64;
        self.clock_offset_ms = Some(offset);
        println!("time {utc_ms}");
    }

    fn replied(&mut self, topic: &str, id: &str, code: i64) {
        if code != 200 {
            println!("refused {topic} id {id} code {code}");
        }
    }
}

/// A temperature that moves slowly (the example has no sensor).
fn temperature() -> f64 {
    let t = Instant::now().as_millis() % 60_000;
    20.0 + (t as f64 / 6_000.0).round() / 2.0
}

#[embassy_executor::task]
async fn net(mut runner: Runner<'static, TunTapDevice>) -> ! {
    runner.run().await
}

fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (ip, prefix) = s.split_once('/')?;
    Some(Ipv4Cidr::new(ip.parse().ok()?, prefix.parse().ok()?))
}

/// xorshift for jitter and the stack's seed (a microcontroller would use its RNG).
fn random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let code = run(spawner).await;
    std::process::exit(i32::from(code != ExitCode::SUCCESS));
}

async fn run(spawner: Spawner) -> ExitCode {
    let args = Args::parse();
    let Some(address) = parse_cidr(&args.ip) else {
        eprintln!(
            "--ip {}: expected an IPv4 address with a prefix, e.g. 192.168.69.2/24",
            args.ip
        );
        return ExitCode::FAILURE;
    };
    let device = match TunTapDevice::new(&args.tap) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "opening TAP device {}: {e} (create it first, as root)",
                args.tap
            );
            return ExitCode::FAILURE;
        }
    };
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    let config = Config::ipv4_static(StaticConfigV4 {
        address,
        gateway: args.gateway,
        dns_servers: Default::default(),
    });
    static RESOURCES: StaticCell<StackResources<2>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        config,
        RESOURCES.init(StackResources::new()),
        random(&mut seed),
    );
    if let Err(e) = spawner.spawn(net(runner)) {
        eprintln!("starting the network task: {e:?}");
        return ExitCode::FAILURE;
    }
    stack.wait_config_up().await;

    let model = Device {
        product_key: &args.product_key,
        device_name: &args.device_name,
        model: &LAMP,
    };
    let mut lamp = Lamp {
        brightness: 50,
        ..Lamp::default()
    };
    let (mut rx, mut tx) = ([0u8; 2048], [0u8; 2048]);
    let (mut srx, mut stx, mut stopic, mut sreply) =
        ([0u8; 2048], [0u8; 2048], [0u8; 128], [0u8; 512]);
    let mut session: Session<'_, '_, 1024> = Session::new(
        model,
        Buffers {
            rx: &mut srx,
            tx: &mut stx,
            topic: &mut stopic,
            reply: &mut sreply,
        },
    );
    let mut backoff = Backoff::new(1_000, 30_000);
    let mut reports = 0u32;
    let mut post_id = 0u32;
    loop {
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        socket.set_timeout(Some(Duration::from_secs(
            u64::from(args.keepalive) * 3 / 2 + 5,
        )));
        let started = Instant::now();
        let connected = async {
            socket
                .connect(args.broker)
                .await
                .map_err(|e| format!("TCP connect: {e:?}"))?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let creds = Credentials::<192>::new(
                &args.product_key,
                &args.device_name,
                &args.device_secret,
                SignMethod::HmacSha256,
                Transport::Tcp,
                Some(now_ms),
            )
            .map_err(|e| format!("credentials: {e:?}"))?;
            let options = ConnectOptions {
                client_id: &creds.client_id,
                username: Some(&creds.username),
                password: Some(&creds.password),
                keepalive_s: args.keepalive,
                clean_session: true,
                will: None,
            };
            session
                .connect(&mut socket, &mut lamp, &options, 10_000)
                .await
                .map_err(|e| format!("MQTT connect: {e:?}"))
        }
        .await;
        if let Err(e) = connected {
            let delay = backoff.next_delay(random(&mut seed) as u32);
            println!("disconnected: {e}; retrying in {delay} ms");
            socket.abort();
            Timer::after_millis(u64::from(delay)).await;
            continue;
        }
        backoff.reset();
        println!("connected in {} ms", started.elapsed().as_millis());
        let r: Result<(), SessionError<_>> = async {
            let mut topic = [0u8; 128];
            let mut body = [0u8; 512];
            let ntp = format!("/ext/ntp/{}/{}/request", args.product_key, args.device_name);
            let n = alink::ntp_request(&mut body, Instant::now().as_millis())
                .map_err(|_| SessionError::Timeout)?;
            session
                .publish(&mut socket, &mut lamp, &ntp, &body[..n], QoS::AtMostOnce)
                .await?;
            let post = alink::sys_topic(
                &mut topic,
                &args.product_key,
                &args.device_name,
                "thing/event/property/post",
            )
            .map_err(|_| SessionError::Timeout)?
            .to_owned();
            loop {
                post_id += 1;
                let n = alink::property_post(
                    &mut body,
                    post_id,
                    &[
                        ("Temperature", Value::Float(temperature())),
                        ("Switch", Value::Bool(lamp.switch)),
                        ("Brightness", Value::Int(lamp.brightness)),
                        ("Mode", Value::Int(lamp.mode)),
                    ],
                )
                .map_err(|_| SessionError::Timeout)?;
                session
                    .publish(&mut socket, &mut lamp, &post, &body[..n], QoS::AtLeastOnce)
                    .await?;
                reports += 1;
                if reports == 1 {
                    println!(
                        "first post acknowledged {} ms after the TCP connect began",
                        started.elapsed().as_millis()
                    );
                }
                if args.reports.is_some_and(|max| reports >= max) {
                    return Ok(());
                }
                let next = Instant::now().as_millis() + args.period_ms;
                session.serve(&mut socket, &mut lamp, next).await?;
            }
        }
        .await;
        match r {
            Ok(()) => {
                println!("done after {reports} reports");
                socket.close();
                let _ = socket.flush().await;
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                println!("disconnected: {e:?}");
                socket.abort();
                let delay = backoff.next_delay(random(&mut seed) as u32);
                Timer::after_millis(u64::from(delay)).await;
            }
        }
    }
}
