//! What a campaign may do now, decided without I/O and without reading the clock: its policy,
//! the pacing of notices (a token bucket whose rate may ramp up), schedule windows, canary
//! gating, the abort threshold, and how a device's progress report moves its job. The
//! scheduler ([`super::scheduler`]) feeds these functions what it read from the database and
//! `now`; the tests feed them a simulated clock.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a campaign runs. Every field has a default; see each for its unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
// Storage has a `Policy` too: each needs its own name in the OpenAPI document.
#[schema(as = CampaignPolicy)]
pub struct Policy {
    /// Notices sent per minute at most (the steady rate, 1..=1,000,000).
    pub pushes_per_minute: u32,
    /// Start slower and grow while the failure rate stays low.
    pub ramp: Option<Ramp>,
    /// Devices being upgraded at once at most (notified, downloading, verifying, flashing).
    pub max_concurrent: u32,
    /// How long a device may stay silent after a notice or a progress report before its
    /// attempt counts as timed out, e.g. `"30m"`.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "30m")]
    pub timeout: Duration,
    /// Further attempts after a timeout or a retryable failure (-1, -2).
    pub retries: u32,
    /// Abort when failed / finished exceeds this share (0..=1) once `abort_min_finished`
    /// devices have finished; absent to never abort.
    pub abort_failure_rate: Option<f64>,
    /// Finished devices needed before the abort threshold is looked at.
    pub abort_min_finished: u32,
    /// Times of day when notices may go out (`[{"from": "01:00", "to": "05:00"}]`, local to
    /// `utc_offset`; a window may pass midnight); empty for any time.
    pub windows: Vec<Window>,
    /// Offset of the windows' local time from UTC, `+08:00` or `-05:30`.
    #[schema(example = "+08:00")]
    pub utc_offset: String,
    /// A first stage that must succeed before any other device is notified.
    pub canary: Option<Canary>,
    /// Download bandwidth of the whole campaign, bytes per second; absent for no limit.
    pub download_bytes_per_second: Option<u64>,
    /// How long a download URL stays valid after its notice, e.g. `"24h"`.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "24h")]
    pub token_ttl: Duration,
    /// Keep the campaign running this long after its start, picking up devices that come
    /// online or start to match; absent to finish once every targeted device has finished.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "7d")]
    pub run_for: Option<Duration>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            pushes_per_minute: 10_000,
            ramp: None,
            max_concurrent: 10_000,
            timeout: Duration::from_secs(30 * 60),
            retries: 2,
            abort_failure_rate: None,
            abort_min_finished: 10,
            windows: Vec::new(),
            utc_offset: "+00:00".into(),
            canary: None,
            download_bytes_per_second: None,
            token_ttl: Duration::from_secs(24 * 3600),
            run_for: None,
        }
    }
}

/// A rate that starts low and grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Ramp {
    /// Notices per minute at the start.
    pub start_per_minute: u32,
    /// The rate is multiplied by this (> 1) at each step, up to `pushes_per_minute`.
    pub factor: f64,
    /// Time between steps, e.g. `"1m"`.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "1m")]
    pub every: Duration,
    /// The rate grows only while failed / finished stays at or below this share.
    pub max_failure_rate: f64,
}

impl Default for Ramp {
    fn default() -> Self {
        Self {
            start_per_minute: 100,
            factor: 2.0,
            every: Duration::from_secs(60),
            max_failure_rate: 0.05,
        }
    }
}

/// A time-of-day window, `HH:MM` to `HH:MM` (the end excluded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, `HH:MM`.
    #[schema(example = "01:00")]
    pub from: String,
    /// End, `HH:MM`; before `from` when the window passes midnight.
    #[schema(example = "05:00")]
    pub to: String,
}

/// The canary stage: these devices first; the rest only when enough of them succeeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Canary {
    /// Devices (names within the package's product) that form the canary stage.
    pub devices: Vec<String>,
    /// Or: this many targeted devices, picked by the campaign's hash order.
    pub count: u32,
    /// Share (0..=1) of canaries that must succeed; below it the campaign aborts.
    pub success_rate: f64,
}

impl Default for Canary {
    fn default() -> Self {
        Self {
            devices: Vec::new(),
            count: 0,
            success_rate: 1.0,
        }
    }
}

