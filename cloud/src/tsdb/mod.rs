//! Time-series storage of property values, inside the configured database (no other server).
//!
//! New points land in `property_segments`, one row per writer batch holding every series'
//! points of the batch ([`segment`]), as the thing-data writer commits them (acknowledged
//! means committed there). The sealer turns segments into compressed per-series chunks
//! (`property_chunks`, [`codec`]) every `seal_every`, or sooner once `landing_points` wait;
//! chunks smaller than half of `chunk_points` are merged later ([`Tsdb::compact`]). Rows of
//! `property_history` (the landing table before segments) are still sealed per series once it
//! has `chunk_points` of them or its oldest has waited `seal_after`. What survives a kill -9,
//! and why:
//! - sealing segments is one transaction per group of segments that deletes exactly the
//!   segments it read (the count is checked: a group another sealer took meanwhile is rolled
//!   back) and inserts the chunks made of their points: a crash before the commit leaves the
//!   segments, after it the chunks (no loss, no duplicate); segments are never changed after
//!   they are written, so they are read and encoded before the transaction;
//! - sealing rows is one transaction per batch of series that *deletes* the rows (`DELETE ...
//!   RETURNING`) and inserts the chunks made of exactly the rows it deleted;
//! - the reaper drops whole chunks whose newest point is older than the retention, and rows
//!   older than it, one statement each; queries hide points older than the retention at once;
//! - the policy filter and the sealer's index of hot series live in memory and decide only
//!   *which* points are stored and *when* they are sealed, never whether a committed row stays.
//!
//! Queries read segments, rows, chunks and archive files and merge them, so a point is found
//! wherever it is.

pub mod archive;
pub mod codec;
pub mod policy;
pub mod query;
pub mod segment;

use crate::metrics::Metrics;
use crate::storage::{Db, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Milliseconds from `"1500"` or a human duration (`"1m"`, `"30s"`, `"90d"`); `None` for
/// anything else or more than i64 milliseconds. Shared by the API and the CLI.
pub fn millis(text: &str) -> Option<i64> {
    let text = text.trim();
    text.parse::<i64>().ok().or_else(|| {
        humantime_serde::re::humantime::parse_duration(text)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok())
    })
}

/// `[timeseries]`: chunking and retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeseriesConfig {
    /// Points per chunk: a series is sealed once it has this many unsealed points.
    pub chunk_points: usize,
    /// A series' rows (written before landing segments) are sealed at the latest this long
    /// after the first arrived.
    #[serde(with = "humantime_serde")]
    pub seal_after: Duration,
    /// How often the sealer turns landing segments into chunks.
    #[serde(with = "humantime_serde")]
    pub seal_every: Duration,
    /// Points waiting in landing segments that start a seal before `seal_every` is up.
    pub landing_points: usize,
    /// How often the reaper drops points past their retention.
    #[serde(with = "humantime_serde")]
    pub reap_every: Duration,
    /// Retention of properties without a policy that says otherwise (`"90d"`); absent: forever.
    #[serde(with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Chunks whose newest point is older than this move into Parquet files (`"30d"`);
    /// absent: no archiving (`POST /timeseries/archive` still archives on demand).
    #[serde(with = "humantime_serde")]
    pub archive_after: Option<Duration>,
    /// How often the archiver looks for chunks to move.
    #[serde(with = "humantime_serde")]
    pub archive_every: Duration,
    /// Where archive files go; default `{data_dir}/archive`. One server per directory.
    pub archive_dir: Option<std::path::PathBuf>,
}

impl Default for TimeseriesConfig {
    fn default() -> Self {
        Self {
            chunk_points: 4096,
            seal_after: Duration::from_secs(3600),
            seal_every: Duration::from_secs(5),
            landing_points: SEAL_SEGMENT_POINTS,
            reap_every: Duration::from_secs(60),
            ttl: None,
            archive_after: None,
            archive_every: Duration::from_secs(600),
            archive_dir: None,
        }
    }
}

/// Unsealed points of one series as the sealer knows them.
#[derive(Debug, Clone, Copy)]
struct Hot {
    points: usize,
    since: Instant,
}

/// Points moved into chunks per transaction at most: the write lock is held while they are
/// encoded, so this bounds how long ingest waits behind a seal.
const SEAL_BATCH_POINTS: usize = 32_768;

/// Points of landing segments sealed per transaction at most (their segments are whole): the
/// larger, the longer the chunks each seal writes, and the more memory it takes (about 60
/// bytes a point while encoding).
const SEAL_SEGMENT_POINTS: usize = 1 << 20;

/// The time-series store: policies, the sealer's index, queries.
#[derive(Debug)]
pub struct Tsdb {
    pub(crate) db: Db,
    config: TimeseriesConfig,
    /// Storage policies and retention.
    pub policies: policy::Policies,
    hot: Mutex<HashMap<i64, Hot>>,
    /// Points committed to landing segments since the last seal (an estimate: it starts a
    /// seal early, never decides what is sealed).
    landing: std::sync::atomic::AtomicUsize,
    /// Woken when `landing` passes `landing_points`.
    landing_full: tokio::sync::Notify,
    /// Series that sealing gave small chunks since the sealer last merged (see
    /// [`Tsdb::compact_recent`]).
    small: Mutex<std::collections::HashSet<i64>>,
    /// Last stored point of series under on-change or interval policies.
    kept: Mutex<HashMap<i64, policy::Kept>>,
    metrics: Arc<Metrics>,
}

