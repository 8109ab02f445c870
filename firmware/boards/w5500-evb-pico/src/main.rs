//! Example Ironlink firmware for the WIZnet W5500-EVB-Pico (RP2040 + W5500 Ethernet over SPI):
//! a lamp that reports the chip's temperature and its switch every 10 s, toggles the on-board
//! LED on the `Toggle` service (sync, over RRPC) and blinks it on `Blink`, answers property
//! sets checked against the thing model the cloud imported, and updates itself over the air
//! (signed images, resumable download, A/B swap by the `ironlink-bootloader-rp2040`
//! bootloader, confirmed once connected again, rolled back otherwise).
//!
//! Build-time settings (environment variables): `IRONLINK_PRODUCT_KEY`,
//! `IRONLINK_DEVICE_NAME`, `IRONLINK_DEVICE_SECRET`, `IRONLINK_BROKER` (`a.b.c.d:port`, plain
//! MQTT) and `IRONLINK_OTA_PUBLIC_KEY` (hex; without it every update is refused). The address
//! comes from DHCP.

#![no_std]
#![no_main]

use core::cell::RefCell;
use core::net::SocketAddrV4;
use embassy_boot_rp::{
    AlignedBuffer, BlockingFirmwareUpdater, FirmwareUpdaterConfig, State as BootState,
};
use embassy_embedded_hal::flash::partition::BlockingPartition;
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Stack, StackResources};
use embassy_net_wiznet::chip::W5500;
use embassy_net_wiznet::{Device as EthDevice, Runner as EthRunner, State as EthState};
use embassy_rp::adc::{self, Adc, Channel};
use embassy_rp::clocks::RoscRng;
use embassy_rp::flash::{Blocking, Flash};
use embassy_rp::gpio::{Input, Level, Output, Pull};
use embassy_rp::peripherals::{DMA_CH0, DMA_CH1, FLASH};
use embassy_rp::spi::{Async, Config as SpiConfig, Spi};
use embassy_rp::{bind_interrupts, dma};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;
use embassy_sync::blocking_mutex::Mutex;
use embassy_time::{Delay, Duration, Instant, Timer};
use embedded_hal_bus::spi::ExclusiveDevice;
use ironlink_firmware::alink::{self, Value};
use ironlink_firmware::device::{Device, Handler, Output as Params, Refusal};
use ironlink_firmware::json::Json;
use ironlink_firmware::mqtt::{Backoff, ConnectOptions, QoS};
use ironlink_firmware::ota::{self, Journal, Notice, OtaError, Url, Writer};
use ironlink_firmware::session::{Buffers, Session};
use ironlink_firmware::{Credentials, Transport};
use ironlink_shared::sign::SignMethod;
use static_cell::StaticCell;

include!(concat!(env!("OUT_DIR"), "/model.rs"));

const PRODUCT_KEY: &str = match option_env!("IRONLINK_PRODUCT_KEY") {
    Some(v) => v,
    None => "a1LampDemo0",
};
const DEVICE_NAME: &str = match option_env!("IRONLINK_DEVICE_NAME") {
    Some(v) => v,
    None => "lamp-0001",
};
const DEVICE_SECRET: &str = match option_env!("IRONLINK_DEVICE_SECRET") {
    Some(v) => v,
    None => "set-IRONLINK_DEVICE_SECRET-at-build-time",
};
const BROKER: &str = match option_env!("IRONLINK_BROKER") {
    Some(v) => v,
    None => "192.168.1.10:1883",
};
const OTA_PUBLIC_KEY: Option<&str> = option_env!("IRONLINK_OTA_PUBLIC_KEY");
/// The running image's version (bump it to build an update).
const VERSION: &str = env!("CARGO_PKG_VERSION");
const FLASH_SIZE: usize = 2 * 1024 * 1024;
const DFU_SIZE: u32 = 516 * 1024;

bind_interrupts!(struct Irqs {
    DMA_IRQ_0 => dma::InterruptHandler<DMA_CH0>, dma::InterruptHandler<DMA_CH1>;
    ADC_IRQ_FIFO => adc::InterruptHandler;
});

