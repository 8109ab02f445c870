//! An example device built on the firmware SDK, run on the host: a lamp on embassy-net over a
//! TAP device (the same network stack, session and handler code a microcontroller runs; only
//! the Ethernet driver and the time driver are the host's). It reports its properties every
//! period, answers property sets and gets, the `Blink` service (async) and `Toggle` (sync, over
//! RRPC), and syncs its clock over NTP. Events go to stdout, one line each, for tests to read.
//!
//! With `--flash-dir`, it also updates itself over the air: its A/B slots, embassy-boot's
//! state and the download journal are files (NOR semantics), embassy-boot's bootloader runs at
//! start (swapping in a verified image, or rolling back one that never confirmed), the running
//! version is read from the active slot, and an accepted update ends the process with code 3
//! ("reboot": run it again to boot the new image).
//!
//! ```text
//! ip tuntap add dev tap0 mode tap && ip addr add 192.168.69.1/24 dev tap0 && ip link set tap0 up
//! ironlink-lamp --tap tap0 --ip 192.168.69.2/24 --broker 192.168.69.1:1883 \
//!     --product-key PK --device-name lamp-01 --device-secret SECRET
//! ```

use clap::Parser;
use embassy_boot::{
    BlockingFirmwareUpdater, BootLoader, BootLoaderConfig, FirmwareUpdaterConfig, State,
};
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Config, Ipv4Cidr, Runner, StackResources, StaticConfigV4};
use embassy_net_tuntap::TunTapDevice;
use embassy_time::{Duration, Instant, Timer};
use ironlink_firmware::alink::{self, Value};
use ironlink_firmware::device::{Device, Handler, Output, Refusal};
use ironlink_firmware::json::Json;
use ironlink_firmware::mqtt::{Backoff, ConnectOptions, QoS};
use ironlink_firmware::ota::{self, Journal, Notice, OtaError, Url, Writer};
use ironlink_firmware::session::{Buffers, Session, SessionError};
use ironlink_firmware::tls::{self, TlsStream};
use ironlink_firmware::{Credentials, Transport};
use ironlink_firmware_host::flash::{FileFlash, SECTOR};
use ironlink_firmware_host::image;
use ironlink_firmware_host::lossy::Lossy;
use ironlink_shared::sign::SignMethod;
use static_cell::StaticCell;
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

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
    /// Directory of the flash partitions (A/B slots, boot state, download journal); enables
    /// over-the-air updates.
    #[arg(long)]
    flash_dir: Option<PathBuf>,
    /// ed25519 public key (hex) that update images must be signed with.
    #[arg(long, requires = "flash_dir")]
    public_key: Option<String>,
    /// Version of the image put in an empty active slot (a board fresh from the factory).
    #[arg(long, default_value = "1.0.0")]
    factory_version: String,
    /// Connect with TLS 1.3, verifying the broker's chain against this CA (PEM), e.g. the
    /// cloud's `data/tls/ca.pem`; `--broker` is then its MQTTS port.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Lose this share of Ethernet frames each way (a lossy link for tests), percent.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=50))]
    drop_percent: u8,
    /// Name the broker's certificate must carry (and SNI).
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// Slot sizes: 64 KiB of firmware, the update slot one sector larger (embassy-boot's swap).
const ACTIVE_SIZE: usize = 16 * SECTOR;

/// The lamp's flash: embassy-boot's three partitions and the download journal.
struct Slots {
    active: FileFlash,
    dfu: FileFlash,
    state: FileFlash,
    journal: FileFlash,
}