/// What one seal pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Series sealed.
    pub series: usize,
    /// Chunks written.
    pub chunks: usize,
    /// Points moved from rows into chunks.
    pub points: usize,
}

/// What the storage policy does with one point.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Stored.
    Store,
    /// Stored, and remembered as its series' last stored point (on-change, interval).
    Remember(Value),
    /// Only the latest value is updated.
    Skip,
}

/// A row committed to the history.
#[derive(Debug)]
pub struct Landed {
    series: i64,
    kept: Option<policy::Kept>,
}

impl Landed {
    /// A row of `series` at `ts` with the policy's verdict.
    pub fn new(series: i64, ts: i64, verdict: Verdict) -> Self {
        Self {
            series,
            kept: match verdict {
                Verdict::Remember(value) => Some(policy::Kept { ts, value }),
                _ => None,
            },
        }
    }
}

/// Series whose last-kept entries are remembered at most (then the memory starts over, and
/// the next point of each is stored).
const KEPT_MAX: usize = 1_000_000;

impl Tsdb {
    /// Loads the policies and the index of unsealed rows.
    pub async fn open(
        db: Db,
        config: TimeseriesConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StorageError> {
        let t = Self::with_policies(db, config, metrics).await?;
        t.sweep_archive().await?;
        let now = Instant::now();
        let counts = t.db.hot_counts().await?;
        let mut hot = t.hot();
        for (sid, n) in counts {
            hot.insert(
                sid,
                Hot {
                    points: n,
                    since: now,
                },
            );
        }
        drop(hot);
        Ok(t)
    }

    /// A store for reading only (an analytics worker beside the server): loads the policies
    /// (retention) and nothing else; never sweeps the archive directory, which the server owns.
    pub async fn reader(db: Db, config: TimeseriesConfig) -> Result<Arc<Self>, StorageError> {
        Self::with_policies(db, config, Arc::default()).await
    }

    async fn with_policies(
        db: Db,
        config: TimeseriesConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StorageError> {
        let t = Arc::new(Self {
            policies: policy::Policies::new(config.ttl),
            db,
            config,
            hot: Mutex::default(),
            landing: Default::default(),
            landing_full: tokio::sync::Notify::new(),
            small: Mutex::default(),
            kept: Mutex::default(),
            metrics,
        });
        t.policies.replace(t.db.storage_policies().await?);
        Ok(t)
    }

    /// Every series: `(product_key, device_name, identifier)`, ordered.
    pub async fn all_series(&self) -> Result<Vec<(String, String, String)>, StorageError> {
        let rows = sqlx::query("SELECT product_key, device_name, identifier FROM property_series ORDER BY product_key, device_name, identifier")
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &TimeseriesConfig {
        &self.config
    }

    fn hot(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Hot>> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<i64, policy::Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the policies do with each of these points (series id, product, property, ts,
    /// value). Pass the stored ones to [`Tsdb::stored`] once committed.
    pub fn filter<'a>(
        &self,
        points: impl Iterator<Item = (i64, &'a str, &'a str, i64, &'a str)>,
    ) -> Vec<Verdict> {
        let kept = self.kept();
        // Points of one series in one batch see the ones kept before them in the batch.
        let mut batch: HashMap<i64, policy::Kept> = HashMap::new();
        points
            .map(|(sid, pk, id, ts, text)| {
                let mode = self.policies.mode(pk, id);
                if !mode.remembers() {
                    return match mode {
                        policy::Mode::None => Verdict::Skip,
                        _ => Verdict::Store,
                    };
                }
                let value = codec::stored_value(text);
                let last = batch.get(&sid).or_else(|| kept.get(&sid));
                if !mode.keeps(last, ts, &value) {
                    return Verdict::Skip;
                }
                batch.insert(
                    sid,
                    policy::Kept {
                        ts,
                        value: value.clone(),
                    },
                );
                Verdict::Remember(value)
            })
            .collect()
    }

    /// Records committed points: how many wait in landing segments (a seal starts early when
    /// they pass `landing_points`), and the last stored point of series under on-change and
    /// interval policies.
    pub fn stored(&self, rows: impl Iterator<Item = Landed>) {
        let mut remembered = Vec::new();
        let mut points = 0;
        for l in rows {
            points += 1;
            if let Some(k) = l.kept {
                remembered.push((l.series, k));
            }
        }
        let before = self
            .landing
            .fetch_add(points, std::sync::atomic::Ordering::Relaxed);
        if before < self.config.landing_points && before + points >= self.config.landing_points {
            self.landing_full.notify_one();
        }
        if !remembered.is_empty() {
            let mut kept = self.kept();
            if kept.len() + remembered.len() > KEPT_MAX {
                kept.clear();
            }
            kept.extend(remembered);
        }
    }

    /// Adds series with unsealed rows that the index does not know (rows written by another
    /// node, or left when a seal found nothing to take): they are sealed like the others.
    pub async fn resync(&self) -> Result<usize, StorageError> {
        let counts = self.db.hot_counts().await?;
        let now = Instant::now();
        let mut hot = self.hot();
        let mut added = 0;
        for (sid, n) in counts {
            hot.entry(sid).or_insert_with(|| {
                added += 1;
                Hot {
                    points: n,
                    since: now,
                }
            });
        }
        Ok(added)
    }

    /// Forgets what is remembered of series (their device or product was deleted).
    pub fn forget(&self, series: &[i64]) {
        let mut hot = self.hot();
        let mut kept = self.kept();
        let mut small = self.small();
        for s in series {
            hot.remove(s);
            kept.remove(s);
            small.remove(s);
        }
    }

    /// Seals every landing segment, and the series with rows that are due (`all`: every
    /// series with unsealed rows).
    pub async fn seal(&self, all: bool) -> Result<Sealed, StorageError> {
        let mut total = self.seal_segments().await?;
        let due: Vec<(i64, usize)> = {
            let hot = self.hot();
            let mut v: Vec<(i64, usize)> = hot
                .iter()
                .filter(|(_, h)| {
                    all || h.points >= self.config.chunk_points
                        || h.since.elapsed() >= self.config.seal_after
                })
                .map(|(s, h)| (*s, h.points))
                .collect();
            // The fullest first: they free the most rows.
            v.sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
            v
        };
        for batch in groups(&due, SEAL_BATCH_POINTS) {
            let started = Instant::now();
            let done = self.seal_series(&batch).await?;
            self.count_seal(started, done, &mut total);
        }
        Ok(total)
    }

    /// Records one seal transaction in the metrics and in `total`.
    fn count_seal(&self, started: Instant, done: Sealed, total: &mut Sealed) {
        self.metrics
            .latency
            .seal
            .record(started.elapsed().as_secs_f64());
        Metrics::add(&self.metrics.points_sealed, done.points as u64);
        Metrics::add(&self.metrics.chunks_written, done.chunks as u64);
        total.series += done.series;
        total.chunks += done.chunks;
        total.points += done.points;
    }

    /// Turns every landing segment into chunks, in groups of whole segments of about
    /// [`SEAL_SEGMENT_POINTS`] points, one transaction per group.
    async fn seal_segments(&self) -> Result<Sealed, StorageError> {
        let listed =
            sqlx::query("SELECT id, n FROM property_segments WHERE damaged IS NULL ORDER BY id")
                .fetch_all(&self.db.pool)
                .await?;
        let listed: Vec<(i64, usize)> = listed
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>(0)?,
                    usize::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
                ))
            })
            .collect::<Result<_, StorageError>>()?;
        let read: usize = listed.iter().map(|l| l.1).sum();
        let mut total = Sealed::default();
        for group in groups(&listed, SEAL_SEGMENT_POINTS) {
            let started = Instant::now();
            let done = self.seal_segment_group(&group).await?;
            self.count_seal(started, done, &mut total);
        }
        // What this pass found no longer waits (what landed meanwhile still counts).
        let _ = self.landing.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |n| Some(n.saturating_sub(read)),
        );
        Ok(total)
    }

