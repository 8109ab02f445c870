//! Over-the-air updates on the device (feature `ota`): Alink's OTA messages (version inform,
//! upgrade notice pushed or pulled, progress), an HTTP range download that resumes after a
//! reset, and the image written to the inactive slot and swapped by `embassy-boot` (A/B with
//! power-fail safety and ed25519 verification), confirmed after a healthy boot or rolled back.
//!
//! Checks, each refused with Alibaba's progress code: a version that is not newer (-1), a
//! size above the slot (-1), a broken download (-2), a SHA-256/MD5 that does not match the
//! notice's `sign` or an ed25519 signature that does not verify (-3), a flash write that fails
//! (-4).
//!
//! Signature: `data.ed25519` in the notice, hex of an ed25519 signature over the SHA-512 digest
//! of the image (what `embassy-boot` verifies), made with a key only the operator holds.

use crate::alink::{json_str_body, Cursor};
use crate::json::{Json, Kind};
use core::fmt::Write;
use embassy_boot::{BlockingFirmwareUpdater, FirmwareUpdaterError, State};
use embedded_storage::nor_flash::NorFlash;

/// Alibaba's progress codes for failures.
pub mod step {
    /// Upgrade failed (refused: not newer, too large, malformed notice).
    pub const FAILED: i32 = -1;
    /// Download failed.
    pub const DOWNLOAD_FAILED: i32 = -2;
    /// Verification failed (digest or signature).
    pub const VERIFY_FAILED: i32 = -3;
    /// Writing the flash failed.
    pub const FLASH_FAILED: i32 = -4;
}

/// How the notice's `sign` was computed over the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMethod {
    /// `SHA256`: 64 hex digits.
    Sha256,
    /// `Md5`: 32 hex digits.
    Md5,
}

/// An upgrade notice: pushed on `/ota/device/upgrade/{pk}/{dn}` or the answer to
/// `thing.ota.firmware.get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice<'a> {
    /// Firmware version.
    pub version: &'a str,
    /// Image size, bytes.
    pub size: u32,
    /// Where to download it (`http://host[:port]/path`).
    pub url: &'a str,
    /// Digest of the image (hex).
    pub sign: &'a str,
    /// How `sign` was computed.
    pub sign_method: SignMethod,
    /// Module (`default` when the notice names none).
    pub module: &'a str,
    /// ed25519 signature over the image's SHA-512 digest.
    pub signature: Option<[u8; 64]>,
}

/// Why an OTA step failed; [`OtaError::step`] is the progress code to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaError {
    /// The notice is not one (missing or malformed field).
    BadNotice(&'static str),
    /// The offered version is not newer than the running one.
    NotNewer,
    /// The image is larger than the update slot.
    TooLarge,
    /// The download failed (HTTP status, length, connection).
    Download(&'static str),
    /// The image's digest differs from the notice's.
    DigestMismatch,
    /// The signature is missing or does not verify.
    BadSignature,
    /// The flash failed, or the updater is in a state that forbids writing.
    Flash,
}

impl OtaError {
    /// The Alink progress code for this failure.
    pub fn step(self) -> i32 {
        match self {
            OtaError::BadNotice(_) | OtaError::NotNewer | OtaError::TooLarge => step::FAILED,
            OtaError::Download(_) => step::DOWNLOAD_FAILED,
            OtaError::DigestMismatch | OtaError::BadSignature => step::VERIFY_FAILED,
            OtaError::Flash => step::FLASH_FAILED,
        }
    }

    /// A short English description, for the progress message.
    pub fn describe(self) -> &'static str {
        match self {
            OtaError::BadNotice(why) | OtaError::Download(why) => why,
            OtaError::NotNewer => "the offered version is not newer than the running one",
            OtaError::TooLarge => "the image is larger than the update slot",
            OtaError::DigestMismatch => "the image's digest does not match the notice",
            OtaError::BadSignature => "the image's signature does not verify",
            OtaError::Flash => "writing the update slot failed",
        }
    }
}

impl From<FirmwareUpdaterError> for OtaError {
    fn from(e: FirmwareUpdaterError) -> Self {
        match e {
            FirmwareUpdaterError::Signature(_) => OtaError::BadSignature,
            _ => OtaError::Flash,
        }
    }
}

fn plain<'a>(j: Option<Json<'a>>) -> Option<&'a str> {
    j?.as_str()?.plain()
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