/// Minutes of `HH:MM`.
fn minutes(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

/// Minutes east of UTC of `+HH:MM` / `-HH:MM`.
fn offset_minutes(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let m = i64::from(minutes(rest)?);
    (m <= 14 * 60).then_some(sign * m)
}

fn share(x: f64) -> bool {
    (0.0..=1.0).contains(&x)
}

impl Policy {
    /// Checks the values, naming the first wrong one.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.pushes_per_minute) {
            return Err("policy.pushes_per_minute must be 1..=1000000".into());
        }
        if self.max_concurrent == 0 {
            return Err("policy.max_concurrent must be at least 1".into());
        }
        if self.timeout < Duration::from_secs(1) {
            return Err("policy.timeout must be at least 1s".into());
        }
        if self.token_ttl < self.timeout {
            return Err("policy.token_ttl must be at least policy.timeout (a download URL must outlive the attempt it serves)".into());
        }
        if self.retries > 100 {
            return Err("policy.retries must be at most 100".into());
        }
        if let Some(r) = self.abort_failure_rate.filter(|r| !share(*r)) {
            return Err(format!(
                "policy.abort_failure_rate {r} must be between 0 and 1"
            ));
        }
        if let Some(r) = &self.ramp {
            if r.start_per_minute == 0 || r.start_per_minute > self.pushes_per_minute {
                return Err(
                    "policy.ramp.start_per_minute must be 1..=policy.pushes_per_minute".into(),
                );
            }
            if !(r.factor > 1.0 && r.factor <= 100.0) {
                return Err("policy.ramp.factor must be above 1 and at most 100".into());
            }
            if r.every < Duration::from_secs(1) {
                return Err("policy.ramp.every must be at least 1s".into());
            }
            if !share(r.max_failure_rate) {
                return Err("policy.ramp.max_failure_rate must be between 0 and 1".into());
            }
        }
        for (i, w) in self.windows.iter().enumerate() {
            for (name, v) in [("from", &w.from), ("to", &w.to)] {
                if minutes(v).is_none() {
                    return Err(format!(
                        "policy.windows[{i}].{name} `{v}` is not a time of day HH:MM"
                    ));
                }
            }
            if w.from == w.to {
                return Err(format!("policy.windows[{i}] is empty (from = to)"));
            }
        }
        if offset_minutes(&self.utc_offset).is_none() {
            return Err(format!(
                "policy.utc_offset `{}` must be +HH:MM or -HH:MM (at most 14:00)",
                self.utc_offset
            ));
        }
        if let Some(c) = &self.canary {
            if !share(c.success_rate) {
                return Err("policy.canary.success_rate must be between 0 and 1".into());
            }
            if c.devices.is_empty() && c.count == 0 {
                return Err("policy.canary needs devices or a count".into());
            }
        }
        if self.download_bytes_per_second == Some(0) {
            return Err("policy.download_bytes_per_second must be at least 1".into());
        }
        Ok(())
    }

    /// Whether notices may go out at `now` (ms since the Unix epoch) by the windows.
    pub fn in_window(&self, now: i64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let offset = offset_minutes(&self.utc_offset).unwrap_or(0);
        let local = (now.div_euclid(60_000) + offset).rem_euclid(1440) as u32;
        self.windows.iter().any(|w| {
            let (Some(from), Some(to)) = (minutes(&w.from), minutes(&w.to)) else {
                return false;
            };
            if from < to {
                (from..to).contains(&local)
            } else {
                local >= from || local < to
            }
        })
    }

    /// The rate a campaign starts at, per minute.
    pub fn start_rate(&self) -> f64 {
        f64::from(
            self.ramp
                .as_ref()
                .map_or(self.pushes_per_minute, |r| r.start_per_minute),
        )
    }
}

/// Paces notices: a token bucket holding at most one second of the current rate (at least
/// one notice), refilled continuously; with a ramp, the rate grows step by step. The rate
/// and the last step are kept with the campaign so a restart resumes the ramp; the tokens
/// are not (a restart starts with an empty bucket, never with a burst).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pacer {
    /// Current rate, notices per minute.
    pub rate: f64,
    /// When the rate last changed (or the campaign started), ms.
    pub ramped_at: i64,
    #[serde(skip)]
    tokens: f64,
    #[serde(skip)]
    last: Option<i64>,
}