    /// Seals these segments: reads and encodes them, then in one transaction deletes them
    /// (all of them, or nothing is done: another sealer took some) and inserts the chunks of
    /// the series that still exist. A segment that cannot be read is marked damaged.
    async fn seal_segment_group(&self, ids: &[i64]) -> Result<Sealed, StorageError> {
        let engine = self.db.engine();
        let sql = format!(
            "SELECT id, data FROM property_segments WHERE id IN {}",
            crate::storage::placeholders(engine, 1, ids.len())
        );
        let mut q = sqlx::query_as::<_, (i64, Vec<u8>)>(&sql);
        for id in ids {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.db.pool).await?;
        let mut by_series: HashMap<i64, Vec<(i64, Value)>> = HashMap::new();
        let mut good = Vec::with_capacity(rows.len());
        let mut damaged = Vec::new();
        for (id, data) in &rows {
            match segment::Segment::parse(data) {
                Ok(seg) => {
                    for (sid, ts, text) in seg.points() {
                        by_series
                            .entry(sid)
                            .or_default()
                            .push((ts, codec::stored_value(text)));
                    }
                    good.push(*id);
                }
                Err(e) => {
                    tracing::error!(segment = id, error = %e, "a landing segment could not be read; it stays, marked damaged, and is not sealed");
                    Metrics::inc(&self.metrics.chunks_damaged);
                    damaged.push((*id, e.to_string()));
                }
            }
        }
        drop(rows);
        let mut encoded: Vec<(i64, usize, Vec<Encoded>)> = Vec::with_capacity(by_series.len());
        for (sid, mut points) in by_series {
            query::order(&mut points);
            encoded.push((
                sid,
                points.len(),
                encode_chunks(sid, &points, self.config.chunk_points)?,
            ));
        }
        encoded.sort_unstable_by_key(|e| e.0);
        let mut tx = self.db.write_tx().await?;
        for (id, reason) in &damaged {
            sqlx::query("UPDATE property_segments SET damaged = $1 WHERE id = $2")
                .bind(reason)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        if !good.is_empty() {
            let sql = format!(
                "DELETE FROM property_segments WHERE id IN {}",
                crate::storage::placeholders(engine, 1, good.len())
            );
            let mut q = sqlx::query(&sql);
            for id in &good {
                q = q.bind(id);
            }
            if q.execute(&mut *tx).await?.rows_affected() != good.len() as u64 {
                tx.rollback().await?;
                return Ok(Sealed::default());
            }
        }
        // Points of series deleted since they landed (their device or product went) are dropped.
        let mut alive = std::collections::HashSet::new();
        for part in encoded.chunks(500) {
            let sql = format!(
                "SELECT id FROM property_series WHERE id IN {}",
                crate::storage::placeholders(engine, 1, part.len())
            );
            let mut q = sqlx::query_scalar::<_, i64>(&sql);
            for e in part {
                q = q.bind(e.0);
            }
            alive.extend(q.fetch_all(&mut *tx).await?);
        }
        let mut done = Sealed::default();
        let mut small = Vec::new();
        let mut rows = Vec::new();
        for (sid, n, chunks) in encoded {
            if !alive.contains(&sid) {
                continue;
            }
            if chunks
                .iter()
                .any(|c| c.1.count < self.config.chunk_points / 2)
            {
                small.push(sid);
            }
            done.series += 1;
            done.points += n;
            done.chunks += chunks.len();
            rows.extend(chunks.into_iter().map(|(data, s)| (sid, s, data)));
        }
        insert_chunk_rows(&mut tx, engine, rows).await?;
        tx.commit().await?;
        self.small().extend(small);
        Ok(done)
    }

    /// Moves every row of these series into chunks, in one transaction.
    async fn seal_series(&self, series: &[i64]) -> Result<Sealed, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let mut done = Sealed::default();
        let mut moved = Vec::with_capacity(series.len());
        for sid in series {
            let rows = sqlx::query(
                "DELETE FROM property_history WHERE series_id = $1 RETURNING ts, value",
            )
            .bind(sid)
            .fetch_all(&mut *tx)
            .await?;
            let mut points: Vec<(i64, Value)> = Vec::with_capacity(rows.len());
            for r in &rows {
                let text: String = r.try_get(1)?;
                let value = codec::stored_value(&text);
                points.push((r.try_get(0)?, value));
            }
            moved.push((*sid, points.len()));
            if points.is_empty() {
                continue;
            }
            query::order(&mut points);
            done.chunks += insert_chunks(&mut tx, *sid, &points, self.config.chunk_points).await?;
            done.series += 1;
            done.points += points.len();
        }
        tx.commit().await?;
        let mut hot = self.hot();
        for (sid, n) in moved {
            if let Some(h) = hot.get_mut(&sid) {
                // Rows committed by the writer during the seal stay counted; a series that had
                // none left (its device was deleted, another node sealed it) is forgotten.
                h.points = if n == 0 {
                    0
                } else {
                    h.points.saturating_sub(n)
                };
                if h.points == 0 {
                    hot.remove(&sid);
                } else {
                    h.since = Instant::now();
                }
            }
        }
        Ok(done)
    }

