//! The archive tier: chunks whose newest point is older than `[timeseries] archive_after` move
//! into Parquet files under the archive directory, partitioned Hive-style by product and UTC day
//! (`product=KEY/day=YYYY-MM-DD/part-*.parquet`), readable by DuckDB, Spark, DataFusion, polars
//! or pyarrow as they are (columns: see `ironlink_analytics::archive`).
//!
//! Why nothing is lost or duplicated by a kill -9:
//! - a step writes its files first (to `*.tmp`, synced, renamed, the directory synced), then in
//!   one transaction deletes the chunks it read and registers the files (`archive_files`,
//!   `archive_series`); queries read registered files only;
//! - a crash before the commit leaves the chunks and an unregistered file, which the next start
//!   removes; after it, the files are registered and the chunks gone;
//! - a chunk merged, reaped or archived by someone else meanwhile makes the delete count come
//!   short: the step rolls back and removes its files.
//!
//! The reaper drops a file (registration first, then the file) once every series in it is past
//! its retention, or when no series is left in it (their devices were deleted).

use super::{codec, Tsdb};
use crate::metrics::Metrics;
use crate::storage::StorageError;
use ironlink_analytics::archive as parquet;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Points one archive step moves at most (one transaction; one file per product and day):
/// bounds the memory a step holds.
const STEP_POINTS: i64 = 500_000;

/// Steps one pass takes at most; the rest waits for the next pass.
const PASS_STEPS: usize = 256;

/// Files the reaper looks at per pass at most.
const REAP_FILES: i64 = 10_000;

/// What an archive pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Archived {
    /// Parquet files written.
    pub files: usize,
    /// Chunks moved into them.
    pub chunks: usize,
    /// Points moved.
    pub points: usize,
}

/// A registered archive file.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ArchiveFile {
    /// Id.
    pub id: i64,
    /// Product key.
    pub product_key: String,
    /// UTC day of its points, `YYYY-MM-DD`.
    pub day: String,
    /// Path, relative to the archive directory.
    pub path: String,
    /// Time of its first point, ms.
    pub start: i64,
    /// Time of its last point, ms.
    pub end: i64,
    /// Points.
    pub points: i64,
    /// Size, bytes.
    pub bytes: i64,
    /// When it was written, ms.
    pub created_at: i64,
}

/// One series' part of an archive file, as a query sees it.
#[derive(Debug, Clone)]
pub(super) struct FileMeta {
    pub id: i64,
    pub path: String,
    pub start: i64,
    pub end: i64,
    pub n: i64,
    pub stats: Option<Summary>,
}

/// A chunk read for archiving.
struct Taken {
    id: i64,
    series: i64,
    n: i64,
}

/// A file written by a step, not yet registered.
struct Written {
    rel: String,
    day: String,
    start: i64,
    end: i64,
    points: usize,
    bytes: u64,
    /// Per series: its statistics in this file.
    series: Vec<(i64, codec::Stats)>,
}

