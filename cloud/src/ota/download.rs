//! Image downloads: `GET /ota/download/{token}` with HTTP Range requests (so an interrupted
//! download resumes), served only while the job the token was issued for is open, and paced
//! by the campaign's bandwidth limit.
//!
//! A token names a campaign, a device and an expiry, and carries an HMAC-SHA256 over them
//! (128 bits kept) with a key stored in the database: a URL copied from one device's notice
//! serves that device's job only, stops when the job ends, and stops at its expiry.

use super::plan::JobState;
use super::{Ota, OtaError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; 32], claims: &str) -> [u8; 16] {
    // HMAC pads a key shorter than the hash's block with zeros; padding it here makes the
    // key a fixed-size array, so making the MAC cannot fail.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut m = <HmacSha256 as hmac::digest::KeyInit>::new(&block.into());
    m.update(claims.as_bytes());
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A token for `device`'s job in `campaign`, valid until `expires` (ms since the epoch).
pub fn mint(key: &[u8; 32], campaign: &str, device: &str, expires: i64) -> String {
    let claims = format!("{expires}:{campaign}:{device}");
    format!(
        "{}.{}",
        B64.encode(claims.as_bytes()),
        B64.encode(mac(key, &claims))
    )
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Campaign.
    pub campaign: String,
    /// Device name (in the campaign's product).
    pub device: String,
    /// Expiry, ms since the epoch.
    pub expires: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token, or not one of ours.
    #[error("the download link is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the download link expired; the device gets a new one with its next notice")]
    Expired,
}

/// Checks a token at `now`.
pub fn verify(key: &[u8; 32], token: &str, now: i64) -> Result<Claims, TokenError> {
    let (claims_b64, mac_b64) = token.split_once('.').ok_or(TokenError::Invalid)?;
    let claims = B64
        .decode(claims_b64)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(TokenError::Invalid)?;
    let given = B64.decode(mac_b64).map_err(|_| TokenError::Invalid)?;
    let want = mac(key, &claims);
    if !ironlink_shared::sign::constant_eq(&given, &want) {
        return Err(TokenError::Invalid);
    }
    let mut parts = claims.splitn(3, ':');
    let expires: i64 = parts
        .next()
        .and_then(|e| e.parse().ok())
        .ok_or(TokenError::Invalid)?;
    let campaign = parts.next().ok_or(TokenError::Invalid)?.to_owned();
    let device = parts.next().ok_or(TokenError::Invalid)?.to_owned();
    if now >= expires {
        return Err(TokenError::Expired);
    }
    Ok(Claims {
        campaign,
        device,
        expires,
    })
}

/// Paces a campaign's downloads: a token bucket of bytes shared by all its downloads, one
/// second deep.
#[derive(Debug)]
pub struct Limiter {
    rate: u64,
    state: Mutex<(f64, tokio::time::Instant)>,
}

impl Limiter {
    /// A limiter of `rate` bytes per second.
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            state: Mutex::new((0.0, tokio::time::Instant::now())),
        }
    }

    /// Waits until `n` bytes may go.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = tokio::time::Instant::now();
            let rate = self.rate as f64;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(rate);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-s.0 / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A range of bytes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
}

/// Reads a `Range` header against an image of `size` bytes: `Ok(None)` for the whole image
/// (no header, or one we do not take: several ranges or another unit, which RFC 9110 lets a
/// server ignore), `Err(())` when it cannot be satisfied (416).
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<Span>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let span = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        Span {
            start: size.saturating_sub(n),
            end: size - 1,
        }
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        Span { start, end }
    };
    Ok(Some(span))
}

/// An opened download.
#[derive(Debug)]
pub struct Download {
    /// The image file.
    pub file: tokio::fs::File,
    /// Image size.
    pub size: u64,
    /// SHA-256, the entity tag.
    pub sha256: String,
    /// File name to show.
    pub file_name: String,
    /// The campaign's pace, if limited.
    pub limiter: Option<Arc<Limiter>>,
}

/// Why a download is refused.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Bad or expired token (403).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The job is over or gone (403).
    #[error("{0}")]
    Closed(String),
    /// Storage failed (503).
    #[error(transparent)]
    Ota(#[from] OtaError),
}