    /// Merges small chunks (under half of `chunk_points`: sealed from landing segments
    /// between two seals, or left by `seal_after` on slow series) of up to `max_series` series
    /// that have enough of them: together at least half a chunk, or [`MERGE_COUNT`] chunks.
    /// Merges of many series share a transaction (about 32k points) that deletes the chunks
    /// they read and inserts what those held; a chunk reaped or merged by someone else
    /// meanwhile rolls that transaction back and ends the pass (the series are merged on a
    /// later one). A damaged chunk is left where it is. Returns (chunks before, chunks after).
    pub async fn compact(&self, max_series: usize) -> Result<(usize, usize), StorageError> {
        self.compact_due(max_series, MERGE_COUNT).await
    }

    /// [`Tsdb::compact`] of every series with two small chunks or more, due or not (for a
    /// measurement or before a backup: the store as it converges once series fill).
    pub async fn compact_all(&self, max_series: usize) -> Result<(usize, usize), StorageError> {
        self.compact_due(max_series, 2).await
    }

    async fn compact_due(
        &self,
        max_series: usize,
        count: i64,
    ) -> Result<(usize, usize), StorageError> {
        let sql = format!("SELECT series_id FROM property_chunks WHERE {DUE} LIMIT $3");
        let rows = sqlx::query_scalar::<_, i64>(&sql)
            .bind(self.half())
            .bind(count)
            .bind(i64::try_from(max_series).unwrap_or(i64::MAX))
            .fetch_all(&self.db.pool)
            .await?;
        self.merge_small(&rows).await
    }