type Spi0 =
    ExclusiveDevice<Spi<'static, embassy_rp::peripherals::SPI0, Async>, Output<'static>, Delay>;
type BoardFlash = Mutex<NoopRawMutex, RefCell<Flash<'static, FLASH, Blocking, FLASH_SIZE>>>;

#[embassy_executor::task]
async fn ethernet(runner: EthRunner<'static, W5500, Spi0, Input<'static>, Output<'static>>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn net(mut runner: embassy_net::Runner<'static, EthDevice<'static>>) -> ! {
    runner.run().await
}

/// The lamp: its LED and what the cloud set.
struct Lamp {
    led: Output<'static>,
    brightness: i64,
    mode: i64,
    blinks: i64,
    notice: Option<([u8; 1024], usize)>,
}

impl Handler for Lamp {
    fn set(&mut self, params: Json<'_>) -> Result<(), Refusal> {
        for (k, v) in params.members() {
            if k.eq_str("Switch") {
                let on = v.as_i64() == Some(1) || v.as_bool() == Some(true);
                self.led
                    .set_level(if on { Level::High } else { Level::Low });
            } else if k.eq_str("Brightness") {
                self.brightness = v.as_i64().unwrap_or(self.brightness);
            } else if k.eq_str("Mode") {
                self.mode = v.as_i64().unwrap_or(self.mode);
            }
        }
        Ok(())
    }

    fn get(&mut self, property: &str) -> Option<Value<'_>> {
        match property {
            "Switch" => Some(Value::Bool(self.led.is_set_high())),
            "Brightness" => Some(Value::Int(self.brightness)),
            "Mode" => Some(Value::Int(self.mode)),
            _ => None,
        }
    }

    fn call(
        &mut self,
        service: &str,
        input: Json<'_>,
        out: &mut Params<'_, '_>,
    ) -> Result<(), Refusal> {
        match service {
            "Blink" => {
                let n = input.get("Times").and_then(|t| t.as_i64()).unwrap_or(1);
                self.blinks += n;
                out.put("Done", Value::Int(n))
            }
            "Toggle" => {
                self.led.toggle();
                out.put("Switch", Value::Bool(self.led.is_set_high()))
            }
            _ => Err(Refusal {
                code: ironlink_shared::alink::code::NO_METHOD,
                message: "not implemented",
            }),
        }
    }

    fn ota_notice(&mut self, payload: &[u8]) {
        let mut copy = [0u8; 1024];
        if let Some(dst) = copy.get_mut(..payload.len()) {
            dst.copy_from_slice(payload);
            self.notice = Some((copy, payload.len()));
        }
    }
}

/// The chip's temperature, °C, from the ADC's sensor channel.
async fn temperature(adc: &mut Adc<'static, adc::Async>, ch: &mut Channel<'static>) -> f64 {
    let raw = adc.read(ch).await.unwrap_or(0);
    let volts = f64::from(raw) * 3.3 / 4096.0;
    let t = 27.0 - (volts - 0.706) / 0.001_721;
    (t * 10.0) as i64 as f64 / 10.0
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (s.len() == 64).then_some(k)
}