impl Pacer {
    /// A pacer starting at `now`.
    pub fn new(policy: &Policy, now: i64) -> Self {
        Self {
            rate: policy.start_rate(),
            ramped_at: now,
            tokens: 0.0,
            last: None,
        }
    }

    fn cap(&self) -> f64 {
        (self.rate / 60.0).max(1.0)
    }

    /// Notices that may go out now.
    pub fn allowance(&mut self, now: i64) -> usize {
        let last = *self.last.get_or_insert(now);
        let dt = (now - last).max(0) as f64;
        self.tokens = (self.tokens + dt * self.rate / 60_000.0).min(self.cap());
        self.last = Some(now.max(last));
        self.tokens.floor() as usize
    }

    /// Takes `n` sent notices from the bucket.
    pub fn spend(&mut self, n: usize) {
        self.tokens = (self.tokens - n as f64).max(0.0);
    }

    /// Grows the rate when a step is due and `failure_rate` (failed / finished so far; `None`
    /// before any device finished) is low enough. True when the rate changed.
    pub fn ramp(&mut self, policy: &Policy, now: i64, failure_rate: Option<f64>) -> bool {
        let Some(r) = &policy.ramp else {
            return false;
        };
        let max = f64::from(policy.pushes_per_minute);
        if self.rate >= max || now - self.ramped_at < r.every.as_millis() as i64 {
            return false;
        }
        if failure_rate.is_some_and(|f| f > r.max_failure_rate) {
            // Held: look again one step later.
            self.ramped_at = now;
            return true;
        }
        self.rate = (self.rate * r.factor).min(max);
        self.ramped_at = now;
        true
    }
}

/// Where a campaign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Only canary devices are notified.
    Canary,
    /// Every targeted device.
    Main,
}

impl Stage {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Canary => "canary",
            Stage::Main => "main",
        }
    }

    /// From its stored name (anything but `canary` is the main stage).
    pub fn parse(s: &str) -> Self {
        if s == "canary" {
            Stage::Canary
        } else {
            Stage::Main
        }
    }
}

/// Job counts of one campaign.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Waiting for a notice.
    pub queued: u64,
    /// Notified, downloading, verifying or flashing.
    pub active: u64,
    /// Reported the new version.
    pub succeeded: u64,
    /// Failed for good.
    pub failed: u64,
    /// Cancelled (campaign cancelled, aborted or ended).
    pub cancelled: u64,
    /// Canary jobs in all.
    pub canary: u64,
    /// Canary jobs queued or active.
    pub canary_open: u64,
    /// Canary jobs that succeeded.
    pub canary_succeeded: u64,
}

impl Counts {
    /// failed / finished, `None` before anything finished.
    pub fn failure_rate(&self) -> Option<f64> {
        let done = self.succeeded + self.failed;
        (done > 0).then(|| self.failed as f64 / done as f64)
    }
}

/// What a campaign should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Keep going.
    Continue,
    /// The canary stage succeeded: notify everyone else.
    Promote,
    /// Stop notifying; queued jobs are cancelled (the reason is kept).
    Abort(String),
    /// Every job has finished (or the run time is over and none is active).
    Finish,
    /// The run time is over: cancel queued jobs, wait for active ones.
    Ended,
}