    /// [`Tsdb::compact`] for the series that seals since the last call gave small chunks: an
    /// indexed look at each instead of a scan of every chunk. A series not due yet is noted
    /// again by its next seal (whether it is due changes only then); the reaper's scan finds
    /// any left behind.
    pub async fn compact_recent(&self) -> Result<(usize, usize), StorageError> {
        let candidates: Vec<i64> = {
            let mut small = self.small();
            let take: Vec<i64> = small.iter().take(RECENT_SERIES).copied().collect();
            for s in &take {
                small.remove(s);
            }
            take
        };
        let mut due = Vec::new();
        for part in candidates.chunks(500) {
            let marks: Vec<String> = (0..part.len()).map(|i| format!("${}", i + 3)).collect();
            let sql = format!(
                "SELECT series_id FROM property_chunks WHERE series_id IN ({}) AND {DUE}",
                marks.join(", ")
            );
            let mut q = sqlx::query_scalar::<_, i64>(&sql)
                .bind(self.half())
                .bind(MERGE_COUNT);
            for sid in part {
                q = q.bind(sid);
            }
            due.extend(q.fetch_all(&self.db.pool).await?);
        }
        self.merge_small(&due).await
    }

    /// Points under which a chunk is small: half of `chunk_points`.
    fn half(&self) -> i64 {
        i64::try_from(self.config.chunk_points / 2).unwrap_or(i64::MAX)
    }