extern "C" {
    static __ota_journal_start: u32;
    static __ota_journal_end: u32;
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());
    let led = Output::new(p.PIN_25, Level::Low);

    // W5500 on SPI0 (the board's wiring).
    let mut spi_cfg = SpiConfig::default();
    spi_cfg.frequency = 50_000_000;
    let spi = Spi::new(
        p.SPI0, p.PIN_18, p.PIN_19, p.PIN_16, p.DMA_CH0, p.DMA_CH1, Irqs, spi_cfg,
    );
    let cs = Output::new(p.PIN_17, Level::High);
    let int = Input::new(p.PIN_21, Pull::Up);
    let reset = Output::new(p.PIN_20, Level::High);
    let Ok(spi) = ExclusiveDevice::new(spi, cs, Delay);
    static ETH: StaticCell<EthState<8, 8>> = StaticCell::new();
    let mac = [0x02, 0x49, 0x4c, 0x00, 0x00, 0x01];
    let Ok((device, eth)) =
        embassy_net_wiznet::new(mac, ETH.init(EthState::new()), spi, int, reset).await
    else {
        cortex_m::peripheral::SCB::sys_reset();
    };
    let _ = spawner.spawn(ethernet(eth));
    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        RoscRng.next_u64(),
    );
    let _ = spawner.spawn(net(runner));
    stack.wait_config_up().await;

    // Flash: embassy-boot's state and update slot, and the download journal.
    static FLASH_CELL: StaticCell<BoardFlash> = StaticCell::new();
    let flash: &'static BoardFlash =
        FLASH_CELL.init(Mutex::new(RefCell::new(Flash::new_blocking(p.FLASH))));
    let config = FirmwareUpdaterConfig::from_linkerfile_blocking(flash, flash);
    static ALIGNED: StaticCell<AlignedBuffer<1>> = StaticCell::new();
    let aligned = ALIGNED.init(AlignedBuffer([0; 1]));
    let updater = BlockingFirmwareUpdater::new(config, &mut aligned.0);
    // Only the addresses of the linker's symbols are taken.
    let (start, end) = (
        core::ptr::addr_of!(__ota_journal_start) as u32,
        core::ptr::addr_of!(__ota_journal_end) as u32,
    );
    let journal = Journal::new(BlockingPartition::new(flash, start, end - start));
    let mut updater = updater;
    let boot = updater.get_state().unwrap_or(BootState::Boot);

    let adc = Adc::new(p.ADC, Irqs, adc::Config::default());
    let sensor = Channel::new_temp_sensor(p.ADC_TEMP_SENSOR);
    let lamp = Lamp {
        led,
        brightness: 50,
        mode: 0,
        blinks: 0,
        notice: None,
    };
    let model = Device {
        product_key: PRODUCT_KEY,
        device_name: DEVICE_NAME,
        model: &LAMP,
    };
    let broker: SocketAddrV4 = BROKER.parse().unwrap_or(SocketAddrV4::new(
        core::net::Ipv4Addr::new(192, 168, 1, 10),
        1883,
    ));
    let key = OTA_PUBLIC_KEY.and_then(hex32);

    let (mut rx, mut tx) = ([0u8; 2048], [0u8; 2048]);
    let (mut srx, mut stx, mut stopic, mut sreply) =
        ([0u8; 2048], [0u8; 1024], [0u8; 128], [0u8; 512]);
    let session: Session<'_, '_, 512> = Session::new(
        model,
        Buffers {
            rx: &mut srx,
            tx: &mut stx,
            topic: &mut stopic,
            reply: &mut sreply,
        },
    );
    let mut board = Board {
        stack,
        session,
        lamp,
        updater,
        journal,
        adc,
        sensor,
        key,
        boot,
        id: 0,
    };
    let mut backoff = Backoff::new(1_000, 60_000);
    #[cfg(feature = "tls")]
    let (tls_rx, tls_tx) = {
        static BUFS: StaticCell<([u8; ironlink_firmware::tls::RECORD_BUFFER], [u8; 2048])> =
            StaticCell::new();
        let b = BUFS.init(([0; ironlink_firmware::tls::RECORD_BUFFER], [0; 2048]));
        (&mut b.0, &mut b.1)
    };
    loop {
        let mut socket = TcpSocket::new(stack, &mut rx, &mut tx);
        socket.set_timeout(Some(Duration::from_secs(95)));
        if socket.connect(broker).await.is_ok() {
            #[cfg(not(feature = "tls"))]
            let _ = board
                .connection(&mut socket, Transport::Tcp, &mut backoff)
                .await;
            #[cfg(feature = "tls")]
            {
                let cell = core::cell::RefCell::new(socket);
                if let Ok(mut tls) = ironlink_firmware::tls::TlsStream::connect(
                    &cell,
                    tls_rx,
                    tls_tx,
                    CA_DER,
                    SERVER_NAME,
                    RoscRng,
                )
                .await
                {
                    let _ = board
                        .connection(&mut tls, Transport::Tls, &mut backoff)
                        .await;
                }
                socket = cell.into_inner();
            }
        }
        socket.abort();
        Timer::after_millis(u64::from(backoff.next_delay(RoscRng.next_u32()))).await;
    }
}