impl Ota {
    /// Opens the image a token grants, moving a notified job to downloading.
    pub async fn open_download(&self, token: &str, now: i64) -> Result<Download, DownloadError> {
        let claims = verify(&self.token_key, token, now)?;
        let job = self
            .db
            .get_job(&claims.campaign, &claims.device)
            .await
            .map_err(OtaError::from)?
            .ok_or_else(|| DownloadError::Closed("no upgrade is open for this link".into()))?;
        let state = job.job_state();
        // A queued job is one whose notice is being renewed: the device may still hold the
        // link of its previous attempt, which serves until the job ends or the link expires.
        if state.is_final() {
            return Err(DownloadError::Closed(format!(
                "the upgrade this link was issued for is {}",
                state.as_str()
            )));
        }
        let live = self
            .live_of(&claims.campaign)
            .await
            .map_err(OtaError::from)?
            .ok_or_else(|| DownloadError::Closed("the campaign is gone".into()))?;
        if state == JobState::Notified {
            let change = super::store::Change {
                from: &[JobState::Notified],
                attempt: Some(job.attempt),
                to: JobState::Downloading,
                step: None,
                detail: "download started".into(),
                deadline: Some(now + live.policy.timeout.as_millis() as i64),
                retry: false,
            };
            if let Some(j) = self
                .db
                .move_job(&claims.campaign, &claims.device, &change, now)
                .await
                .map_err(OtaError::from)?
            {
                self.announce(Some(&live), &j, "download started", now)
                    .await;
            }
        }
        let file = tokio::fs::File::open(self.package_path(&live.package.id))
            .await
            .map_err(OtaError::from)?;
        let limiter = live.policy.download_bytes_per_second.map(|rate| {
            self.limiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(live.row.id.clone())
                .or_insert_with(|| Arc::new(Limiter::new(rate)))
                .clone()
        });
        Ok(Download {
            file,
            size: u64::try_from(live.package.size).unwrap_or(0),
            sha256: live.package.sha256.clone(),
            file_name: live.package.file_name.clone(),
            limiter,
        })
    }

    /// Counts bytes served.
    pub fn served(&self, n: usize) {
        self.metrics
            .ota_download_bytes
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the pacing of campaigns that are over.
    pub(super) fn drop_limiters(&self, keep: &std::collections::HashSet<String>) {
        self.limiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_campaign_device_and_expiry() {
        let key = [7u8; 32];
        let t = mint(&key, "cmp-1", "dev:1", 1_000);
        let c = verify(&key, &t, 999).unwrap();
        assert_eq!(
            c,
            Claims {
                campaign: "cmp-1".into(),
                device: "dev:1".into(),
                expires: 1_000
            }
        );
        assert_eq!(verify(&key, &t, 1_000), Err(TokenError::Expired));
        assert_eq!(verify(&[8u8; 32], &t, 0), Err(TokenError::Invalid));
        // Another device's claims under this token's MAC.
        let (_, m) = t.split_once('.').unwrap();
        let forged = format!("{}.{m}", B64.encode("1000:cmp-1:dev-2"));
        assert_eq!(verify(&key, &forged, 0), Err(TokenError::Invalid));
        let later = format!("{}.{m}", B64.encode("9999:cmp-1:dev:1"));
        assert_eq!(verify(&key, &later, 0), Err(TokenError::Invalid));
        for junk in ["", ".", "a.b", "%%%.%%%", &t[..t.len() - 2]] {
            assert_eq!(verify(&key, junk, 0), Err(TokenError::Invalid), "{junk}");
        }
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        let s = |start, end| Ok(Some(Span { start, end }));
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-9"), 100), s(0, 9));
        assert_eq!(parse_range(Some("bytes=90-"), 100), s(90, 99));
        assert_eq!(parse_range(Some("bytes=90-500"), 100), s(90, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), s(90, 99));
        assert_eq!(parse_range(Some("bytes=-500"), 100), s(0, 99));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=5-2"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=-0"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=x-"), 100), Err(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_paces_bytes() {
        let l = Limiter::new(1_000);
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            l.take(500).await;
        }
        let took = t0.elapsed().as_secs_f64();
        assert!((4.9..=5.1).contains(&took), "{took}");
    }
}