    fn small(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<i64>> {
        self.small.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges the small chunks of these series (64 per series at most per call); a run of them
    /// that fits one chunk at a time.
    async fn merge_small(&self, series: &[i64]) -> Result<(usize, usize), StorageError> {
        let half = self.half();
        let mut merged = (0, 0);
        // Merges read and encoded, committed together (about SEAL_BATCH_POINTS points per
        // transaction: the write lock is not taken once per series).
        let mut ready: Vec<Merge> = Vec::new();
        let mut ready_points = 0;
        for &sid in series {
            let small = sqlx::query(
                // Bounded: a series with more small chunks gets the rest on later passes.
                "SELECT id, n, data FROM property_chunks WHERE series_id = $1 AND n < $2 ORDER BY start_ts LIMIT 64",
            )
            .bind(sid)
            .bind(half)
            .fetch_all(&self.db.pool)
            .await?;
            // Runs of chunks that together fill at most one chunk.
            let mut groups: Vec<Vec<Decoded>> = vec![Vec::new()];
            let mut filled = 0usize;
            for c in &small {
                let (id, n, data): (i64, i64, Vec<u8>) =
                    (c.try_get(0)?, c.try_get(1)?, c.try_get(2)?);
                let Ok(points) = codec::decode(&data) else {
                    continue;
                };
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if filled + n > self.config.chunk_points {
                    groups.push(Vec::new());
                    filled = 0;
                }
                filled += n;
                if let Some(g) = groups.last_mut() {
                    g.push((id, points));
                }
            }
            for group in groups.into_iter().filter(|g| g.len() > 1) {
                let ids: Vec<i64> = group.iter().map(|g| g.0).collect();
                let mut points: Vec<(i64, Value)> =
                    group.into_iter().flat_map(|(_, p)| p).collect();
                query::order(&mut points);
                ready_points += points.len();
                ready.push((
                    ids,
                    sid,
                    encode_chunks(sid, &points, self.config.chunk_points)?,
                ));
            }
            if ready_points >= SEAL_BATCH_POINTS {
                ready_points = 0;
                match self.commit_merges(std::mem::take(&mut ready)).await? {
                    Some(m) => merged = (merged.0 + m.0, merged.1 + m.1),
                    None => return Ok(merged),
                }
            }
        }
        if let Some(m) = self.commit_merges(ready).await? {
            merged = (merged.0 + m.0, merged.1 + m.1);
        }
        Ok(merged)
    }

    /// Commits merges in one transaction: deletes the chunks each read and inserts the chunks
    /// it made. `None` (rolled back) when some chunk was gone (reaped, or merged by another
    /// node): those series are merged on a later pass. Returns (chunks before, chunks after).
    async fn commit_merges(
        &self,
        merges: Vec<Merge>,
    ) -> Result<Option<(usize, usize)>, StorageError> {
        if merges.is_empty() {
            return Ok(Some((0, 0)));
        }
        let engine = self.db.engine();
        let ids: Vec<i64> = merges.iter().flat_map(|m| m.0.iter().copied()).collect();
        let mut tx = self.db.write_tx().await?;
        let mut gone = 0;
        for part in ids.chunks(500) {
            let sql = format!(
                "DELETE FROM property_chunks WHERE id IN {}",
                crate::storage::placeholders(engine, 1, part.len())
            );
            let mut q = sqlx::query(&sql);
            for id in part {
                q = q.bind(id);
            }
            gone += q.execute(&mut *tx).await?.rows_affected();
        }
        if gone != ids.len() as u64 {
            tx.rollback().await?;
            return Ok(None);
        }
        let rows: Vec<(i64, codec::Stats, Vec<u8>)> = merges
            .into_iter()
            .flat_map(|(_, sid, chunks)| chunks.into_iter().map(move |(d, s)| (sid, s, d)))
            .collect();
        let after = rows.len();
        insert_chunk_rows(&mut tx, engine, rows).await?;
        tx.commit().await?;
        Ok(Some((ids.len(), after)))
    }

    /// Drops chunks and rows past their retention; returns (chunks, rows) dropped.
    pub async fn reap(&self, now: i64) -> Result<(u64, u64), StorageError> {
        let policies = self.policies.list(None);
        let mut dropped = (0, 0);
        // Properties with a policy of their own.
        let mut own: HashMap<&str, Vec<&str>> = HashMap::new();
        for p in policies.iter().filter(|p| p.identifier != "*") {
            own.entry(p.product_key.as_str())
                .or_default()
                .push(p.identifier.as_str());
            let ttl = self.policies.ttl(&p.product_key, &p.identifier);
            if ttl > 0 {
                let d = self
                    .db
                    .reap_series(
                        &p.product_key,
                        Some(&p.identifier),
                        &[],
                        now.saturating_sub(ttl),
                    )
                    .await?;
                dropped = (dropped.0 + d.0, dropped.1 + d.1);
            }
        }
        // Every other property, by its product's retention or the server's.
        for pk in self.db.series_products().await? {
            let ttl = self.policies.ttl(&pk, "*");
            if ttl > 0 {
                let except = own.get(pk.as_str()).cloned().unwrap_or_default();
                let d = self
                    .db
                    .reap_series(&pk, None, &except, now.saturating_sub(ttl))
                    .await?;
                dropped = (dropped.0 + d.0, dropped.1 + d.1);
            }
        }
        Metrics::add(&self.metrics.chunks_reaped, dropped.0);
        Ok(dropped)
    }

    /// Sets a policy (validated by the caller) and stores it.
    pub async fn put_policy(&self, p: policy::Policy) -> Result<(), StorageError> {
        self.db.put_storage_policy(&p).await?;
        self.policies.put(p);
        Ok(())
    }

    /// Whether some device of the product reported this property.
    pub async fn product_has_series(&self, pk: &str, id: &str) -> Result<bool, StorageError> {
        Ok(sqlx::query(
            "SELECT 1 FROM property_series WHERE product_key = $1 AND identifier = $2 LIMIT 1",
        )
        .bind(pk)
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?
        .is_some())
    }

    /// Removes a policy; false when there was none.
    pub async fn delete_policy(&self, pk: &str, identifier: &str) -> Result<bool, StorageError> {
        let found = self.db.delete_storage_policy(pk, identifier).await?;
        self.policies.remove(pk, identifier);
        Ok(found)
    }
}

/// A chunk's id and its points.
type Decoded = (i64, Vec<(i64, Value)>);

/// The ids of `items` (id, points) in order, in groups of at least `points` points (the last
/// may hold fewer): one transaction each.
fn groups(items: &[(i64, usize)], points: usize) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    let mut group = Vec::new();
    let mut filled = 0;
    for (id, n) in items {
        group.push(*id);
        filled += n;
        if filled >= points {
            out.push(std::mem::take(&mut group));
            filled = 0;
        }
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// When a series' small chunks (`n < $1`, half of `chunk_points`) are due for a merge: two or
/// more that together hold half a chunk, or `$2` of them.
const DUE: &str =
    "n < $1 GROUP BY series_id HAVING COUNT(*) > 1 AND (SUM(n) >= $1 OR COUNT(*) >= $2)";

/// Series whose small chunks are merged per reaper pass at most.
const COMPACT_SERIES: usize = 1000;

/// Series [`Tsdb::compact_recent`] looks at per call at most (indexed lookups, 500 a query).
const RECENT_SERIES: usize = 20_000;

/// Small chunks of a series that are merged even when they hold less than half a chunk.
const MERGE_COUNT: i64 = 64;

/// Encodes sorted points of one series into chunks of at most `chunk_points` and inserts them
/// in `tx`; returns how many.
async fn insert_chunks(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    sid: i64,
    points: &[(i64, Value)],
    chunk_points: usize,
) -> Result<usize, StorageError> {
    let chunks = encode_chunks(sid, points, chunk_points)?;
    let n = chunks.len();
    for (data, s) in chunks {
        insert_summarised(tx, "property_chunks", &[("series_id", sid)], &s, Some(data)).await?;
    }
    Ok(n)
}

/// A chunk's bytes and statistics.
type Encoded = (Vec<u8>, codec::Stats);

/// A merge of small chunks: the ids read, the series, the chunks made of their points.
type Merge = (Vec<i64>, i64, Vec<Encoded>);

/// Encodes sorted points of one series into chunks of at most `chunk_points`.
fn encode_chunks(
    sid: i64,
    points: &[(i64, Value)],
    chunk_points: usize,
) -> Result<Vec<Encoded>, StorageError> {
    points
        .chunks(chunk_points.clamp(1, codec::MAX_POINTS))
        .map(|part| {
            codec::encode(part).map_err(|e| StorageError::Conflict(format!("series {sid}: {e}")))
        })
        .collect()
}

/// Inserts chunks (series id, statistics, bytes), many per statement: the write lock is held
/// while they go in.
async fn insert_chunk_rows(
    tx: &mut sqlx::AnyConnection,
    engine: crate::storage::Engine,
    rows: Vec<(i64, codec::Stats, Vec<u8>)>,
) -> Result<(), StorageError> {
    /// Rows per statement (10 parameters each at most).
    const ROWS: usize = 100;
    // Two statement shapes, as in `insert_summarised`: no NULL floats.
    let (numeric, other): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| {
        matches!(
            (r.1.min, r.1.max, r.1.sum, r.1.first, r.1.last),
            (Some(_), Some(_), Some(_), Some(_), Some(_))
        )
    });
    for (rows, width) in [(numeric, 10), (other, 5)] {
        let columns = if width == 10 {
            "series_id, start_ts, end_ts, n, vmin, vmax, vsum, vfirst, vlast, data"
        } else {
            "series_id, start_ts, end_ts, n, data"
        };
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let part: Vec<_> = rows.by_ref().take(ROWS).collect();
            let sql = format!(
                "INSERT INTO property_chunks ({columns}) VALUES {}",
                crate::storage::placeholders(engine, part.len(), width)
            );
            let mut q = sqlx::query(&sql);
            for (sid, s, data) in part {
                q = q
                    .bind(sid)
                    .bind(s.start)
                    .bind(s.end)
                    .bind(i64::try_from(s.count).unwrap_or(i64::MAX));
                if width == 10 {
                    for v in [s.min, s.max, s.sum, s.first, s.last] {
                        q = q.bind(v.unwrap_or(0.0));
                    }
                }
                q = q.bind(data);
            }
            q.execute(&mut *tx).await?;
        }
    }
    Ok(())
}

/// Inserts a row of `table` (`property_chunks`, `archive_series`) that summarises points:
/// the `keys` columns, `start_ts`, `end_ts`, `n`, the five statistics columns when `s` has
/// them, and `data` when given.
pub(crate) async fn insert_summarised(
    conn: &mut sqlx::AnyConnection,
    table: &str,
    keys: &[(&str, i64)],
    s: &codec::Stats,
    data: Option<Vec<u8>>,
) -> Result<(), StorageError> {
    // Two statement shapes rather than NULL floats: sqlx's Any driver sends a NULL double to
    // PostgreSQL as a float4, and the cached statement then refuses the float8 of the next
    // numeric row.
    let stats = match (s.min, s.max, s.sum, s.first, s.last) {
        (Some(min), Some(max), Some(sum), Some(first), Some(last)) => {
            Some([min, max, sum, first, last])
        }
        _ => None,
    };
    let mut columns: Vec<&str> = keys.iter().map(|k| k.0).collect();
    columns.extend(["start_ts", "end_ts", "n"]);
    if stats.is_some() {
        columns.extend(["vmin", "vmax", "vsum", "vfirst", "vlast"]);
    }
    if data.is_some() {
        columns.push("data");
    }
    let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        columns.join(", "),
        marks.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for (_, v) in keys {
        q = q.bind(*v);
    }
    q = q.bind(s.start).bind(s.end).bind(s.count as i64);
    for v in stats.into_iter().flatten() {
        q = q.bind(v);
    }
    if let Some(d) = data {
        q = q.bind(d);
    }
    q.execute(conn).await?;
    Ok(())
}

/// The sealer and the reaper, until `stop`.
pub async fn run(tsdb: Arc<Tsdb>, mut stop: watch::Receiver<bool>) {
    let mut seal = tokio::time::interval(tsdb.config.seal_every.max(Duration::from_millis(10)));
    let mut reap = tokio::time::interval(tsdb.config.reap_every.max(Duration::from_millis(10)));
    seal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut archive =
        tokio::time::interval(tsdb.config.archive_every.max(Duration::from_millis(10)));
    archive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let archive_after = tsdb
        .config
        .archive_after
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut reaps = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = archive.tick(), if archive_after.is_some() => {
                let older = archive_after.unwrap_or(i64::MAX);
                match tsdb.archive(crate::registry::now_ms(), older).await {
                    Ok(a) if a.chunks == 0 => {}
                    Ok(a) => tracing::info!(files = a.files, chunks = a.chunks, points = a.points, "archived time series to Parquet"),
                    Err(e) => tracing::warn!(error = %e, "archiving time series failed; the chunks stay and are archived later"),
                }
            }
            _ = async {
                tokio::select! {
                    _ = seal.tick() => {}
                    _ = tsdb.landing_full.notified() => {}
                }
            } => {
                if let Err(e) = tsdb.seal(false).await {
                    tracing::warn!(error = %e, "sealing time series failed; the segments and rows stay and are sealed later");
                }
                match tsdb.compact_recent().await {
                    Ok((0, _)) => {}
                    Ok((before, after)) => tracing::debug!(before, after, "merged small time-series chunks"),
                    Err(e) => tracing::warn!(error = %e, "merging small chunks failed; retried later"),
                }
            }
            _ = reap.tick() => {
                reaps += 1;
                if reaps.is_multiple_of(60) {
                    if let Err(e) = tsdb.resync().await {
                        tracing::warn!(error = %e, "re-reading unsealed series failed; retried later");
                    }
                }
                match tsdb.compact(COMPACT_SERIES).await {
                    Ok((0, _)) => {}
                    Ok((before, after)) => tracing::debug!(before, after, "merged small time-series chunks"),
                    Err(e) => tracing::warn!(error = %e, "merging small chunks failed; retried later"),
                }
                match tsdb.reap(crate::registry::now_ms()).await {
                    Ok((0, 0)) => {}
                    Ok((chunks, rows)) => tracing::info!(chunks, rows, "dropped time series past their retention"),
                    Err(e) => tracing::warn!(error = %e, "dropping expired time series failed; retried later"),
                }
                match tsdb.reap_archive(crate::registry::now_ms()).await {
                    Ok(0) => {}
                    Ok(files) => tracing::info!(files, "dropped archive files past their retention"),
                    Err(e) => tracing::warn!(error = %e, "dropping expired archive files failed; retried later"),
                }
            }
        }
    }
}