impl<'a> Notice<'a> {
    /// Reads a notice (either form: Alibaba's push `{"code":"1000","data":{..}}` or a
    /// `firmware/get` reply `{"code":200,"data":{..}}`).
    pub fn parse(payload: &'a [u8]) -> Result<Self, OtaError> {
        let j = Json::parse_bytes(payload)
            .map_err(|_| OtaError::BadNotice("the notice is not JSON"))?;
        let d = j
            .get("data")
            .filter(|d| d.kind() == Kind::Object)
            .ok_or(OtaError::BadNotice("the notice has no data object"))?;
        let version = plain(d.get("version")).ok_or(OtaError::BadNotice("no version"))?;
        let size = d
            .get("size")
            .and_then(|s| s.as_i64().or_else(|| s.as_str()?.plain()?.parse().ok()))
            .and_then(|s| u32::try_from(s).ok())
            .ok_or(OtaError::BadNotice("no size"))?;
        let url = plain(d.get("url")).ok_or(OtaError::BadNotice("no url"))?;
        let method = plain(d.get("signMethod")).unwrap_or("Md5");
        let sign_method = if method.eq_ignore_ascii_case("sha256") {
            SignMethod::Sha256
        } else if method.eq_ignore_ascii_case("md5") {
            SignMethod::Md5
        } else {
            return Err(OtaError::BadNotice("signMethod is neither SHA256 nor Md5"));
        };
        let sign = plain(d.get("sign"))
            .or_else(|| plain(d.get("md5")).filter(|_| sign_method == SignMethod::Md5))
            .ok_or(OtaError::BadNotice("no sign"))?;
        let want = if sign_method == SignMethod::Sha256 {
            64
        } else {
            32
        };
        if sign.len() != want || !sign.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(OtaError::BadNotice(
                "sign is not a hex digest of its signMethod",
            ));
        }
        let signature = match plain(d.get("ed25519")) {
            None => None,
            Some(s) => {
                let mut sig = [0u8; 64];
                hex_into(s, &mut sig)
                    .ok_or(OtaError::BadNotice("ed25519 is not 128 hex digits"))?;
                Some(sig)
            }
        };
        Ok(Notice {
            version,
            size,
            url,
            sign,
            sign_method,
            module: plain(d.get("module")).unwrap_or("default"),
            signature,
        })
    }
}

/// Whether `offered` is a newer version than `running`: dot-separated numbers compared as
/// numbers (`1.10` > `1.9`), anything else byte by byte.
pub fn is_newer(offered: &str, running: &str) -> bool {
    let mut a = offered.split('.');
    let mut b = running.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return false,
            (Some(_), None) => return true,
            (None, Some(_)) => return false,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(p), Ok(q)) => p.cmp(&q),
                    _ => x.cmp(y),
                };
                if ord != core::cmp::Ordering::Equal {
                    return ord == core::cmp::Ordering::Greater;
                }
            }
        }
    }
}

fn module_member(w: &mut Cursor<'_>, module: &str) -> core::fmt::Result {
    if module.is_empty() || module == "default" {
        return Ok(());
    }
    w.write_str(",\"module\":\"")?;
    json_str_body(w, module)?;
    w.write_char('"')
}

/// Writes the version inform for `/ota/device/inform/{pk}/{dn}`.
pub fn inform(out: &mut [u8], id: u32, version: &str, module: &str) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(w, "{{\"id\":\"{id}\",\"params\":{{\"version\":\"").ok()?;
    json_str_body(&mut w, version).ok()?;
    w.write_char('"').ok()?;
    module_member(&mut w, module).ok()?;
    w.write_str("}}").ok()?;
    Some(w.at)
}

/// Writes a progress report for `/ota/device/progress/{pk}/{dn}`: `step` 1 to 100, or a
/// negative failure code ([`step`]).
pub fn progress(out: &mut [u8], id: u32, step: i32, desc: &str, module: &str) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(
        w,
        "{{\"id\":\"{id}\",\"params\":{{\"step\":\"{step}\",\"desc\":\""
    )
    .ok()?;
    json_str_body(&mut w, desc).ok()?;
    w.write_char('"').ok()?;
    module_member(&mut w, module).ok()?;
    w.write_str("}}").ok()?;
    Some(w.at)
}

/// Writes the request for a pending upgrade (`thing.ota.firmware.get` on
/// `/sys/{pk}/{dn}/thing/ota/firmware/get`).
pub fn firmware_get(out: &mut [u8], id: u32, module: &str) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(w, "{{\"id\":\"{id}\",\"version\":\"1.0\",\"params\":{{").ok()?;
    w.write_str("\"module\":\"").ok()?;
    json_str_body(&mut w, if module.is_empty() { "default" } else { module }).ok()?;
    w.write_str("\"},\"method\":\"thing.ota.firmware.get\"}")
        .ok()?;
    Some(w.at)
}

/// An `http://` URL taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Url<'a> {
    /// Host name or address.
    pub host: &'a str,
    /// Port (80 when the URL names none).
    pub port: u16,
    /// Path with query, starting with `/`.
    pub path: &'a str,
}

impl<'a> Url<'a> {
    /// Parses `http://host[:port][/path]` (HTTPS needs the TLS feature, not built yet).
    pub fn parse(url: &'a str) -> Result<Self, OtaError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or(OtaError::Download("only http:// URLs can be downloaded"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| OtaError::Download("bad port in the URL"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || path.bytes().any(|b| b <= b' ') {
            return Err(OtaError::Download("bad host or path in the URL"));
        }
        Ok(Url { host, port, path })
    }
}