impl Slots {
    fn open(dir: &std::path::Path, factory_version: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut s = Slots {
            active: FileFlash::open(&dir.join("active.bin"), ACTIVE_SIZE)?,
            dfu: FileFlash::open(&dir.join("dfu.bin"), ACTIVE_SIZE + SECTOR)?,
            state: FileFlash::open(&dir.join("state.bin"), SECTOR)?,
            journal: FileFlash::open(&dir.join("journal.bin"), SECTOR)?,
        };
        if s.version().is_none() {
            use embedded_storage::nor_flash::NorFlash;
            let img = image::build(factory_version, 20_000);
            let mut padded = img.clone();
            padded.resize(img.len().div_ceil(4) * 4, 0xff);
            s.active
                .erase(0, ACTIVE_SIZE as u32)
                .and_then(|()| s.active.write(0, &padded))
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        Ok(s)
    }

    /// The running image's version.
    fn version(&mut self) -> Option<String> {
        use embedded_storage::nor_flash::ReadNorFlash;
        let mut h = [0u8; image::HEADER];
        self.active.read(0, &mut h).ok()?;
        image::version_of(&h)
    }

    /// What embassy-boot's bootloader does at reset: swap in a marked image, or revert one that
    /// was never confirmed.
    fn boot(&mut self) -> Result<State, String> {
        let mut aligned = [0u8; SECTOR];
        BootLoader::new(BootLoaderConfig {
            active: &mut self.active,
            dfu: &mut self.dfu,
            state: &mut self.state,
        })
        .prepare_boot(&mut aligned)
        .map_err(|e| format!("bootloader: {e:?}"))
    }

    fn confirm(&mut self) -> Result<(), String> {
        let mut aligned = [0u8; 4];
        BlockingFirmwareUpdater::new(
            FirmwareUpdaterConfig {
                dfu: &mut self.dfu,
                state: &mut self.state,
            },
            &mut aligned,
        )
        .mark_booted()
        .map_err(|e| format!("confirming the image: {e:?}"))
    }
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// The lamp's state, changed by the cloud.
#[derive(Debug, Default)]
struct Lamp {
    switch: bool,
    brightness: i64,
    mode: i64,
    blinks: i64,
    clock_offset_ms: Option<i64>,
    /// An upgrade notice waiting to be acted on.
    notice: Option<Vec<u8>>,
    /// The shadow's version and `desired` state, waiting to be applied.
    desired: Option<(i64, String)>,
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

    fn shadow(&mut self, version: i64, desired: Json<'_>) {
        if desired.members().next().is_some() {
            self.desired = Some((version, desired.raw().to_owned()));
        }
    }

    fn ota_notice(&mut self, payload: &[u8]) {
        println!("ota notice");
        self.notice = Some(payload.to_vec());
    }

    fn replied(&mut self, topic: &str, id: &str, code: i64) {
        if code != 200 {
            println!("refused {topic} id {id} code {code}");
        }
    }
}

impl Lamp {
    /// Applies the desired members the thing model accepts; returns what to report.
    fn apply_desired(&mut self, desired: &str) -> Vec<(String, Value<'static>)> {
        let Ok(d) = Json::parse(desired) else {
            return Vec::new();
        };
        let mut reported = Vec::new();
        for (k, v) in d.members() {
            let Some(p) = LAMP
                .properties
                .iter()
                .find(|p| p.writable && k.eq_str(p.identifier))
            else {
                continue;
            };
            if ironlink_firmware::device::check(&p.spec, v).is_err() {
                continue;
            }
            match p.identifier {
                "Switch" => self.switch = v.as_i64() == Some(1) || v.as_bool() == Some(true),
                "Brightness" => self.brightness = v.as_i64().unwrap_or(self.brightness),
                "Mode" => self.mode = v.as_i64().unwrap_or(self.mode),
                _ => continue,
            }
            let value = match p.identifier {
                "Switch" => Value::Bool(self.switch),
                "Brightness" => Value::Int(self.brightness),
                _ => Value::Int(self.mode),
            };
            reported.push((p.identifier.to_owned(), value));
        }
        reported
    }
}

/// A temperature that moves slowly (the example has no sensor).
fn temperature() -> f64 {
    let t = Instant::now().as_millis() % 60_000;
    20.0 + (t as f64 / 6_000.0).round() / 2.0
}

#[embassy_executor::task]
async fn net(mut runner: Runner<'static, Lossy<TunTapDevice>>) -> ! {
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

type LampSession<'b, 'm> = Session<'b, 'm, 1024>;

/// Publishes an OTA progress report (step 1 to 100, or a negative failure code).
async fn report<T: MqttIo>(
    session: &mut LampSession<'_, '_>,
    mqtt: &mut T,
    lamp: &mut Lamp,
    topic: &str,
    step: i32,
    desc: &str,
) -> Result<(), SessionError<T::Error>> {
    let mut body = [0u8; 256];
    let n = ota::progress(&mut body, 1, step, desc, "default").ok_or(SessionError::Timeout)?;
    println!("ota progress {step} {desc}");
    session
        .publish(mqtt, lamp, topic, &body[..n], QoS::AtMostOnce)
        .await
}

/// Downloads the image a notice offers (from where an interrupted download stopped), checks
/// its digest and signature, and marks it for the bootloader. Progress goes out as it goes.
#[allow(clippy::too_many_arguments)]
async fn update<T: MqttIo>(
    stack: embassy_net::Stack<'_>,
    slots: &mut Slots,
    payload: &[u8],
    key: &[u8; 32],
    session: &mut LampSession<'_, '_>,
    mqtt: &mut T,
    lamp: &mut Lamp,
    topic: &str,
) -> Result<String, OtaError> {
    let running = slots.version().unwrap_or_default();
    let notice = Notice::parse(payload)?;
    let url = Url::parse(notice.url)?;
    let ip: Ipv4Addr = url
        .host
        .parse()
        .map_err(|_| OtaError::Download("the URL's host must be an IPv4 address (no DNS here)"))?;
    let Slots {
        dfu,
        state,
        journal,
        ..
    } = slots;
    let mut aligned = [0u8; 4];
    let mut up = BlockingFirmwareUpdater::new(FirmwareUpdaterConfig { dfu, state }, &mut aligned);
    let mut journal = Journal::new(journal);
    let mut w = Writer::start(&mut up, &mut journal, notice, &running, ACTIVE_SIZE as u32)?;
    let from = w.offset();
    if from > 0 {
        println!("ota resuming at {from}");
    }
    let _ = report(session, mqtt, lamp, topic, w.percent(), "downloading").await;
    let (mut rx, mut tx) = ([0u8; 4096], [0u8; 1024]);
    let mut sock = TcpSocket::new(stack, &mut rx, &mut tx);
    sock.set_timeout(Some(Duration::from_secs(20)));
    let began = Instant::now();
    sock.connect((ip, url.port))
        .await
        .map_err(|_| OtaError::Download("cannot connect to the download server"))?;
    println!(
        "ota connected to the download server in {} ms",
        began.elapsed().as_millis()
    );
    let began = Instant::now();
    let got = ota::fetch(&mut sock, &url, &mut w, async |step| {
        let _ = report(session, mqtt, lamp, topic, step, "downloading").await;
    })
    .await?;
    sock.close();
    println!(
        "ota downloaded {} bytes in {} ms",
        got,
        began.elapsed().as_millis()
    );
    let began = Instant::now();
    w.finish(key)?;
    println!("ota verified in {} ms", began.elapsed().as_millis());
    Ok(notice.version.to_owned())
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    // 0: done, 1: failed, 3: an update is staged (run again to boot it).
    std::process::exit(run(spawner).await);
}

async fn run(spawner: Spawner) -> i32 {
    let args = Args::parse();
    let Some(address) = parse_cidr(&args.ip) else {
        eprintln!(
            "--ip {}: expected an IPv4 address with a prefix, e.g. 192.168.69.2/24",
            args.ip
        );
        return 1;
    };
    let key = match args.public_key.as_deref().map(parse_key) {
        Some(None) => {
            eprintln!("--public-key: expected 64 hex digits (an ed25519 public key)");
            return 1;
        }
        Some(Some(k)) => Some(k),
        None => None,
    };
    let mut slots = match args
        .flash_dir
        .as_deref()
        .map(|d| Slots::open(d, &args.factory_version))
    {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("flash partitions: {e}");
            return 1;
        }
        None => None,
    };
    // Reset: the bootloader first.
    let mut boot = State::Boot;
    if let Some(s) = slots.as_mut() {
        boot = match s.boot() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        };
        let v = s.version().unwrap_or_default();
        match boot {
            State::Swap => println!("booted {v} (new image, not confirmed yet)"),
            State::Revert => println!("booted {v} (rolled back: the new image never confirmed)"),
            _ => println!("booted {v}"),
        }
    }
    let device = match TunTapDevice::new(&args.tap) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "opening TAP device {}: {e} (create it first, as root)",
                args.tap
            );
            return 1;
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
    let device = Lossy::new(device, args.drop_percent, random(&mut seed));
    let (stack, runner) = embassy_net::new(
        device,
        config,
        RESOURCES.init(StackResources::new()),
        random(&mut seed),
    );
    if let Err(e) = spawner.spawn(net(runner)) {
        eprintln!("starting the network task: {e:?}");
        return 1;
    }
    stack.wait_config_up().await;