/// Decides a running campaign's next step from its counts.
pub fn verdict(
    policy: &Policy,
    stage: Stage,
    c: &Counts,
    now: i64,
    ends_at: Option<i64>,
) -> Verdict {
    if let (Some(rate), true) = (
        policy.abort_failure_rate,
        c.succeeded + c.failed >= u64::from(policy.abort_min_finished.max(1)),
    ) {
        if c.failure_rate().is_some_and(|f| f > rate) {
            return Verdict::Abort(format!(
                "{} of {} finished devices failed, above the abort threshold {:.0} %",
                c.failed,
                c.succeeded + c.failed,
                rate * 100.0
            ));
        }
    }
    if stage == Stage::Canary && c.canary_open == 0 {
        let need = policy.canary.as_ref().map_or(1.0, |k| k.success_rate);
        let got = if c.canary == 0 {
            1.0
        } else {
            c.canary_succeeded as f64 / c.canary as f64
        };
        if got + 1e-9 >= need {
            return Verdict::Promote;
        }
        return Verdict::Abort(format!(
            "canary stage: {} of {} canary devices succeeded, {:.0} % needed",
            c.canary_succeeded,
            c.canary,
            need * 100.0
        ));
    }
    let over = ends_at.is_some_and(|e| now >= e);
    if over && c.queued > 0 {
        return Verdict::Ended;
    }
    if c.queued == 0 && c.active == 0 && (ends_at.is_none() || over) && stage == Stage::Main {
        return Verdict::Finish;
    }
    Verdict::Continue
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for its notice.
    Queued,
    /// Notice sent.
    Notified,
    /// Downloading (a progress report, or the first byte fetched).
    Downloading,
    /// Checking the image.
    Verifying,
    /// Writing or installing it.
    Flashing,
    /// Reported the new version.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobState {
    /// Every state, in the order shown.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Notified,
        JobState::Downloading,
        JobState::Verifying,
        JobState::Flashing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Notified => "notified",
            JobState::Downloading => "downloading",
            JobState::Verifying => "verifying",
            JobState::Flashing => "flashing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// From its stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|j| j.as_str() == s)
    }

    /// Notified, downloading, verifying or flashing.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Notified | JobState::Downloading | JobState::Verifying | JobState::Flashing
        )
    }

    /// Succeeded, failed or cancelled.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Alibaba's status name in `ota` messages.
    pub fn alibaba(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Notified => "NOTIFIED",
            JobState::Downloading | JobState::Verifying | JobState::Flashing => "IN_PROGRESS",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELED",
        }
    }
}

/// What a progress report means for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Still going, now in this state, at this step.
    Step(JobState, i64),
    /// Failed: the reason, and whether another attempt may help.
    Failed(String, bool),
}

/// Reads a progress report: steps 0..=100 (the description tells verifying and flashing
/// apart; step 100 without one means the image is being installed), or Alibaba's negative
/// codes: -1 failed and -2 download failed (another attempt may help), -3 verification and
/// -4 flashing failed (the same image would fail again).
pub fn report(step: i64, desc: &str) -> Result<Report, String> {
    let d = desc.to_ascii_lowercase();
    let why = |what: &str| {
        if desc.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {desc}")
        }
    };
    Ok(match step {
        -1 => Report::Failed(why("upgrade failed (-1)"), true),
        -2 => Report::Failed(why("download failed (-2)"), true),
        -3 => Report::Failed(why("verification failed (-3)"), false),
        -4 => Report::Failed(why("flashing failed (-4)"), false),
        0..=100 => {
            let state = if d.contains("verif") || d.contains("check") {
                JobState::Verifying
            } else if ["flash", "burn", "writ", "install", "reboot"]
                .iter()
                .any(|w| d.contains(w))
                || step == 100
            {
                JobState::Flashing
            } else {
                JobState::Downloading
            };
            Report::Step(state, step)
        }
        s => return Err(format!("step {s} is neither 0..=100 nor -1..=-4")),
    })
}