/// Writes `GET path` asking for the bytes from `from` to the end.
pub fn range_request(out: &mut [u8], url: &Url<'_>, from: u32) -> Option<usize> {
    let mut w = Cursor::new(out);
    write!(
        w,
        "GET {} HTTP/1.1\r\nHost: {}\r\nRange: bytes={from}-\r\nConnection: close\r\nUser-Agent: ironlink-firmware\r\n\r\n",
        url.path, url.host
    )
    .ok()?;
    Some(w.at)
}

/// A response's status line and headers, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Bytes of status line and headers, body excluded.
    pub len: usize,
    /// Offset of the first body byte in the image.
    pub start: u32,
    /// Body length.
    pub body: u32,
}

/// Reads a response head for a request from `from` of an image of `size` bytes; `Ok(None)`
/// until the blank line has arrived. 206 must say `Content-Range: bytes from-...`; 200 (a server
/// that ignores ranges) is accepted only from 0.
pub fn parse_head(buf: &[u8], from: u32, size: u32) -> Result<Option<Head>, OtaError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= 4096 {
            Err(OtaError::Download("response headers longer than 4 KiB"))
        } else {
            Ok(None)
        };
    };
    let text = core::str::from_utf8(&buf[..end])
        .map_err(|_| OtaError::Download("response headers are not text"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(OtaError::Download("no HTTP status line"))?;
    let (mut length, mut start) = (None, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<u32>().ok();
        } else if k.eq_ignore_ascii_case("content-range") {
            start = v
                .strip_prefix("bytes ")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u32>().ok());
        }
    }
    let start = match status {
        206 => start.ok_or(OtaError::Download("206 without Content-Range"))?,
        200 if from == 0 => 0,
        200 => {
            return Err(OtaError::Download(
                "the server ignores ranges: cannot resume",
            ))
        }
        _ => {
            return Err(OtaError::Download(
                "the download URL did not answer 200 or 206",
            ))
        }
    };
    if start != from {
        return Err(OtaError::Download("the server sent another range"));
    }
    let body = length.ok_or(OtaError::Download("no Content-Length"))?;
    if u64::from(start) + u64::from(body) != u64::from(size) {
        return Err(OtaError::Download(
            "the image's length differs from the notice's size",
        ));
    }
    Ok(Some(Head {
        len: end + 4,
        start,
        body,
    }))
}

/// Where a download stands, kept in one erase sector of flash (the journal) so that a reset
/// resumes at the last whole sector written: append-only records of (image id, offset), a
/// record torn by a power cut fails its check and the one before it counts.
#[derive(Debug)]
pub struct Journal<F: NorFlash> {
    flash: F,
}

const RECORD: usize = 16;
const RECORD_MAGIC: u32 = 0x4f54_4131; // "OTA1"

fn record_check(id: u32, offset: u32) -> u32 {
    (id ^ offset.rotate_left(13) ^ RECORD_MAGIC).wrapping_mul(0x9e37_79b1)
}

impl<F: NorFlash> Journal<F> {
    /// A journal on `flash` (one erase sector or more; records of 16 bytes, so `F::WRITE_SIZE`
    /// must divide 16).
    pub fn new(flash: F) -> Self {
        Journal { flash }
    }

    /// The offset to resume image `id` at (0 for another image or none).
    pub fn resume(&mut self, id: u32) -> u32 {
        let mut at = 0;
        let mut last = 0;
        let mut r = [0u8; RECORD];
        while at + RECORD <= self.flash.capacity() {
            if self.flash.read(at as u32, &mut r).is_err() {
                break;
            }
            let word = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            if word(0) != RECORD_MAGIC {
                break;
            }
            if word(12) == record_check(word(4), word(8)) && word(4) == id {
                last = word(8);
            } else if word(12) == record_check(word(4), word(8)) {
                last = 0;
            }
            at += RECORD;
        }
        last
    }

    /// Records that image `id` is written up to `offset` (erasing the sector when full).
    pub fn save(&mut self, id: u32, offset: u32) -> Result<(), OtaError> {
        let mut at = 0;
        let mut r = [0u8; RECORD];
        while at + RECORD <= self.flash.capacity() {
            self.flash
                .read(at as u32, &mut r)
                .map_err(|_| OtaError::Flash)?;
            if r.iter().all(|&b| b == 0xff) {
                break;
            }
            at += RECORD;
        }
        if at + RECORD > self.flash.capacity() {
            self.flash
                .erase(0, self.flash.capacity() as u32)
                .map_err(|_| OtaError::Flash)?;
            at = 0;
        }
        r[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        r[4..8].copy_from_slice(&id.to_le_bytes());
        r[8..12].copy_from_slice(&offset.to_le_bytes());
        r[12..16].copy_from_slice(&record_check(id, offset).to_le_bytes());
        self.flash.write(at as u32, &r).map_err(|_| OtaError::Flash)
    }
}

/// A short id of an image: FNV-1a of its digest, to tell one download's journal from another's.
pub fn image_id(notice: &Notice<'_>) -> u32 {
    notice
        .sign
        .bytes()
        .chain(notice.version.bytes())
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        })
}