/// The broker's CA certificate (DER, from `IRONLINK_CA_DER` at build time) and the name its
/// certificate carries.
#[cfg(feature = "tls")]
const CA_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ca.der"));
#[cfg(feature = "tls")]
const SERVER_NAME: &str = match option_env!("IRONLINK_SERVER_NAME") {
    Some(v) => v,
    None => "localhost",
};

type Updater = BlockingFirmwareUpdater<
    'static,
    BlockingPartition<'static, NoopRawMutex, Flash<'static, FLASH, Blocking, FLASH_SIZE>>,
    BlockingPartition<'static, NoopRawMutex, Flash<'static, FLASH, Blocking, FLASH_SIZE>>,
>;
type JournalFlash =
    BlockingPartition<'static, NoopRawMutex, Flash<'static, FLASH, Blocking, FLASH_SIZE>>;

/// What lives across connections.
struct Board<'b, 'm> {
    stack: Stack<'static>,
    session: Session<'b, 'm, 512>,
    lamp: Lamp,
    updater: Updater,
    journal: Journal<JournalFlash>,
    adc: Adc<'static, adc::Async>,
    sensor: Channel<'static>,
    key: Option<[u8; 32]>,
    boot: BootState,
    id: u32,
}

impl Board<'_, '_> {
    /// One connection: MQTT connect, confirm or report the boot, inform the version, then a
    /// post every 10 s while requests and upgrade notices are answered. Returns when the
    /// connection fails (an accepted update resets the board instead).
    async fn connection<T: ironlink_firmware::session::Transport>(
        &mut self,
        io: &mut T,
        transport: Transport,
        backoff: &mut Backoff,
    ) -> Result<(), ()> {
        let creds = Credentials::<192>::new(
            PRODUCT_KEY,
            DEVICE_NAME,
            DEVICE_SECRET,
            SignMethod::HmacSha256,
            transport,
            None,
        )
        .map_err(|_| ())?;
        let options = ConnectOptions {
            client_id: &creds.client_id,
            username: Some(&creds.username),
            password: Some(&creds.password),
            keepalive_s: 60,
            clean_session: true,
            will: None,
        };
        let (session, lamp) = (&mut self.session, &mut self.lamp);
        session
            .connect(io, lamp, &options, 10_000)
            .await
            .map_err(|_| ())?;
        backoff.reset();
        // Connected: a new image is healthy enough to keep; a rolled-back one is reported.
        if self.boot == BootState::Swap && self.updater.mark_booted().is_ok() {
            self.boot = BootState::Boot;
        }
        let progress_topic = TopicBuf::of("/ota/device/progress/");
        let pt = progress_topic.get();
        let mut body = [0u8; 512];
        if self.boot == BootState::Revert {
            let why = "the new image did not confirm: rolled back";
            let n =
                ota::progress(&mut body, 1, ota::step::FLASH_FAILED, why, "default").unwrap_or(0);
            session
                .publish(io, lamp, pt, &body[..n], QoS::AtMostOnce)
                .await
                .map_err(|_| ())?;
            self.boot = BootState::Boot;
        }
        let n = ota::inform(&mut body, 1, VERSION, "default").unwrap_or(0);
        let inform = TopicBuf::of("/ota/device/inform/");
        session
            .publish(io, lamp, inform.get(), &body[..n], QoS::AtLeastOnce)
            .await
            .map_err(|_| ())?;
        let mut topic = [0u8; 128];
        let post = alink::sys_topic(
            &mut topic,
            PRODUCT_KEY,
            DEVICE_NAME,
            "thing/event/property/post",
        )
        .map_err(|_| ())?;
        loop {
            self.id = self.id.wrapping_add(1);
            let t = temperature(&mut self.adc, &mut self.sensor).await;
            let n = alink::property_post(
                &mut body,
                self.id,
                &[
                    ("Temperature", Value::Float(t)),
                    ("Switch", Value::Bool(lamp.led.is_set_high())),
                    ("Brightness", Value::Int(lamp.brightness)),
                    ("Mode", Value::Int(lamp.mode)),
                ],
            )
            .unwrap_or(0);
            session
                .publish(io, lamp, post, &body[..n], QoS::AtLeastOnce)
                .await
                .map_err(|_| ())?;
            let next = Instant::now().as_millis() + 10_000;
            session.serve(io, lamp, next).await.map_err(|_| ())?;
            if let Some((buf, len)) = lamp.notice.take() {
                let outcome = match self.key {
                    None => Err(OtaError::BadSignature),
                    Some(k) => {
                        update(
                            self.stack,
                            &mut self.updater,
                            &mut self.journal,
                            &buf[..len],
                            &k,
                            session,
                            io,
                            lamp,
                            pt,
                        )
                        .await
                    }
                };
                let (step, desc) = match outcome {
                    Ok(()) => (100, "verified; rebooting"),
                    Err(e) => (e.step(), e.describe()),
                };
                let n = ota::progress(&mut body, 1, step, desc, "default").unwrap_or(0);
                let _ = session
                    .publish(io, lamp, pt, &body[..n], QoS::AtLeastOnce)
                    .await;
                if step == 100 {
                    Timer::after_millis(200).await;
                    cortex_m::peripheral::SCB::sys_reset();
                }
            }
        }
    }
}