/// A product key as a path segment: letters, digits, `-`, `_` and `.` as they are, every other
/// byte as `%XX` (product keys are generated alphanumeric; this guards the rest).
fn segment(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_')
            || (b == b'.' && !key.starts_with('.'))
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// min, max, sum, first, last of numeric values.
pub(super) type Summary = (f64, f64, f64, f64, f64);

/// The statistics columns, or none when any is missing.
fn stats_of(r: &sqlx::any::AnyRow, at: usize) -> Result<Option<Summary>, sqlx::Error> {
    Ok(
        match (
            r.try_get::<Option<f64>, _>(at)?,
            r.try_get::<Option<f64>, _>(at + 1)?,
            r.try_get::<Option<f64>, _>(at + 2)?,
            r.try_get::<Option<f64>, _>(at + 3)?,
            r.try_get::<Option<f64>, _>(at + 4)?,
        ) {
            (Some(a), Some(b), Some(c), Some(d), Some(e)) => Some((a, b, c, d, e)),
            _ => None,
        },
    )
}

fn io_error(what: &str, path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Conflict(format!("archive: {what} {}: {e}", path.display()))
}

/// Syncs a directory, so that a rename inside it survives a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Tsdb {
    /// The archive directory, when archiving is configured.
    pub fn archive_dir(&self) -> Option<&Path> {
        self.config.archive_dir.as_deref()
    }

    /// Moves chunks whose newest point is before `now - older_than` (ms) into Parquet files,
    /// a step at a time, until none is left or the pass has taken its steps. One archiver per
    /// archive directory.
    pub async fn archive(&self, now: i64, older_than: i64) -> Result<Archived, StorageError> {
        let Some(dir) = self.archive_dir().map(Path::to_path_buf) else {
            return Err(StorageError::Conflict(
                "no archive directory: set [timeseries] archive_dir (the server defaults it to {data_dir}/archive)".into(),
            ));
        };
        let cutoff = now.saturating_sub(older_than.max(0));
        let mut total = Archived::default();
        // Chunks that could not be decoded: left where they are, reported by queries.
        let mut damaged: HashSet<i64> = HashSet::new();
        for _ in 0..PASS_STEPS {
            let Some(done) = self.archive_step(&dir, cutoff, &mut damaged).await? else {
                break;
            };
            total.files += done.files;
            total.chunks += done.chunks;
            total.points += done.points;
        }
        Ok(total)
    }

    async fn archive_step(
        &self,
        dir: &Path,
        cutoff: i64,
        damaged: &mut HashSet<i64>,
    ) -> Result<Option<Archived>, StorageError> {
        let skip = i64::try_from(damaged.len()).unwrap_or(i64::MAX);
        // Chunks of one product, the oldest first, up to STEP_POINTS (at least one).
        let rows = sqlx::query(
            "SELECT c.id, c.series_id, c.n, s.product_key, s.device_name, s.identifier FROM property_chunks c JOIN property_series s ON s.id = c.series_id WHERE c.end_ts < $1 ORDER BY s.product_key, c.start_ts LIMIT $2",
        )
        .bind(cutoff)
        .bind(4096_i64.saturating_add(skip))
        .fetch_all(&self.db.pool)
        .await?;
        let mut product: Option<String> = None;
        let mut taken: Vec<Taken> = Vec::new();
        let mut names: HashMap<i64, (String, String)> = HashMap::new();
        let mut points = 0i64;
        for r in &rows {
            let (id, series, n): (i64, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let pk: String = r.try_get(3)?;
            if damaged.contains(&id) {
                continue;
            }
            if product.as_ref().is_some_and(|p| *p != pk) {
                break;
            }
            if !taken.is_empty() && points.saturating_add(n) > STEP_POINTS {
                break;
            }
            product.get_or_insert(pk);
            names
                .entry(series)
                .or_insert((r.try_get(4)?, r.try_get(5)?));
            points = points.saturating_add(n);
            taken.push(Taken { id, series, n });
        }
        let Some(pk) = product else {
            return Ok(None);
        };
        // Decode; group points by UTC day.
        let mut days: BTreeMap<String, Vec<(i64, i64, Value)>> = BTreeMap::new();
        let mut moved: Vec<&Taken> = Vec::with_capacity(taken.len());
        for group in taken.chunks(64) {
            let mut datas = self.chunk_datas(group.iter().map(|t| t.id)).await?;
            for t in group {
                // Gone since it was listed (merged, reaped): the next step sees what replaced it.
                let Some(data) = datas.remove(&t.id) else {
                    continue;
                };
                match codec::decode(&data) {
                    Ok(decoded) => {
                        for (ts, v) in decoded {
                            days.entry(parquet::day(ts))
                                .or_default()
                                .push((t.series, ts, v));
                        }
                        moved.push(t);
                    }
                    Err(e) => {
                        tracing::error!(series = t.series, chunk = t.id, error = %e, "a time-series chunk could not be decoded; it is not archived");
                        damaged.insert(t.id);
                    }
                }
            }
        }
        if moved.is_empty() {
            // Everything listed was damaged or gone: the next step lists the rest.
            return Ok(Some(Archived::default()));
        }
        let created = crate::registry::now_ms();
        let files = {
            let (dir, pk) = (dir.to_path_buf(), pk.clone());
            tokio::task::spawn_blocking(move || write_files(&dir, &pk, created, days, &names))
                .await
                .map_err(|e| {
                    StorageError::Conflict(format!("archive: writing files failed: {e}"))
                })??
        };
        match self.register(&pk, created, &moved, &files).await {
            Ok(()) => {}
            Err(e) => {
                for f in &files {
                    let _ = std::fs::remove_file(dir.join(&f.rel));
                }
                return Err(e);
            }
        }
        let done = Archived {
            files: files.len(),
            chunks: moved.len(),
            points: files.iter().map(|f| f.points).sum(),
        };
        Metrics::add(&self.metrics.points_archived, done.points as u64);
        Metrics::add(&self.metrics.archive_files_written, done.files as u64);
        tracing::debug!(product = %pk, files = done.files, chunks = done.chunks, points = done.points, "archived time-series chunks");
        Ok(Some(done))
    }

    /// Deletes the chunks and registers the files, in one transaction; a chunk that is gone
    /// makes it roll back (the caller removes the files).
    async fn register(
        &self,
        pk: &str,
        created: i64,
        moved: &[&Taken],
        files: &[Written],
    ) -> Result<(), StorageError> {
        let mut tx = self.db.write_tx().await?;
        let mut gone = 0u64;
        for t in moved {
            gone += sqlx::query("DELETE FROM property_chunks WHERE id = $1")
                .bind(t.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if gone != moved.len() as u64 {
            tx.rollback().await?;
            return Err(StorageError::Conflict(format!(
                "archive: {} of {} chunks of `{pk}` changed meanwhile; they are archived on a later pass",
                moved.len() as u64 - gone,
                moved.len()
            )));
        }
        let expected: i64 = moved.iter().map(|t| t.n).sum();
        let written: usize = files.iter().map(|f| f.points).sum();
        if expected != written as i64 {
            tx.rollback().await?;
            return Err(StorageError::Conflict(format!(
                "archive: chunks of `{pk}` say {expected} points, {written} were written; nothing moved"
            )));
        }
        for f in files {
            let row = sqlx::query("INSERT INTO archive_files (product_key, day, path, start_ts, end_ts, points, bytes, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id")
                .bind(pk)
                .bind(&f.day)
                .bind(&f.rel)
                .bind(f.start)
                .bind(f.end)
                .bind(f.points as i64)
                .bind(i64::try_from(f.bytes).unwrap_or(i64::MAX))
                .bind(created)
                .fetch_one(&mut *tx)
                .await?;
            let file_id: i64 = row.try_get(0)?;
            for (sid, s) in &f.series {
                super::insert_summarised(
                    &mut tx,
                    "archive_series",
                    &[("file_id", file_id), ("series_id", *sid)],
                    s,
                    None,
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes files in the archive directory that no registration names: left by a crash
    /// between writing and committing. Run at start, before any step.
    pub async fn sweep_archive(&self) -> Result<usize, StorageError> {
        let Some(dir) = self.archive_dir().map(Path::to_path_buf) else {
            return Ok(0);
        };
        let known: HashSet<String> = sqlx::query("SELECT path FROM archive_files")
            .fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        tokio::task::spawn_blocking(move || sweep(&dir, &known))
            .await
            .map_err(|e| StorageError::Conflict(format!("archive: sweeping failed: {e}")))?
    }

    /// Drops archive files whose every series is past its retention, and files no series is
    /// left in; returns how many.
    pub async fn reap_archive(&self, now: i64) -> Result<u64, StorageError> {
        let Some(dir) = self.archive_dir().map(Path::to_path_buf) else {
            return Ok(0);
        };
        let shortest = self
            .policies
            .list(None)
            .iter()
            .filter_map(|p| p.ttl_ms)
            .chain([self.policies.default_ttl()])
            .filter(|t| *t > 0)
            .min();
        let mut candidates: Vec<(i64, String)> = Vec::new();
        // Files with no series left.
        for r in sqlx::query("SELECT f.id, f.path FROM archive_files f WHERE NOT EXISTS (SELECT 1 FROM archive_series a WHERE a.file_id = f.id) LIMIT $1")
            .bind(REAP_FILES)
            .fetch_all(&self.db.pool)
            .await?
        {
            candidates.push((r.try_get(0)?, r.try_get(1)?));
        }
        if let Some(ttl) = shortest {
            let rows = sqlx::query(
                "SELECT id, path FROM archive_files WHERE end_ts < $1 ORDER BY end_ts LIMIT $2",
            )
            .bind(now.saturating_sub(ttl))
            .bind(REAP_FILES)
            .fetch_all(&self.db.pool)
            .await?;
            for r in &rows {
                let (id, path): (i64, String) = (r.try_get(0)?, r.try_get(1)?);
                let series = sqlx::query("SELECT s.product_key, s.identifier, a.end_ts FROM archive_series a JOIN property_series s ON s.id = a.series_id WHERE a.file_id = $1")
                    .bind(id)
                    .fetch_all(&self.db.pool)
                    .await?;
                let mut expired = true;
                for s in &series {
                    let (pk, ident, end): (String, String, i64) =
                        (s.try_get(0)?, s.try_get(1)?, s.try_get(2)?);
                    let ttl = self.policies.ttl(&pk, &ident);
                    if ttl == 0 || end >= now.saturating_sub(ttl) {
                        expired = false;
                        break;
                    }
                }
                if expired && !series.is_empty() {
                    candidates.push((id, path));
                }
            }
        }
        let mut dropped = 0;
        for (id, path) in candidates {
            let mut tx = self.db.write_tx().await?;
            sqlx::query("DELETE FROM archive_series WHERE file_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let gone = sqlx::query("DELETE FROM archive_files WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            if gone == 0 {
                continue;
            }
            // After the commit: a crash here leaves an unregistered file for the next sweep.
            let full = dir.join(&path);
            match std::fs::remove_file(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %full.display(), error = %e, "an expired archive file could not be removed; the next start sweeps it")
                }
            }
            if let Some(parent) = full.parent() {
                // Only when empty; the day's other files keep it.
                let _ = std::fs::remove_dir(parent);
            }
            dropped += 1;
        }
        Metrics::add(&self.metrics.archive_files_dropped, dropped);
        Ok(dropped)
    }

    /// Registered archive files, newest first, of one product or all.
    pub async fn archive_files(
        &self,
        product: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ArchiveFile>, StorageError> {
        let mut sql = String::from(
            "SELECT id, product_key, day, path, start_ts, end_ts, points, bytes, created_at FROM archive_files",
        );
        if product.is_some() {
            sql.push_str(" WHERE product_key = $2");
        }
        sql.push_str(" ORDER BY end_ts DESC, id DESC LIMIT $1");
        let mut q = sqlx::query(&sql).bind(limit);
        if let Some(p) = product {
            q = q.bind(p);
        }
        q.fetch_all(&self.db.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ArchiveFile {
                    id: r.try_get(0)?,
                    product_key: r.try_get(1)?,
                    day: r.try_get(2)?,
                    path: r.try_get(3)?,
                    start: r.try_get(4)?,
                    end: r.try_get(5)?,
                    points: r.try_get(6)?,
                    bytes: r.try_get(7)?,
                    created_at: r.try_get(8)?,
                })
            })
            .collect()
    }

    /// The parts of archive files holding a series in `[from, to]`.
    pub(super) async fn file_metas(
        &self,
        series: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<FileMeta>, StorageError> {
        let rows = sqlx::query("SELECT f.id, f.path, a.start_ts, a.end_ts, a.n, a.vmin, a.vmax, a.vsum, a.vfirst, a.vlast FROM archive_series a JOIN archive_files f ON f.id = a.file_id WHERE a.series_id = $1 AND a.end_ts >= $2 AND a.start_ts <= $3")
            .bind(series)
            .bind(from)
            .bind(to)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(FileMeta {
                    id: r.try_get(0)?,
                    path: r.try_get(1)?,
                    start: r.try_get(2)?,
                    end: r.try_get(3)?,
                    n: r.try_get(4)?,
                    stats: stats_of(r, 5)?,
                })
            })
            .collect()
    }

    /// The points of one device's property in `[from, to]` from one archive file; the reason
    /// when it cannot be read.
    pub(super) async fn read_archived(
        &self,
        file: &FileMeta,
        device: &str,
        property: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, Value)>, String> {
        let Some(dir) = self.archive_dir() else {
            return Err("archiving is not configured".into());
        };
        let path = dir.join(&file.path);
        let (device, property) = (device.to_owned(), property.to_owned());
        // polars may panic on a file it cannot make sense of: that panic ends this task only.
        match tokio::task::spawn_blocking(move || {
            parquet::read(&path, &device, &property, from, to)
        })
        .await
        {
            Ok(Ok(points)) => Ok(points),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("reading the file failed: {e}")),
        }
    }
}

/// Writes one Parquet file per day of `days` under `dir`, durable before it returns.
fn write_files(
    dir: &Path,
    pk: &str,
    created: i64,
    days: BTreeMap<String, Vec<(i64, i64, Value)>>,
    names: &HashMap<i64, (String, String)>,
) -> Result<Vec<Written>, StorageError> {
    let mut out: Vec<Written> = Vec::new();
    let tag: u32 = rand::random();
    for (day, mut points) in days {
        let rel = format!(
            "product={}/day={day}/part-{created}-{tag:08x}.parquet",
            segment(pk)
        );
        let full = dir.join(&rel);
        let tmp = full.with_extension("parquet.tmp");
        let result = (|| -> Result<Written, StorageError> {
            let parent = full.parent().unwrap_or(dir);
            std::fs::create_dir_all(parent).map_err(|e| io_error("creating", parent, e))?;
            points.sort_by_key(|p| (p.0, p.1));
            let mut series = Vec::new();
            let mut start = 0;
            while start < points.len() {
                let sid = points[start].0;
                let end = points[start..]
                    .iter()
                    .position(|p| p.0 != sid)
                    .map_or(points.len(), |k| start + k);
                let part: Vec<(i64, Value)> = points[start..end]
                    .iter()
                    .map(|p| (p.1, p.2.clone()))
                    .collect();
                series.push((sid, codec::stats(&part)));
                start = end;
            }
            let rows: Vec<parquet::Point<'_>> = points
                .iter()
                .filter_map(|(sid, ts, v)| {
                    names.get(sid).map(|(dn, id)| parquet::Point {
                        device: dn,
                        property: id,
                        ts: *ts,
                        value: v,
                    })
                })
                .collect();
            let bytes = parquet::write(&tmp, &rows).map_err(|e| io_error("writing", &tmp, e))?;
            std::fs::rename(&tmp, &full).map_err(|e| io_error("renaming", &tmp, e))?;
            sync_dir(parent).map_err(|e| io_error("syncing", parent, e))?;
            Ok(Written {
                rel: rel.clone(),
                day: day.clone(),
                start: points.iter().map(|p| p.1).min().unwrap_or(0),
                end: points.iter().map(|p| p.1).max().unwrap_or(0),
                points: rows.len(),
                bytes,
                series,
            })
        })();
        match result {
            Ok(w) => out.push(w),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                for w in &out {
                    let _ = std::fs::remove_file(dir.join(&w.rel));
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Removes unregistered `*.parquet` and every `*.tmp` under `dir`.
fn sweep(dir: &Path, known: &HashSet<String>) -> Result<usize, StorageError> {
    let mut removed = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("listing", &d, e)),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let rel = path
                .strip_prefix(dir)
                .ok()
                .and_then(|p| p.to_str())
                .map(|p| p.replace(std::path::MAIN_SEPARATOR, "/"))
                .unwrap_or_default();
            let orphan = name.ends_with(".parquet.tmp")
                || (name.ends_with(".parquet") && !known.contains(&rel));
            if orphan {
                tracing::info!(path = %path.display(), "removing an archive file no registration names (left by a crash before its commit)");
                std::fs::remove_file(&path).map_err(|e| io_error("removing", &path, e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_keys_become_safe_path_segments() {
        assert_eq!(segment("a1B2_c-3"), "a1B2_c-3");
        assert_eq!(segment("../x"), "%2E%2E%2Fx");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment("v1.2"), "v1.2");
    }
}