/// The image written to the update slot through `embassy-boot`, sector by sector, with the
/// journal advanced after each whole sector.
pub struct Writer<'w, 'd, 'n, DFU: NorFlash, STATE: NorFlash, J: NorFlash> {
    updater: &'w mut BlockingFirmwareUpdater<'d, DFU, STATE>,
    journal: &'w mut Journal<J>,
    notice: Notice<'n>,
    id: u32,
    /// Bytes written to the slot so far.
    written: u32,
    sector: [u8; 256],
    fill: usize,
}

impl<DFU: NorFlash, STATE: NorFlash, J: NorFlash> core::fmt::Debug
    for Writer<'_, '_, '_, DFU, STATE, J>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Writer")
            .field("version", &self.notice.version)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<'w, 'd, 'n, DFU: NorFlash, STATE: NorFlash, J: NorFlash> Writer<'w, 'd, 'n, DFU, STATE, J> {
    /// Starts (or resumes) writing the image a notice describes, refusing a version that is not
    /// newer than `running` and an image larger than the slot. [`Writer::offset`] says where
    /// the download resumes.
    pub fn start(
        updater: &'w mut BlockingFirmwareUpdater<'d, DFU, STATE>,
        journal: &'w mut Journal<J>,
        notice: Notice<'n>,
        running: &str,
        slot_size: u32,
    ) -> Result<Self, OtaError> {
        if !is_newer(notice.version, running) {
            log_warn!(
                "ironlink: update to {} refused: not newer than {}",
                notice.version,
                running
            );
            return Err(OtaError::NotNewer);
        }
        if notice.size > slot_size {
            return Err(OtaError::TooLarge);
        }
        let id = image_id(&notice);
        let mut written = journal.resume(id);
        // Resume at a sector boundary (the sector after it is erased again when written).
        written -= written % DFU::ERASE_SIZE as u32;
        log_info!(
            "ironlink: update to {} from byte {}",
            notice.version,
            written
        );
        Ok(Writer {
            updater,
            journal,
            notice,
            id,
            written: written.min(notice.size),
            sector: [0xff; 256],
            fill: 0,
        })
    }

    /// Where the download continues, bytes into the image.
    pub fn offset(&self) -> u32 {
        self.written + self.fill as u32
    }

    /// The progress step (1 to 99) to report.
    pub fn percent(&self) -> i32 {
        let done = u64::from(self.offset()) * 99 / u64::from(self.notice.size.max(1));
        (done as i32).clamp(1, 99)
    }

    /// Takes the next downloaded bytes (in order from [`Writer::offset`]).
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), OtaError> {
        if u64::from(self.offset()) + data.len() as u64 > u64::from(self.notice.size) {
            return Err(OtaError::Download("more bytes than the notice's size"));
        }
        while !data.is_empty() {
            let n = (self.sector.len() - self.fill).min(data.len());
            self.sector[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == self.sector.len() {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), OtaError> {
        if self.fill == 0 {
            return Ok(());
        }
        // The last piece is padded to the flash's write size with erased bytes.
        let w = DFU::WRITE_SIZE.max(1);
        let len = self.fill.div_ceil(w) * w;
        let cap = self.sector.len();
        self.sector[self.fill..len.min(cap)].fill(0xff);
        self.updater
            .write_firmware(self.written as usize, &self.sector[..len])
            .map_err(|_| OtaError::Flash)?;
        let before = self.written;
        self.written += self.fill as u32;
        self.fill = 0;
        let erase = DFU::ERASE_SIZE as u32;
        if self.written / erase != before / erase || self.written == self.notice.size {
            self.journal
                .save(self.id, self.written - self.written % erase)?;
        }
        Ok(())
    }

    /// After the last byte: checks the digest against the notice and the signature against
    /// `public_key`, then marks the slot for the swap at the next boot.
    pub fn finish(mut self, public_key: &[u8; 32]) -> Result<(), OtaError> {
        self.flush()?;
        if self.written != self.notice.size {
            return Err(OtaError::Download(
                "the download ended before the image did",
            ));
        }
        let mut want = [0u8; 32];
        let mut got = [0u8; 32];
        let mut chunk = [0u8; 64];
        match self.notice.sign_method {
            SignMethod::Sha256 => {
                hex_into(self.notice.sign, &mut want).ok_or(OtaError::DigestMismatch)?;
                self.updater
                    .hash::<sha2::Sha256>(self.written, &mut chunk, &mut got)?;
            }
            SignMethod::Md5 => {
                hex_into(self.notice.sign, &mut want[..16]).ok_or(OtaError::DigestMismatch)?;
                self.updater
                    .hash::<md5::Md5>(self.written, &mut chunk, &mut got[..16])?;
            }
        }
        if want != got {
            log_warn!(
                "ironlink: update to {}: digest mismatch",
                self.notice.version
            );
            return Err(OtaError::DigestMismatch);
        }
        let signature = self.notice.signature.ok_or(OtaError::BadSignature)?;
        if let Err(e) = self
            .updater
            .verify_and_mark_updated(public_key, &signature, self.written)
        {
            log_warn!(
                "ironlink: update to {}: signature refused",
                self.notice.version
            );
            return Err(e.into());
        }
        log_info!(
            "ironlink: update to {} verified, swapped at the next boot",
            self.notice.version
        );
        Ok(())
    }
}

/// Downloads the rest of the image from `url` over `io` (a fresh connection to its server)
/// into `w`, from [`Writer::offset`]: one range request, then the body as it arrives.
/// `progress` is awaited with the step (1 to 99) each time it passes a tenth, so the caller can
/// report it. Returns the bytes received; then call [`Writer::finish`].
#[cfg(feature = "embassy")]
pub async fn fetch<T, DFU, STATE, J, P>(
    io: &mut T,
    url: &Url<'_>,
    w: &mut Writer<'_, '_, '_, DFU, STATE, J>,
    mut progress: P,
) -> Result<u32, OtaError>
where
    T: embedded_io_async::Read + embedded_io_async::Write,
    DFU: NorFlash,
    STATE: NorFlash,
    J: NorFlash,
    P: AsyncFnMut(i32),
{
    let failed = |_| OtaError::Download("the download connection failed");
    let from = w.offset();
    let mut buf = [0u8; 1024];
    let n = range_request(&mut buf, url, from).ok_or(OtaError::Download("the URL is too long"))?;
    io.write_all(&buf[..n]).await.map_err(failed)?;
    io.flush().await.map_err(failed)?;
    let mut have = 0;
    let (head, mut got) = loop {
        if have == buf.len() {
            return Err(OtaError::Download("response headers longer than 1 KiB"));
        }
        let n = io.read(&mut buf[have..]).await.map_err(failed)?;
        if n == 0 {
            return Err(OtaError::Download("the server closed before answering"));
        }
        have += n;
        if let Some(h) = parse_head(&buf[..have], from, w.notice.size)? {
            w.push(&buf[h.len..have])?;
            break (h, (have - h.len) as u32);
        }
    };
    let mut tenth = w.percent() / 10;
    while got < head.body {
        let n = io.read(&mut buf).await.map_err(failed)?;
        if n == 0 {
            return Err(OtaError::Download(
                "the connection closed before the image ended",
            ));
        }
        let n = n.min((head.body - got) as usize);
        w.push(&buf[..n])?;
        got += n as u32;
        if w.percent() / 10 != tenth {
            tenth = w.percent() / 10;
            progress(w.percent()).await;
        }
    }
    Ok(got)
}

/// After boot: what the bootloader did, for the application to confirm a new image
/// ([`BlockingFirmwareUpdater::mark_booted`] after its own checks) or report a rollback.
pub fn boot_state<DFU: NorFlash, STATE: NorFlash>(
    updater: &mut BlockingFirmwareUpdater<'_, DFU, STATE>,
) -> Result<State, OtaError> {
    Ok(updater.get_state()?)
}

/// A NOR flash in memory that can lose power: writes only clear bits, erases set them, and
/// after its operation budget runs out the next write or erase is half done and every later
/// one fails, as on a board whose supply is cut. For the SDK's tests (host and Cortex-M).
#[cfg(any(test, feature = "selftest"))]
pub mod sim {
    use core::cell::Cell;
    use embedded_storage::nor_flash::{
        ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
    };

    /// The power supply shared by the partitions of one board: operations left before the cut.
    #[derive(Debug)]
    pub struct Power {
        left: Cell<u32>,
        ops: Cell<u32>,
    }

    impl Power {
        /// Power that never fails.
        pub const fn on() -> Self {
            Power {
                left: Cell::new(u32::MAX),
                ops: Cell::new(0),
            }
        }

        /// The supply is cut during the operation after the next `n`.
        pub fn cut_after(&self, n: u32) {
            self.left.set(n);
            self.ops.set(0);
        }

        /// Power is back (a reboot).
        pub fn restore(&self) {
            self.left.set(u32::MAX);
        }

        /// Writes and erases done since the last `cut_after`.
        pub fn ops(&self) -> u32 {
            self.ops.get()
        }

        /// Whether the supply was cut.
        pub fn is_cut(&self) -> bool {
            self.left.get() == 0
        }

        /// `Some(true)`: do the whole operation; `Some(false)`: do half of it, then fail.
        fn take(&self) -> Option<bool> {
            match self.left.get() {
                0 => None,
                u32::MAX => {
                    self.ops.set(self.ops.get() + 1);
                    Some(true)
                }
                n => {
                    self.ops.set(self.ops.get() + 1);
                    self.left.set(n - 1);
                    Some(n > 1)
                }
            }
        }
    }

    /// The operation failed: the power was cut, or the range was outside the flash.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Cut(NorFlashErrorKind);

    impl NorFlashError for Cut {
        fn kind(&self) -> NorFlashErrorKind {
            self.0
        }
    }

    /// A partition over the bytes `M` (an array, or a borrowed one), erase sectors of `E`,
    /// writes of `W`.
    #[derive(Debug)]
    pub struct SimFlash<'p, M, const E: usize, const W: usize> {
        /// The bytes.
        pub mem: M,
        power: &'p Power,
    }

    impl<'p, M: AsRef<[u8]> + AsMut<[u8]>, const E: usize, const W: usize> SimFlash<'p, M, E, W> {
        /// A partition over `mem`, erased, on `power`.
        pub fn with(mut mem: M, power: &'p Power) -> Self {
            mem.as_mut().fill(0xff);
            SimFlash { mem, power }
        }

        fn range(
            &self,
            offset: u32,
            len: usize,
            align: usize,
        ) -> Result<core::ops::Range<usize>, Cut> {
            let start = offset as usize;
            if !start.is_multiple_of(align)
                || !len.is_multiple_of(align)
                || start + len > self.mem.as_ref().len()
            {
                return Err(Cut(NorFlashErrorKind::NotAligned));
            }
            Ok(start..start + len)
        }
    }

    impl<M, const E: usize, const W: usize> ErrorType for SimFlash<'_, M, E, W> {
        type Error = Cut;
    }

    impl<M: AsRef<[u8]> + AsMut<[u8]>, const E: usize, const W: usize> ReadNorFlash
        for SimFlash<'_, M, E, W>
    {
        const READ_SIZE: usize = 1;

        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Cut> {
            let r = self.range(offset, bytes.len(), 1)?;
            bytes.copy_from_slice(&self.mem.as_ref()[r]);
            Ok(())
        }

        fn capacity(&self) -> usize {
            self.mem.as_ref().len()
        }
    }

    impl<M: AsRef<[u8]> + AsMut<[u8]>, const E: usize, const W: usize> NorFlash
        for SimFlash<'_, M, E, W>
    {
        const WRITE_SIZE: usize = W;
        const ERASE_SIZE: usize = E;

        fn erase(&mut self, from: u32, to: u32) -> Result<(), Cut> {
            let r = self.range(from, (to.saturating_sub(from)) as usize, E)?;
            let whole = self.power.take().ok_or(Cut(NorFlashErrorKind::Other))?;
            let end = if whole { r.end } else { r.start + r.len() / 2 };
            self.mem.as_mut()[r.start..end].fill(0xff);
            if whole {
                Ok(())
            } else {
                Err(Cut(NorFlashErrorKind::Other))
            }
        }

        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Cut> {
            let r = self.range(offset, bytes.len(), W)?;
            let whole = self.power.take().ok_or(Cut(NorFlashErrorKind::Other))?;
            let n = if whole { bytes.len() } else { bytes.len() / 2 };
            for (m, b) in self.mem.as_mut()[r].iter_mut().zip(&bytes[..n]) {
                *m &= *b;
            }
            if whole {
                Ok(())
            } else {
                Err(Cut(NorFlashErrorKind::Other))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sim::{Power, SimFlash};
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use embassy_boot::{BootLoader, BootLoaderConfig, FirmwareUpdaterConfig};
    use sha2::Digest;

    const PAGE: usize = 1024;
    type Active<'p> = SimFlash<'p, [u8; 8 * PAGE], PAGE, 4>;
    type Dfu<'p> = SimFlash<'p, [u8; 9 * PAGE], PAGE, 4>;
    type St<'p> = SimFlash<'p, [u8; PAGE], PAGE, 4>;
    type Jr<'p> = SimFlash<'p, [u8; 256], 256, 4>;

    fn image(version: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ version)
            .collect()
    }

    fn notice_json(img: &[u8], version: &str, key: &SigningKey, sha: Option<&str>) -> String {
        let sha256 = hex(&sha2::Sha256::digest(img));
        let sig = key.sign(&sha2::Sha512::digest(img)).to_bytes();
        format!(
            r#"{{"code":"1000","data":{{"size":{},"sign":"{}","version":"{version}","url":"http://192.168.69.1:8080/fw.bin","signMethod":"SHA256","md5":"x","module":"MCU","ed25519":"{}"}},"id":1,"message":"success"}}"#,
            img.len(),
            sha.unwrap_or(&sha256),
            hex(&sig)
        )
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    struct Board<'p> {
        active: Active<'p>,
        dfu: Dfu<'p>,
        state: St<'p>,
        journal: Jr<'p>,
    }

    impl<'p> Board<'p> {
        fn new(power: &'p Power, running: &[u8]) -> Self {
            let mut b = Board {
                active: SimFlash::with([0; 8 * PAGE], power),
                dfu: SimFlash::with([0; 9 * PAGE], power),
                state: SimFlash::with([0; PAGE], power),
                journal: SimFlash::with([0; 256], power),
            };
            b.active.mem[..running.len()].copy_from_slice(running);
            b
        }

        /// Downloads `img` in pieces of `piece` bytes from where the journal says; returns
        /// that offset.
        fn download(
            &mut self,
            payload: &[u8],
            img: &[u8],
            key: &SigningKey,
            piece: usize,
        ) -> Result<usize, OtaError> {
            let notice = Notice::parse(payload)?;
            let mut aligned = [0u8; 4];
            let mut up = BlockingFirmwareUpdater::new(
                FirmwareUpdaterConfig {
                    dfu: &mut self.dfu,
                    state: &mut self.state,
                },
                &mut aligned,
            );
            let mut journal = Journal::new(&mut self.journal);
            let mut w = Writer::start(&mut up, &mut journal, notice, "1.0.0", (8 * PAGE) as u32)?;
            let from = w.offset() as usize;
            for chunk in img[from..].chunks(piece) {
                w.push(chunk)?;
            }
            w.finish(key.verifying_key().as_bytes())?;
            Ok(from)
        }

        fn boot(&mut self) -> Result<State, embassy_boot::BootError> {
            let mut aligned = [0u8; PAGE];
            BootLoader::new(BootLoaderConfig {
                active: &mut self.active,
                dfu: &mut self.dfu,
                state: &mut self.state,
            })
            .prepare_boot(&mut aligned)
        }

        fn confirm(&mut self) {
            let mut aligned = [0u8; 4];
            let mut up = BlockingFirmwareUpdater::new(
                FirmwareUpdaterConfig {
                    dfu: &mut self.dfu,
                    state: &mut self.state,
                },
                &mut aligned,
            );
            assert_eq!(up.get_state().unwrap(), State::Swap);
            up.mark_booted().unwrap();
        }

        fn running(&self, len: usize) -> &[u8] {
            &self.active.mem[..len]
        }
    }

    #[test]
    fn notices_progress_and_http_heads() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let img = image(2, 3000);
        let p = notice_json(&img, "1.2.0", &key, None);
        let n = Notice::parse(p.as_bytes()).unwrap();
        assert_eq!(
            (n.version, n.size, n.module, n.sign_method),
            ("1.2.0", 3000, "MCU", SignMethod::Sha256)
        );
        assert!(n.signature.is_some());
        let pulled = br#"{"id":"9","code":200,"data":{"size":10,"version":"2","url":"http://h/f","sign":"0123456789abcdef0123456789abcdef","signMethod":"Md5"}}"#;
        let n = Notice::parse(pulled).unwrap();
        assert_eq!(
            (n.sign_method, n.module, n.signature),
            (SignMethod::Md5, "default", None)
        );
        assert!(matches!(
            Notice::parse(
                br#"{"data":{"size":1,"version":"2","url":"u","sign":"zz","signMethod":"SHA256"}}"#
            ),
            Err(OtaError::BadNotice(_))
        ));
        assert!(matches!(Notice::parse(b"{"), Err(OtaError::BadNotice(_))));
        assert!(
            is_newer("1.10.0", "1.9.3")
                && !is_newer("1.0.0", "1.0.0")
                && !is_newer("0.9", "1.0")
                && is_newer("1.0.1", "1.0")
        );
        let mut out = [0u8; 160];
        let k = progress(&mut out, 3, -2, "download \"failed\"", "MCU").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[..k]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"3","params":{"step":"-2","desc":"download \"failed\"","module":"MCU"}})
        );
        let k = inform(&mut out, 4, "1.0.0", "default").unwrap();
        assert_eq!(&out[..k], br#"{"id":"4","params":{"version":"1.0.0"}}"#);
        let k = firmware_get(&mut out, 5, "").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[..k]).unwrap();
        assert_eq!(v["method"], "thing.ota.firmware.get");
        let u = Url::parse("http://192.168.69.1:8080/fw.bin?t=abc").unwrap();
        assert_eq!(
            (u.host, u.port, u.path),
            ("192.168.69.1", 8080, "/fw.bin?t=abc")
        );
        assert!(Url::parse("https://h/f").is_err());
        let k = range_request(&mut out, &u, 2048).unwrap();
        assert!(core::str::from_utf8(&out[..k])
            .unwrap()
            .contains("Range: bytes=2048-\r\n"));
        let head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2048-2999/3000\r\nContent-Length: 952\r\n\r\nBODY";
        assert_eq!(
            parse_head(head, 2048, 3000).unwrap(),
            Some(Head {
                len: head.len() - 4,
                start: 2048,
                body: 952
            })
        );
        assert_eq!(parse_head(&head[..20], 2048, 3000).unwrap(), None);
        assert!(parse_head(head, 0, 3000).is_err(), "another range");
        assert!(parse_head(head, 2048, 4000).is_err(), "another size");
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n", 0, 3000)
                .unwrap()
                .is_some()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n", 10, 3000).is_err());
        assert!(parse_head(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            0,
            3000
        )
        .is_err());
    }

    #[test]
    fn an_update_swaps_confirms_and_a_bad_one_is_refused() {
        let power = Power::on();
        let key = SigningKey::from_bytes(&[7; 32]);
        let old = image(1, 8 * PAGE);
        let new = image(2, 7 * PAGE + 100);
        let mut b = Board::new(&power, &old);
        // Refused: not newer, wrong digest, wrong signer, truncated, and more bytes than announced.
        let p = notice_json(&new, "1.0.0", &key, None);
        assert_eq!(
            b.download(p.as_bytes(), &new, &key, 700),
            Err(OtaError::NotNewer)
        );
        let p = notice_json(&new, "1.1.0", &key, Some(&"0".repeat(64)));
        assert_eq!(
            b.download(p.as_bytes(), &new, &key, 700),
            Err(OtaError::DigestMismatch)
        );
        let p = notice_json(&new, "1.1.0", &SigningKey::from_bytes(&[8; 32]), None);
        assert_eq!(
            b.download(p.as_bytes(), &new, &key, 700),
            Err(OtaError::BadSignature)
        );
        let p = notice_json(&new, "1.1.1", &key, None);
        assert!(matches!(
            b.download(p.as_bytes(), &new[..5000], &key, 700),
            Err(OtaError::Download(_))
        ));
        let mut longer = new.clone();
        longer.push(0);
        assert!(matches!(
            b.download(p.as_bytes(), &longer, &key, 700),
            Err(OtaError::Download(_))
        ));
        assert_eq!(
            b.boot().unwrap(),
            State::Boot,
            "nothing refused is ever swapped in"
        );
        assert_eq!(b.running(old.len()), &old[..]);
        // Accepted: swapped at the next boot, kept once confirmed.
        let p = notice_json(&new, "1.1.0", &key, None);
        b.download(p.as_bytes(), &new, &key, 700).unwrap();
        assert_eq!(b.boot().unwrap(), State::Swap);
        assert_eq!(b.running(new.len()), &new[..]);
        b.confirm();
        assert_eq!(b.boot().unwrap(), State::Boot);
        assert_eq!(b.running(new.len()), &new[..]);
    }

    #[test]
    fn an_unconfirmed_image_is_rolled_back() {
        let power = Power::on();
        let key = SigningKey::from_bytes(&[7; 32]);
        let old = image(1, 8 * PAGE);
        let new = image(2, 6 * PAGE);
        let mut b = Board::new(&power, &old);
        b.download(
            notice_json(&new, "2.0.0", &key, None).as_bytes(),
            &new,
            &key,
            512,
        )
        .unwrap();
        assert_eq!(b.boot().unwrap(), State::Swap);
        // The new image crashed before confirming: the next boot brings the old one back.
        assert_eq!(b.boot().unwrap(), State::Swap);
        assert_eq!(b.running(old.len()), &old[..]);
        let mut aligned = [0u8; 4];
        let mut up = BlockingFirmwareUpdater::new(
            FirmwareUpdaterConfig {
                dfu: &mut b.dfu,
                state: &mut b.state,
            },
            &mut aligned,
        );
        assert_eq!(
            boot_state(&mut up).unwrap(),
            State::Revert,
            "the application can report the rollback"
        );
    }

    /// A download cut by a power loss at every single flash operation resumes from the journal
    /// and ends with the right image (digest and signature checked).
    #[test]
    fn downloads_resume_after_a_power_cut_at_every_write() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let old = image(1, 8 * PAGE);
        let new = image(3, 5 * PAGE + 333);
        let p = notice_json(&new, "1.5.0", &key, None);
        let mut k = 0;
        let mut furthest = 0;
        loop {
            let power = Power::on();
            let mut b = Board::new(&power, &old);
            power.cut_after(k);
            let first = b.download(p.as_bytes(), &new, &key, 300);
            if first.is_ok() {
                break; // no cut happened: every cut point was tried
            }
            assert!(power.is_cut(), "cut {k}: {first:?}");
            power.restore();
            let from = b
                .download(p.as_bytes(), &new, &key, 300)
                .unwrap_or_else(|e| panic!("resume after cut {k}: {e:?}"));
            assert_eq!(from % PAGE, 0, "cut {k}: resumed at a sector boundary");
            furthest = furthest.max(from);
            assert_eq!(b.boot().unwrap(), State::Swap, "cut {k}");
            assert_eq!(b.running(new.len()), &new[..], "cut {k}");
            k += 1;
        }
        assert!(k > 20, "{k} cut points");
        assert_eq!(
            furthest,
            5 * PAGE,
            "late cuts resume from the last whole sector, not from 0"
        );
    }

    /// The swap itself cut at every single flash write: the board always boots a whole image,
    /// the old or the new one, never a mix.
    #[test]
    fn every_prefix_of_the_swap_boots_a_whole_image() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let old = image(1, 8 * PAGE);
        let new = image(4, 8 * PAGE);
        let (mut saw_new, mut saw_old) = (0, 0);
        let mut k = 0;
        loop {
            let power = Power::on();
            let mut b = Board::new(&power, &old);
            b.download(
                notice_json(&new, "3.0.0", &key, None).as_bytes(),
                &new,
                &key,
                1024,
            )
            .unwrap();
            power.cut_after(k);
            let r = b.boot();
            if r.is_ok() {
                assert_eq!(b.running(new.len()), &new[..]);
                break;
            }
            power.restore();
            b.boot()
                .unwrap_or_else(|e| panic!("boot after cut {k}: {e:?}"));
            let now = b.running(old.len());
            if now == &new[..] {
                saw_new += 1;
            } else {
                assert_eq!(now, &old[..], "cut {k}: neither image");
                saw_old += 1;
            }
            k += 1;
        }
        assert!(k > 30, "{k} cut points");
        assert!(saw_new > 0, "{saw_new} new, {saw_old} old");
    }
}