impl Db {
    /// Every storage policy.
    pub async fn storage_policies(&self) -> Result<Vec<policy::Policy>, StorageError> {
        let rows = sqlx::query(
            "SELECT product_key, identifier, mode, deadband, interval_ms, ttl_ms, updated_at FROM storage_policies",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let mode: String = r.try_get(2)?;
                let mode = match mode.as_str() {
                    "on_change" => policy::Mode::OnChange {
                        deadband: r.try_get(3)?,
                    },
                    "interval" => policy::Mode::Interval {
                        interval_ms: r.try_get(4)?,
                    },
                    "none" => policy::Mode::None,
                    _ => policy::Mode::All,
                };
                Ok(policy::Policy {
                    product_key: r.try_get(0)?,
                    identifier: r.try_get(1)?,
                    mode,
                    ttl_ms: r.try_get(5)?,
                    updated_at: r.try_get(6)?,
                })
            })
            .collect()
    }

    async fn put_storage_policy(&self, p: &policy::Policy) -> Result<(), StorageError> {
        let (mode, deadband, interval) = match p.mode {
            policy::Mode::All => ("all", 0.0, 0),
            policy::Mode::OnChange { deadband } => ("on_change", deadband, 0),
            policy::Mode::Interval { interval_ms } => ("interval", 0.0, interval_ms),
            policy::Mode::None => ("none", 0.0, 0),
        };
        sqlx::query("INSERT INTO storage_policies (product_key, identifier, mode, deadband, interval_ms, ttl_ms, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (product_key, identifier) DO UPDATE SET mode = excluded.mode, deadband = excluded.deadband, interval_ms = excluded.interval_ms, ttl_ms = excluded.ttl_ms, updated_at = excluded.updated_at")
            .bind(&p.product_key)
            .bind(&p.identifier)
            .bind(mode)
            .bind(deadband)
            .bind(interval)
            .bind(p.ttl_ms)
            .bind(p.updated_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_storage_policy(&self, pk: &str, id: &str) -> Result<bool, StorageError> {
        Ok(
            sqlx::query("DELETE FROM storage_policies WHERE product_key = $1 AND identifier = $2")
                .bind(pk)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Unsealed rows per series.
    async fn hot_counts(&self) -> Result<Vec<(i64, usize)>, StorageError> {
        let rows =
            sqlx::query("SELECT series_id, COUNT(*) FROM property_history GROUP BY series_id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    usize::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// Products that have series.
    async fn series_products(&self) -> Result<Vec<String>, StorageError> {
        let rows = sqlx::query("SELECT DISTINCT product_key FROM property_series")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Drops a product's chunks whose newest point is before `cutoff`, and its rows before it:
    /// of one property, or of every property but `except`.
    async fn reap_series(
        &self,
        pk: &str,
        identifier: Option<&str>,
        except: &[&str],
        cutoff: i64,
    ) -> Result<(u64, u64), StorageError> {
        let mut which = String::from("SELECT id FROM property_series WHERE product_key = $1");
        match identifier {
            Some(_) => which.push_str(" AND identifier = $3"),
            None if !except.is_empty() => {
                let list: Vec<String> = (0..except.len()).map(|i| format!("${}", i + 3)).collect();
                which.push_str(&format!(" AND identifier NOT IN ({})", list.join(", ")));
            }
            None => {}
        }
        let mut dropped = (0, 0);
        for (n, sql) in [
            format!("DELETE FROM property_chunks WHERE end_ts < $2 AND series_id IN ({which})"),
            format!("DELETE FROM property_history WHERE ts < $2 AND series_id IN ({which})"),
        ]
        .iter()
        .enumerate()
        {
            let mut q = sqlx::query(sql).bind(pk).bind(cutoff);
            match identifier {
                Some(id) => q = q.bind(id),
                None => {
                    for e in except {
                        q = q.bind(*e);
                    }
                }
            }
            let rows = q.execute(&self.pool).await?.rows_affected();
            if n == 0 {
                dropped.0 = rows;
            } else {
                dropped.1 = rows;
            }
        }
        Ok(dropped)
    }
}