/// Downloads, verifies and marks the offered image (the bootloader swaps it in at reset).
#[allow(clippy::too_many_arguments)]
async fn update<DFU, STATE, J>(
    stack: Stack<'static>,
    updater: &mut BlockingFirmwareUpdater<'_, DFU, STATE>,
    journal: &mut Journal<J>,
    payload: &[u8],
    key: &[u8; 32],
    session: &mut Session<'_, '_, 512>,
    mqtt: &mut impl ironlink_firmware::session::Transport,
    lamp: &mut Lamp,
    progress_topic: &str,
) -> Result<(), OtaError>
where
    DFU: embedded_storage::nor_flash::NorFlash,
    STATE: embedded_storage::nor_flash::NorFlash,
    J: embedded_storage::nor_flash::NorFlash,
{
    let notice = Notice::parse(payload)?;
    let url = Url::parse(notice.url)?;
    let ip: core::net::Ipv4Addr = url
        .host
        .parse()
        .map_err(|_| OtaError::Download("the URL's host must be an IPv4 address"))?;
    let mut w = Writer::start(updater, journal, notice, VERSION, DFU_SIZE)?;
    let (mut rx, mut tx) = ([0u8; 2048], [0u8; 512]);
    let mut sock = TcpSocket::new(stack, &mut rx, &mut tx);
    sock.set_timeout(Some(Duration::from_secs(20)));
    sock.connect((ip, url.port))
        .await
        .map_err(|_| OtaError::Download("cannot connect to the download server"))?;
    ota::fetch(&mut sock, &url, &mut w, async |step| {
        let mut body = [0u8; 128];
        if let Some(n) = ota::progress(&mut body, 1, step, "downloading", "default") {
            let _ = session
                .publish(mqtt, lamp, progress_topic, &body[..n], QoS::AtMostOnce)
                .await;
        }
    })
    .await?;
    sock.close();
    w.finish(key)
}

/// A topic of this device, `{prefix}{pk}/{dn}`, written once.
struct TopicBuf([u8; 96], usize);

impl TopicBuf {
    fn of(prefix: &str) -> Self {
        let mut t = TopicBuf([0; 96], 0);
        for part in [prefix, PRODUCT_KEY, "/", DEVICE_NAME] {
            let b = part.as_bytes();
            if let Some(dst) = t.0.get_mut(t.1..t.1 + b.len()) {
                dst.copy_from_slice(b);
                t.1 += b.len();
            }
        }
        t
    }

    fn get(&self) -> &str {
        core::str::from_utf8(&self.0[..self.1]).unwrap_or("")
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}
