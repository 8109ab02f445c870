//! Device reports (versions on `/ota/device/inform`, steps on `/ota/device/progress`) are
//! applied by one task in batches, each batch one transaction: a fleet answering a campaign
//! at once costs a commit per batch, not several per device (a storm of ten thousand informs
//! used to exhaust the database pool and drop the gateways carrying them). A report is
//! acknowledged to its device only after its batch committed.

use super::plan::{self, JobState, Policy};
use super::store::{Change, Job, OpenJob};
use crate::storage::{Db, StorageError};
use tokio::sync::{mpsc, oneshot};

/// What a device reported.
#[derive(Debug, Clone)]
pub enum Kind {
    /// It runs this version of the module.
    Inform {
        /// Version.
        version: String,
    },
    /// A step (0..100) or a failure (-1..-4) of its current upgrade.
    Progress {
        /// Step.
        step: i64,
        /// Its description.
        desc: String,
    },
}

/// One report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// OTA module.
    pub module: String,
    /// What.
    pub kind: Kind,
    /// When it arrived, ms.
    pub at: i64,
}

/// What applying a report did: the jobs it moved (with what happened), and whether the device
/// had no open job for the module (then it may join a running campaign).
pub type Applied = (Vec<(Job, String)>, bool);

type Queued = (Report, oneshot::Sender<Result<Applied, String>>);

/// Reports waiting for the batcher.
#[derive(Debug, Clone)]
pub struct Reports {
    tx: mpsc::Sender<Queued>,
}

/// Reports in one transaction at most.
const BATCH: usize = 512;

const OPEN: &[JobState] = &[
    JobState::Queued,
    JobState::Notified,
    JobState::Downloading,
    JobState::Verifying,
    JobState::Flashing,
];
const ACTIVE: &[JobState] = &[
    JobState::Notified,
    JobState::Downloading,
    JobState::Verifying,
    JobState::Flashing,
];
const FLASHING: &[JobState] = &[JobState::Flashing];

impl Reports {
    /// Starts the batcher; it ends when every [`Reports`] handle is dropped.
    pub fn start(db: Db) -> Self {
        let (tx, rx) = mpsc::channel(16_384);
        tokio::spawn(run(db, rx));
        Self { tx }
    }

    /// Applies a report; returns once its batch committed.
    pub async fn apply(&self, r: Report) -> Result<Applied, StorageError> {
        let (done, rx) = oneshot::channel();
        let closed = || StorageError::Conflict("the OTA report writer stopped".into());
        self.tx.send((r, done)).await.map_err(|_| closed())?;
        rx.await
            .map_err(|_| closed())?
            .map_err(|e| StorageError::Conflict(format!("storing OTA reports: {e}")))
    }
}

async fn run(db: Db, mut rx: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        let reports: Vec<Report> = batch.iter().map(|(r, _)| r.clone()).collect();
        let t0 = std::time::Instant::now();
        let applied = db.apply_reports(&reports, decide).await;
        tracing::debug!(
            reports = reports.len(),
            ms = t0.elapsed().as_millis() as u64,
            "OTA reports applied"
        );
        match applied {
            Ok(results) => {
                for ((_, done), applied) in batch.drain(..).zip(results) {
                    let _ = done.send(Ok(applied));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, reports = batch.len(), "storing OTA reports failed");
                let why = e.to_string();
                for (_, done) in batch.drain(..) {
                    let _ = done.send(Err(why.clone()));
                }
            }
        }
    }
}

/// What a report does to one open job: an inform of the package's version ends it in
/// success, another version after flashing in failure (the image did not stay); a step moves
/// an active job on (a new deadline); a failure retries while the policy allows.
pub fn decide(r: &Report, o: &OpenJob) -> Option<Change<'static>> {
    let job = &o.job;
    let state = job.job_state();
    match &r.kind {
        Kind::Inform { version } if *version == o.target => Some(Change {
            from: OPEN,
            attempt: Some(job.attempt),
            to: JobState::Succeeded,
            step: None,
            detail: format!("reported version {version}"),
            deadline: None,
            retry: false,
        }),
        Kind::Inform { version } if state == JobState::Flashing => Some(Change {
            from: FLASHING,
            attempt: Some(job.attempt),
            to: JobState::Failed,
            step: None,
            detail: format!(
                "came back with version {version}, not {} (rolled back?)",
                o.target
            ),
            deadline: None,
            retry: false,
        }),
        Kind::Inform { .. } => None,
        Kind::Progress { step, desc } => {
            if !state.is_active() {
                return None;
            }
            let policy: Policy = serde_json::from_str(&o.policy).unwrap_or_default();
            match plan::report(*step, desc) {
                Ok(plan::Report::Step(to, s)) => Some(Change {
                    from: ACTIVE,
                    attempt: Some(job.attempt),
                    to,
                    step: Some(s),
                    detail: if desc.is_empty() {
                        format!("step {s}")
                    } else {
                        format!("step {s}: {desc}")
                    },
                    deadline: Some(r.at + policy.timeout.as_millis() as i64),
                    retry: false,
                }),
                Ok(plan::Report::Failed(why, retryable)) => {
                    let again = retryable && job.retries < i64::from(policy.retries);
                    Some(Change {
                        from: ACTIVE,
                        attempt: Some(job.attempt),
                        to: if again {
                            JobState::Queued
                        } else {
                            JobState::Failed
                        },
                        step: Some(*step),
                        detail: if again {
                            format!("{why}; retrying")
                        } else {
                            why
                        },
                        deadline: None,
                        retry: again,
                    })
                }
                Err(_) => None,
            }
        }
    }
}
