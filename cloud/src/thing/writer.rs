//! The thing-data writer: one task that batches property values, events and raw messages from
//! every connection into few transactions, and tells each sender when its rows are committed.

use super::store::{EventRow, PropertyRow, RawRow, SeriesKey};
use crate::metrics::Metrics;
use crate::storage::Db;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Rows of one uplink, and who waits for their commit.
#[derive(Debug)]
pub struct Job {
    /// (series, ts, JSON value).
    pub props: Vec<(SeriesKey, i64, String)>,
    /// Events.
    pub events: Vec<EventRow>,
    /// Raw messages.
    pub raws: Vec<RawRow>,
    /// (product key, device name, message id) when a second copy must be dropped.
    pub dedup: Option<(String, String, String)>,
    /// Told `Some(duplicate)` once committed, `None` when storing failed.
    pub done: oneshot::Sender<Option<bool>>,
}

/// Series ids already known, shared so that deleting devices can clear it.
#[derive(Debug, Clone, Default)]
pub struct SeriesCache(Arc<Mutex<HashMap<SeriesKey, i64>>>);

/// Entries kept before the cache starts over (about 100 bytes each).
const CACHE_MAX: usize = 2_000_000;

impl SeriesCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SeriesKey, i64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every id.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Jobs taken into one transaction at most.
const MAX_JOBS: usize = 512;

pub async fn run(
    db: Db,
    mut rx: mpsc::Receiver<Job>,
    cache: SeriesCache,
    metrics: Arc<Metrics>,
    tsdb: Arc<crate::tsdb::Tsdb>,
    mut stop: watch::Receiver<bool>,
) {
    let mut jobs = Vec::with_capacity(MAX_JOBS);
    loop {
        let stopping = match crate::batch::next_batch(&mut rx, &mut jobs, MAX_JOBS, &mut stop).await
        {
            crate::batch::Batch::Closed => return,
            crate::batch::Batch::More => false,
            crate::batch::Batch::Last => true,
        };
        let started = std::time::Instant::now();
        let result = store_batch(&db, &cache, &tsdb, &mut jobs).await;
        metrics
            .latency
            .ingest_commit
            .record(started.elapsed().as_secs_f64());
        if result.is_none() {
            Metrics::inc(&metrics.thing_store_failures);
        }
        for (n, j) in jobs.drain(..).enumerate() {
            let _ = j
                .done
                .send(result.as_ref().map(|d| d.get(n).copied().unwrap_or(false)));
        }
        if stopping {
            return;
        }
    }
}

async fn store_batch(
    db: &Db,
    cache: &SeriesCache,
    tsdb: &crate::tsdb::Tsdb,
    jobs: &mut [Job],
) -> Option<Vec<bool>> {
    for attempt in 0..3u32 {
        match try_store(db, cache, tsdb, jobs).await {
            Ok(d) => return Some(d),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "storing thing data failed, retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    tracing::error!(
        jobs = jobs.len(),
        "thing data not stored after 3 attempts; the devices will be disconnected unacknowledged"
    );
    None
}

async fn try_store(
    db: &Db,
    cache: &SeriesCache,
    tsdb: &crate::tsdb::Tsdb,
    jobs: &mut [Job],
) -> Result<Vec<bool>, crate::storage::StorageError> {
    let missing: Vec<SeriesKey> = {
        let c = cache.lock();
        let mut seen = std::collections::HashSet::new();
        jobs.iter()
            .flat_map(|j| j.props.iter().map(|p| &p.0))
            .filter(|k| !c.contains_key(*k) && seen.insert(*k))
            .cloned()
            .collect()
    };
    if !missing.is_empty() {
        let ids = db.series_ids(&missing).await?;
        let mut c = cache.lock();
        if c.len() + ids.len() > CACHE_MAX {
            c.clear();
        }
        c.extend(ids);
    }
    // Rows are built under the cache lock, which must not be held across an await.
    let mut messages: Vec<super::store::ThingMessage> = {
        let c = cache.lock();
        let rows = |j: &Job| -> Result<Vec<PropertyRow>, crate::storage::StorageError> {
            j.props
                .iter()
                .map(|(key, ts, value)| match c.get(key) {
                    Some(id) => Ok(PropertyRow {
                        series_id: *id,
                        ts: *ts,
                        value: value.clone(),
                        history: true,
                    }),
                    // Cleared between the lookup and here (a device was deleted): retry.
                    None => Err(crate::storage::StorageError::Conflict(
                        "series cache cleared during a batch".into(),
                    )),
                })
                .collect()
        };
        jobs.iter()
            .map(|j| Ok((j.dedup.clone(), rows(j)?, j.events.clone(), j.raws.clone())))
            .collect::<Result<_, crate::storage::StorageError>>()?
    };
    // Storage policies: which points go to the history (every point stays the latest value).
    let keys = jobs.iter().flat_map(|j| j.props.iter().map(|p| &p.0));
    let verdicts = tsdb.filter(
        messages
            .iter()
            .flat_map(|m| m.1.iter())
            .zip(keys)
            .map(|(r, k)| {
                (
                    r.series_id,
                    k.0.as_str(),
                    k.2.as_str(),
                    r.ts,
                    r.value.as_str(),
                )
            }),
    );
    let mut verdicts = verdicts.into_iter();
    // Per message: the rows that land in the history, for the sealer's index.
    let mut landed: Vec<Vec<crate::tsdb::Landed>> = Vec::with_capacity(messages.len());
    for m in &mut messages {
        let mut l = Vec::new();
        for row in &mut m.1 {
            let v = verdicts.next().unwrap_or(crate::tsdb::Verdict::Store);
            row.history = !matches!(v, crate::tsdb::Verdict::Skip);
            if row.history {
                l.push(crate::tsdb::Landed::new(row.series_id, row.ts, v));
            }
        }
        landed.push(l);
    }
    let dups = store_messages(db, messages).await?;
    tsdb.stored(
        landed
            .into_iter()
            .zip(&dups)
            .filter(|(_, dup)| !**dup)
            .flat_map(|(l, _)| l),
    );
    Ok(dups)
}

/// Stores built rows: one transaction, with duplicate checks only when a message asks for one.
async fn store_messages(
    db: &Db,
    messages: Vec<super::store::ThingMessage>,
) -> Result<Vec<bool>, crate::storage::StorageError> {
    if messages.iter().all(|m| m.0.is_none()) {
        let mut props = Vec::new();
        let mut events = Vec::new();
        let mut raws = Vec::new();
        let n = messages.len();
        for (_, p, e, r) in messages {
            props.extend(p);
            events.extend(e);
            raws.extend(r);
        }
        db.store_thing_data(&props, &events, &raws).await?;
        return Ok(vec![false; n]);
    }
    db.store_thing_messages(&messages, crate::registry::now_ms())
        .await
}