    let model = Device {
        product_key: &args.product_key,
        device_name: &args.device_name,
        model: &LAMP,
    };
    let lamp = Lamp {
        brightness: 50,
        ..Lamp::default()
    };
    let (mut rx, mut tx) = ([0u8; 2048], [0u8; 2048]);
    let (mut srx, mut stx, mut stopic, mut sreply) =
        ([0u8; 2048], [0u8; 2048], [0u8; 128], [0u8; 512]);
    let session: Session<'_, '_, 1024> = Session::new(
        model,
        Buffers {
            rx: &mut srx,
            tx: &mut stx,
            topic: &mut stopic,
            reply: &mut sreply,
        },
    );
    let ca_der = match args.ca_file.as_deref().map(read_pem_certificate) {
        Some(Ok(der)) => Some(der),
        Some(Err(e)) => {
            eprintln!("--ca-file: {e}");
            return 1;
        }
        None => None,
    };
    let mut ctx = Ctx {
        args: &args,
        stack,
        session,
        lamp,
        slots,
        boot,
        key,
        reports: 0,
        post_id: 0,
    };
    let mut backoff = Backoff::new(1_000, 30_000);
    let (mut tls_rx, mut tls_tx) = (vec![0u8; tls::RECORD_BUFFER], vec![0u8; 4096]);
    loop {
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        socket.set_timeout(Some(Duration::from_secs(
            u64::from(args.keepalive) * 3 / 2 + 5,
        )));
        let started = Instant::now();
        let outcome = match socket.connect(args.broker).await {
            Err(e) => Err(format!("TCP connect: {e:?}")),
            Ok(()) => match ca_der.as_deref() {
                None => ctx.connection(&mut socket, Transport::Tcp, started).await,
                Some(ca) => {
                    let cell = RefCell::new(socket);
                    let outcome = match TlsStream::connect(
                        &cell,
                        &mut tls_rx,
                        &mut tls_tx,
                        ca,
                        &args.server_name,
                        rand_core::OsRng,
                    )
                    .await
                    {
                        Ok(mut tls) => ctx.connection(&mut tls, Transport::Tls, started).await,
                        Err(e) => Err(format!("TLS handshake: {e:?}")),
                    };
                    socket = cell.into_inner();
                    outcome
                }
            },
        };
        match outcome {
            Ok(End::Reboot(v)) => {
                println!("rebooting into {v}");
                socket.close();
                let _ = socket.flush().await;
                return 3;
            }
            Ok(End::Done) => {
                println!("done after {} reports", ctx.reports);
                if args.drop_percent > 0 {
                    use std::sync::atomic::Ordering::Relaxed;
                    let lost = &ironlink_firmware_host::lossy::LOST;
                    println!(
                        "frames lost: {} received, {} sent",
                        lost[0].load(Relaxed),
                        lost[1].load(Relaxed)
                    );
                }
                socket.close();
                let _ = socket.flush().await;
                return 0;
            }
            Err(e) => {
                socket.abort();
                let delay = backoff.next_delay(random(&mut seed) as u32);
                println!("disconnected: {e}; retrying in {delay} ms");
                Timer::after_millis(u64::from(delay)).await;
            }
        }
        if ctx.reports > 0 {
            backoff.reset();
        }
    }
}