/// The gray-release hash of a device: a number in [0, 1) from the campaign's seed and the
/// device's identity, so a percentage picks the same devices every time it is evaluated.
pub fn hash_share(seed: &str, pk: &str, dn: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::new()
        .chain_update(seed.as_bytes())
        .chain_update([0])
        .chain_update(pk.as_bytes())
        .chain_update([0])
        .chain_update(dn.as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    /// Runs a pacer on a simulated clock ticking every `tick` ms for `span` ms; returns the
    /// notices sent.
    fn run(p: &mut Pacer, start: i64, span: i64, tick: i64) -> usize {
        let mut sent = 0;
        let mut t = start;
        while t < start + span {
            t += tick;
            let n = p.allowance(t);
            p.spend(n);
            sent += n;
        }
        sent
    }

    #[test]
    fn the_rate_is_honoured_within_a_notice_whatever_the_tick() {
        for (rate, tick) in [
            (10_000, 250),
            (60, 1000),
            (100_000, 100),
            (7, 333),
            (600, 5_000),
        ] {
            let policy = Policy {
                pushes_per_minute: rate,
                ..Policy::default()
            };
            let mut p = Pacer::new(&policy, 0);
            let sent = run(&mut p, 0, 10 * MIN, tick) as f64;
            let want = f64::from(rate) * 10.0;
            // A tick longer than the bucket's second loses what would overflow it.
            let lost = if tick > 1000 {
                want * (1.0 - 1000.0 / tick as f64)
            } else {
                0.0
            };
            assert!(
                (sent - (want - lost)).abs() <= (want * 0.01).max(2.0),
                "rate {rate}/min tick {tick} ms: sent {sent}, want {want} - {lost}"
            );
        }
    }

    #[test]
    fn a_restart_never_bursts() {
        let policy = Policy {
            pushes_per_minute: 6_000,
            ..Policy::default()
        };
        let mut p = Pacer::new(&policy, 0);
        run(&mut p, 0, MIN, 100);
        // Saved and loaded (the tokens are not kept), an hour later.
        let mut back: Pacer = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back.allowance(60 * MIN), 0);
        assert!(back.allowance(60 * MIN + 1000) <= 100);
    }

    #[test]
    fn the_ramp_grows_while_failures_stay_low_and_holds_otherwise() {
        let policy = Policy {
            pushes_per_minute: 1_000,
            ramp: Some(Ramp {
                start_per_minute: 100,
                factor: 2.0,
                every: Duration::from_secs(60),
                max_failure_rate: 0.1,
            }),
            ..Policy::default()
        };
        let mut p = Pacer::new(&policy, 0);
        assert_eq!(p.rate, 100.0);
        assert!(!p.ramp(&policy, 30_000, None), "too early");
        assert!(p.ramp(&policy, MIN, None));
        assert_eq!(p.rate, 200.0);
        assert!(p.ramp(&policy, 2 * MIN, Some(0.05)));
        assert_eq!(p.rate, 400.0);
        // 20 % failures: held at 400 for the step.
        assert!(p.ramp(&policy, 3 * MIN, Some(0.2)));
        assert_eq!(p.rate, 400.0);
        assert!(p.ramp(&policy, 4 * MIN, Some(0.02)));
        assert!(p.ramp(&policy, 5 * MIN, Some(0.02)));
        assert_eq!(p.rate, 1_000.0, "capped at pushes_per_minute");
        assert!(!p.ramp(&policy, 6 * MIN, Some(0.0)));
        // Sent over the first minutes: about the ramp's rates.
        let mut q = Pacer::new(&policy, 0);
        let first = run(&mut q, 0, MIN, 250);
        q.ramp(&policy, MIN, None);
        let second = run(&mut q, MIN, MIN, 250);
        assert!((99..=101).contains(&first), "{first}");
        assert!((198..=201).contains(&second), "{second}");
    }

    #[test]
    fn windows_use_local_time_and_may_pass_midnight() {
        let mut policy = Policy {
            windows: vec![Window {
                from: "22:00".into(),
                to: "02:00".into(),
            }],
            utc_offset: "+08:00".into(),
            ..Policy::default()
        };
        policy.check().unwrap();
        let at = |h: i64, m: i64| (h * 60 + m) * MIN; // UTC on 1970-01-01
        assert!(policy.in_window(at(14, 0)), "22:00 local");
        assert!(policy.in_window(at(17, 59)), "01:59 local");
        assert!(!policy.in_window(at(18, 0)), "02:00 local");
        assert!(!policy.in_window(at(13, 59)), "21:59 local");
        policy.utc_offset = "-05:30".into();
        assert!(policy.in_window(at(3, 30)), "22:00 local");
        policy.windows[0].to = "2:00".into();
        assert!(policy.check().unwrap_err().contains("windows[0].to"));
        policy.windows.clear();
        assert!(policy.in_window(at(12, 0)));
    }

    #[test]
    fn canaries_gate_the_main_stage_and_failures_abort() {
        let policy = Policy {
            canary: Some(Canary {
                count: 4,
                success_rate: 0.75,
                ..Canary::default()
            }),
            abort_failure_rate: Some(0.3),
            abort_min_finished: 10,
            ..Policy::default()
        };
        let mut c = Counts {
            queued: 96,
            active: 4,
            canary: 4,
            canary_open: 4,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Canary, &c, 0, None),
            Verdict::Continue
        );
        c.active = 0;
        c.canary_open = 0;
        c.succeeded = 3;
        c.failed = 1;
        c.canary_succeeded = 3;
        assert_eq!(
            verdict(&policy, Stage::Canary, &c, 0, None),
            Verdict::Promote
        );
        c.succeeded = 2;
        c.failed = 2;
        c.canary_succeeded = 2;
        assert!(matches!(
            verdict(&policy, Stage::Canary, &c, 0, None),
            Verdict::Abort(why) if why.contains("2 of 4 canary")
        ));
        // Main stage: 3 of 10 failed is not above 30 %; 4 of 11 is.
        let mut m = Counts {
            queued: 50,
            succeeded: 7,
            failed: 3,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Main, &m, 0, None),
            Verdict::Continue
        );
        m.failed = 4;
        assert!(matches!(
            verdict(&policy, Stage::Main, &m, 0, None),
            Verdict::Abort(_)
        ));
        // Below abort_min_finished nothing aborts.
        let few = Counts {
            queued: 50,
            failed: 3,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Main, &few, 0, None),
            Verdict::Continue
        );
    }

    #[test]
    fn campaigns_finish_when_done_or_when_their_time_is_over() {
        let policy = Policy::default();
        let done = Counts {
            succeeded: 5,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Main, &done, 0, None),
            Verdict::Finish
        );
        assert_eq!(
            verdict(&policy, Stage::Main, &done, 0, Some(10)),
            Verdict::Continue
        );
        assert_eq!(
            verdict(&policy, Stage::Main, &done, 10, Some(10)),
            Verdict::Finish
        );
        let waiting = Counts {
            queued: 3,
            active: 1,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Main, &waiting, 10, Some(10)),
            Verdict::Ended
        );
        let active = Counts {
            active: 1,
            ..Counts::default()
        };
        assert_eq!(
            verdict(&policy, Stage::Main, &active, 10, Some(10)),
            Verdict::Continue
        );
    }

    #[test]
    fn progress_reports_move_jobs() {
        use JobState::*;
        let cases = [
            (10, "", Report::Step(Downloading, 10)),
            (50, "downloading", Report::Step(Downloading, 50)),
            (100, "", Report::Step(Flashing, 100)),
            (100, "verifying image", Report::Step(Verifying, 100)),
            (80, "flashing", Report::Step(Flashing, 80)),
        ];
        for (step, desc, want) in cases {
            assert_eq!(report(step, desc).unwrap(), want, "{step} {desc}");
        }
        assert_eq!(
            report(-2, "timeout").unwrap(),
            Report::Failed("download failed (-2): timeout".into(), true)
        );
        assert!(matches!(report(-3, "").unwrap(), Report::Failed(_, false)));
        assert!(matches!(report(-4, "").unwrap(), Report::Failed(_, false)));
        assert!(report(101, "").is_err());
        assert!(report(-5, "").is_err());
    }

    #[test]
    fn policies_are_checked() {
        Policy::default().check().unwrap();
        let bad = [
            Policy {
                pushes_per_minute: 0,
                ..Policy::default()
            },
            Policy {
                utc_offset: "08:00".into(),
                ..Policy::default()
            },
            Policy {
                abort_failure_rate: Some(1.5),
                ..Policy::default()
            },
            Policy {
                token_ttl: Duration::from_secs(60),
                ..Policy::default()
            },
            Policy {
                ramp: Some(Ramp {
                    factor: 1.0,
                    ..Ramp::default()
                }),
                ..Policy::default()
            },
            Policy {
                canary: Some(Canary::default()),
                ..Policy::default()
            },
        ];
        for p in bad {
            assert!(p.check().is_err(), "{p:?}");
        }
    }

    #[test]
    fn gray_release_shares_are_stable_and_spread() {
        let a = hash_share("c1", "pk", "dn-1");
        assert_eq!(a, hash_share("c1", "pk", "dn-1"));
        assert_ne!(a, hash_share("c2", "pk", "dn-1"));
        let picked = (0..10_000)
            .filter(|i| hash_share("seed", "pk", &format!("d{i}")) < 0.1)
            .count();
        assert!((900..1100).contains(&picked), "{picked}");
    }
}