/// How a connection ended, when it ended well.
enum End {
    /// `--reports` acknowledged.
    Done,
    /// An update is staged: run again to boot it.
    Reboot(String),
}

/// The MQTT stream: plain TCP, or TLS over it.
trait MqttIo: ironlink_firmware::session::Transport<Error: core::fmt::Debug> {}

impl<T: ironlink_firmware::session::Transport<Error: core::fmt::Debug>> MqttIo for T {}

/// What lives across connections.
struct Ctx<'a, 'b, 'm> {
    args: &'a Args,
    stack: embassy_net::Stack<'static>,
    session: LampSession<'b, 'm>,
    lamp: Lamp,
    slots: Option<Slots>,
    boot: State,
    key: Option<[u8; 32]>,
    reports: u32,
    post_id: u32,
}

impl Ctx<'_, '_, '_> {
    /// One connection: MQTT connect, confirm or report the boot, inform the version, then
    /// posts every period while requests and upgrade notices are answered.
    async fn connection<T: MqttIo>(
        &mut self,
        io: &mut T,
        transport: Transport,
        started: Instant,
    ) -> Result<End, String> {
        let args = self.args;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let creds = Credentials::<192>::new(
            &args.product_key,
            &args.device_name,
            &args.device_secret,
            SignMethod::HmacSha256,
            transport,
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
        let (session, lamp) = (&mut self.session, &mut self.lamp);
        session
            .connect(io, lamp, &options, 10_000)
            .await
            .map_err(|e| format!("MQTT connect: {e:?}"))?;
        println!(
            "connected in {} ms{}",
            started.elapsed().as_millis(),
            if transport == Transport::Tls {
                " (TLS)"
            } else {
                ""
            }
        );
        let progress_topic = format!(
            "/ota/device/progress/{}/{}",
            args.product_key, args.device_name
        );
        let e = |e: SessionError<T::Error>| format!("{e:?}");
        let mut topic = [0u8; 128];
        let mut body = [0u8; 512];
        if let Some(s) = self.slots.as_mut() {
            // Connected to the cloud: the image is healthy enough to keep.
            if self.boot == State::Swap {
                s.confirm()?;
                self.boot = State::Boot;
                println!("confirmed {}", s.version().unwrap_or_default());
            } else if self.boot == State::Revert {
                report(
                    session,
                    io,
                    lamp,
                    &progress_topic,
                    ota::step::FLASH_FAILED,
                    "the new image did not confirm: rolled back",
                )
                .await
                .map_err(e)?;
                self.boot = State::Boot;
            }
            let v = s.version().unwrap_or_default();
            let n = ota::inform(&mut body, 1, &v, "default").ok_or("inform too long")?;
            let inform = format!(
                "/ota/device/inform/{}/{}",
                args.product_key, args.device_name
            );
            session
                .publish(io, lamp, &inform, &body[..n], QoS::AtLeastOnce)
                .await
                .map_err(e)?;
            println!("inform {v}");
        }
        // The shadow: ask for it (its desired state arrives like a `control` push).
        let shadow_topic = format!("/shadow/update/{}/{}", args.product_key, args.device_name);
        session
            .publish(
                io,
                lamp,
                &shadow_topic,
                alink::SHADOW_GET.as_bytes(),
                QoS::AtMostOnce,
            )
            .await
            .map_err(e)?;
        let ntp = format!("/ext/ntp/{}/{}/request", args.product_key, args.device_name);
        let n = alink::ntp_request(&mut body, Instant::now().as_millis())
            .map_err(|e| format!("{e:?}"))?;
        session
            .publish(io, lamp, &ntp, &body[..n], QoS::AtMostOnce)
            .await
            .map_err(e)?;
        let post = alink::sys_topic(
            &mut topic,
            &args.product_key,
            &args.device_name,
            "thing/event/property/post",
        )
        .map_err(|e| format!("{e:?}"))?
        .to_owned();
        loop {
            self.post_id += 1;
            let n = alink::property_post(
                &mut body,
                self.post_id,
                &[
                    ("Temperature", Value::Float(temperature())),
                    ("Switch", Value::Bool(lamp.switch)),
                    ("Brightness", Value::Int(lamp.brightness)),
                    ("Mode", Value::Int(lamp.mode)),
                ],
            )
            .map_err(|e| format!("{e:?}"))?;
            session
                .publish(io, lamp, &post, &body[..n], QoS::AtLeastOnce)
                .await
                .map_err(e)?;
            self.reports += 1;
            if self.reports == 1 {
                println!(
                    "first post acknowledged {} ms after the TCP connect began",
                    started.elapsed().as_millis()
                );
            }
            if args.reports.is_some_and(|max| self.reports >= max) {
                return Ok(End::Done);
            }
            let next = Instant::now().as_millis() + args.period_ms;
            session.serve(io, lamp, next).await.map_err(e)?;
            if let Some((version, desired)) = lamp.desired.take() {
                // Desired values the thing model accepts are applied, and reported back under
                // the next version (the cloud then drops what is done from `desired`).
                let applied = lamp.apply_desired(&desired);
                let n = alink::shadow_update(
                    &mut body,
                    version + 1,
                    &applied
                        .iter()
                        .map(|(k, v)| (k.as_str(), *v))
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| format!("{e:?}"))?;
                session
                    .publish(io, lamp, &shadow_topic, &body[..n], QoS::AtMostOnce)
                    .await
                    .map_err(e)?;
                println!("shadow applied {desired} as version {}", version + 1);
            }
            if let (Some(payload), Some(s), Some(k)) =
                (lamp.notice.take(), self.slots.as_mut(), self.key.as_ref())
            {
                match update(
                    self.stack,
                    s,
                    &payload,
                    k,
                    session,
                    io,
                    lamp,
                    &progress_topic,
                )
                .await
                {
                    Ok(v) => {
                        report(
                            session,
                            io,
                            lamp,
                            &progress_topic,
                            100,
                            "verified; rebooting",
                        )
                        .await
                        .map_err(e)?;
                        return Ok(End::Reboot(v));
                    }
                    Err(err) => {
                        report(
                            session,
                            io,
                            lamp,
                            &progress_topic,
                            err.step(),
                            err.describe(),
                        )
                        .await
                        .map_err(e)?;
                    }
                }
            }
        }
    }
}

/// The first certificate of a PEM file, as DER.
fn read_pem_certificate(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END CERTIFICATE-----"))
        .collect();
    if body.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
