//! Queries over rows and chunks together: raw ranges in pages, the value at a time, and
//! aggregates per interval. A damaged chunk is reported with its series and skipped; the rest
//! of the answer stands.

use super::archive::FileMeta;
use super::codec::{self, numeric};
use super::Tsdb;
use crate::metrics::Metrics;
use crate::storage::StorageError;
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Buckets one aggregate query may produce at most.
pub const MAX_BUCKETS: i64 = 100_000;

/// A chunk or archive file that could not be read.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Damaged {
    /// Series id.
    pub series: i64,
    /// Chunk id, or the archive file's id when `file` is given, or the landing segment's id
    /// when `segment` is true.
    pub chunk: i64,
    /// The archive file (relative to the archive directory) when the damage is there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// True when the damage is in a landing segment (points of several series, this one's
    /// among them or not, not sealed yet).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub segment: bool,
    /// Its time span, ms.
    pub start: i64,
    /// End of its time span, ms.
    pub end: i64,
    /// What is wrong.
    pub reason: String,
}

/// Where a page starts: the time of its first point and how many points at that time the
/// earlier pages returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Time, ms.
    pub ts: i64,
    /// Points at `ts` to skip.
    pub skip: usize,
}

impl Cursor {
    /// Parses `ts:skip`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ts, skip) = s.split_once(':')?;
        Some(Self {
            ts: ts.parse().ok()?,
            skip: skip.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ts, self.skip)
    }
}

/// A page of points.
#[derive(Debug, Default)]
pub struct Page {
    /// Points, ordered as asked.
    pub points: Vec<(i64, Value)>,
    /// Where the next page starts, when there may be one.
    pub next: Option<Cursor>,
    /// Chunks skipped because they could not be decoded.
    pub damaged: Vec<Damaged>,
}

/// Aggregates of one interval. Figures other than `count` cover numeric (and boolean) values.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Bucket {
    /// Start of the interval, ms (a multiple of the interval since the epoch).
    pub time: i64,
    /// Points.
    pub count: u64,
    /// Mean.
    pub avg: Option<f64>,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Sum.
    pub sum: Option<f64>,
    /// Value of the earliest point.
    pub first: Option<f64>,
    /// Value of the latest point.
    pub last: Option<f64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Acc {
    count: u64,
    numbers: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: Option<(i64, f64)>,
    last: Option<(i64, f64)>,
}

impl Acc {
    fn add_count(&mut self, n: u64) {
        self.count += n;
    }

    fn add(&mut self, ts: i64, v: f64) {
        self.count += 1;
        self.merge_numbers(1, v, v, v, (ts, v), (ts, v));
    }

    #[allow(clippy::too_many_arguments)]
    fn merge_numbers(
        &mut self,
        n: u64,
        sum: f64,
        min: f64,
        max: f64,
        first: (i64, f64),
        last: (i64, f64),
    ) {
        if self.numbers == 0 {
            self.min = min;
            self.max = max;
        } else {
            self.min = self.min.min(min);
            self.max = self.max.max(max);
        }
        self.numbers += n;
        self.sum += sum;
        if self.first.is_none_or(|f| first.0 < f.0) {
            self.first = Some(first);
        }
        if self.last.is_none_or(|l| last.0 >= l.0) {
            self.last = Some(last);
        }
    }

    fn merge(&mut self, o: &Acc) {
        self.count += o.count;
        if let (Some(first), Some(last)) = (o.first, o.last) {
            self.merge_numbers(o.numbers, o.sum, o.min, o.max, first, last);
        }
    }

    fn bucket(&self, time: i64) -> Bucket {
        let has = self.numbers > 0;
        Bucket {
            time,
            count: self.count,
            avg: has.then(|| self.sum / self.numbers as f64),
            min: has.then_some(self.min),
            max: has.then_some(self.max),
            sum: has.then_some(self.sum),
            first: self.first.map(|f| f.1),
            last: self.last.map(|l| l.1),
        }
    }
}

/// Sorts points by time; points at the same time by their JSON text, so that every reader sees
/// them in one order wherever they are stored (pages depend on it).
pub fn order(points: &mut [(i64, Value)]) {
    points.sort_by(|a, b| cmp_points(a, b, true));
}

fn cmp_points(a: &(i64, Value), b: &(i64, Value), ascending: bool) -> Ordering {
    let o =
        a.0.cmp(&b.0)
            .then_with(|| a.1.to_string().cmp(&b.1.to_string()));
    if ascending {
        o
    } else {
        o.reverse()
    }
}

struct ChunkMeta {
    id: i64,
    start: i64,
    end: i64,
    n: i64,
    stats: Option<(f64, f64, f64, f64, f64)>,
}

/// Where some of a series' points are: a chunk, or its part of an archive file.
enum Source {
    Chunk(ChunkMeta),
    File(FileMeta),
}

impl Source {
    fn span(&self) -> (i64, i64, i64) {
        match self {
            Source::Chunk(c) => (c.start, c.end, c.n),
            Source::File(f) => (f.start, f.end, f.n),
        }
    }
}

impl Tsdb {
    /// The id of a series, `None` when it never had a value.
    pub async fn series_id(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
    ) -> Result<Option<i64>, StorageError> {
        let row = sqlx::query("SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2 AND identifier = $3")
            .bind(pk)
            .bind(dn)
            .bind(identifier)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// The points of a series in `[from, to]` that wait in landing segments, unordered, and
    /// the damaged segments of that span.
    pub(super) async fn landed(
        &self,
        series: i64,
        from: i64,
        to: i64,
    ) -> Result<(Vec<(i64, Value)>, Vec<Damaged>), StorageError> {
        let rows = sqlx::query_as::<_, (i64, i64, i64, Vec<u8>)>(
            "SELECT id, min_ts, max_ts, data FROM property_segments WHERE max_ts >= $1 AND min_ts <= $2",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.db.pool)
        .await?;
        let mut points = Vec::new();
        let mut damaged = Vec::new();
        for (id, start, end, data) in &rows {
            match super::segment::Segment::parse(data) {
                Ok(seg) => points.extend(
                    seg.of(series, from, to)
                        .map(|(ts, text)| (ts, codec::stored_value(text))),
                ),
                Err(e) => {
                    tracing::error!(series, segment = id, error = %e, "a landing segment could not be read; skipped");
                    damaged.push(Damaged {
                        series,
                        chunk: *id,
                        file: None,
                        segment: true,
                        start: *start,
                        end: *end,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok((points, damaged))
    }

    /// The first and last time of a series' points: archive, chunks, rows and the landed
    /// points given.
    async fn extent(
        &self,
        series: i64,
        landed: &[(i64, Value)],
    ) -> Result<Option<(i64, i64)>, StorageError> {
        let mut span: Option<(i64, i64)> = landed.iter().fold(None, |span, p| {
            Some(span.map_or((p.0, p.0), |(a, b): (i64, i64)| (a.min(p.0), b.max(p.0))))
        });
        for sql in [
            "SELECT MIN(start_ts), MAX(end_ts) FROM archive_series WHERE series_id = $1",
            "SELECT MIN(start_ts), MAX(end_ts) FROM property_chunks WHERE series_id = $1",
            "SELECT MIN(ts), MAX(ts) FROM property_history WHERE series_id = $1",
        ] {
            let r = sqlx::query(sql)
                .bind(series)
                .fetch_one(&self.db.pool)
                .await?;
            if let (Some(a), Some(b)) = (
                r.try_get::<Option<i64>, _>(0)?,
                r.try_get::<Option<i64>, _>(1)?,
            ) {
                span = Some(span.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
            }
        }
        Ok(span)
    }

    /// The earliest time a query may show for this property (retention), ms.
    fn floor(&self, pk: &str, identifier: &str, now: i64) -> i64 {
        match self.policies.ttl(pk, identifier) {
            0 => i64::MIN,
            ttl => now.saturating_sub(ttl),
        }
    }

    async fn metas(
        &self,
        series: i64,
        from: i64,
        to: i64,
        ascending: bool,
    ) -> Result<Vec<ChunkMeta>, StorageError> {
        let order = if ascending {
            "start_ts ASC"
        } else {
            "end_ts DESC"
        };
        let rows = sqlx::query(&format!("SELECT id, start_ts, end_ts, n, vmin, vmax, vsum, vfirst, vlast FROM property_chunks WHERE series_id = $1 AND end_ts >= $2 AND start_ts <= $3 ORDER BY {order}"))
            .bind(series)
            .bind(from)
            .bind(to)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let stats = match (
                    r.try_get::<Option<f64>, _>(4)?,
                    r.try_get::<Option<f64>, _>(5)?,
                    r.try_get::<Option<f64>, _>(6)?,
                    r.try_get::<Option<f64>, _>(7)?,
                    r.try_get::<Option<f64>, _>(8)?,
                ) {
                    (Some(a), Some(b), Some(c), Some(d), Some(e)) => Some((a, b, c, d, e)),
                    _ => None,
                };
                Ok(ChunkMeta {
                    id: r.try_get(0)?,
                    start: r.try_get(1)?,
                    end: r.try_get(2)?,
                    n: r.try_get(3)?,
                    stats,
                })
            })
            .collect()
    }

    async fn chunk_data(&self, id: i64) -> Result<Vec<u8>, StorageError> {
        let row = sqlx::query("SELECT data FROM property_chunks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?;
        // Reaped since its metadata was read: nothing left to show.
        Ok(match row {
            Some(r) => r.try_get(0)?,
            None => Vec::new(),
        })
    }

    /// The bytes of several chunks, by id (those reaped meanwhile are absent).
    pub(super) async fn chunk_datas(
        &self,
        ids: impl ExactSizeIterator<Item = i64>,
    ) -> Result<std::collections::HashMap<i64, Vec<u8>>, StorageError> {
        let list: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT id, data FROM property_chunks WHERE id IN ({})",
            list.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&self.db.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    fn damaged(&self, series: i64, m: &ChunkMeta, e: &codec::CodecError) -> Damaged {
        tracing::error!(series, chunk = m.id, start = m.start, end = m.end, error = %e, "a time-series chunk could not be decoded; skipped");
        Metrics::inc(&self.metrics.chunks_damaged);
        Damaged {
            series,
            chunk: m.id,
            file: None,
            segment: false,
            start: m.start,
            end: m.end,
            reason: e.to_string(),
        }
    }

    fn damaged_file(&self, series: i64, f: &FileMeta, reason: String) -> Damaged {
        tracing::error!(series, file = %f.path, start = f.start, end = f.end, error = %reason, "an archive file could not be read; skipped");
        Metrics::inc(&self.metrics.chunks_damaged);
        Damaged {
            series,
            chunk: f.id,
            file: Some(f.path.clone()),
            segment: false,
            start: f.start,
            end: f.end,
            reason,
        }
    }

    /// Points of one property in `[from, to]`, at most `limit`, from `cursor` on.
    #[allow(clippy::too_many_arguments)]
    pub async fn range(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
        from: i64,
        to: i64,
        limit: usize,
        ascending: bool,
        cursor: Option<Cursor>,
    ) -> Result<Page, StorageError> {
        let Some(series) = self.series_id(pk, dn, identifier).await? else {
            return Ok(Page::default());
        };
        let floor = self.floor(pk, identifier, crate::registry::now_ms());
        let (mut from, mut to) = (from.max(floor), to);
        let skip = cursor.map_or(0, |c| c.skip);
        if let Some(c) = cursor {
            if ascending {
                from = from.max(c.ts);
            } else {
                to = to.min(c.ts);
            }
        }
        if from > to || limit == 0 {
            return Ok(Page::default());
        }
        let want = limit.saturating_add(skip);
        let order = if ascending { "ASC" } else { "DESC" };
        let rows = sqlx::query(&format!("SELECT ts, value FROM property_history WHERE series_id = $1 AND ts >= $2 AND ts <= $3 ORDER BY ts {order} LIMIT $4"))
            .bind(series)
            .bind(from)
            .bind(to)
            .bind(i64::try_from(want).unwrap_or(i64::MAX))
            .fetch_all(&self.db.pool)
            .await?;
        let (mut points, damaged) = self.landed(series, from, to).await?;
        for r in &rows {
            let text: String = r.try_get(1)?;
            points.push((r.try_get(0)?, codec::stored_value(&text)));
        }
        points.sort_by(|a, b| cmp_points(a, b, ascending));
        points.truncate(want);
        let mut page = Page {
            damaged,
            ..Page::default()
        };
        let mut sources: Vec<Source> = self
            .metas(series, from, to, ascending)
            .await?
            .into_iter()
            .map(Source::Chunk)
            .chain(
                self.file_metas(series, from, to)
                    .await?
                    .into_iter()
                    .map(Source::File),
            )
            .collect();
        if ascending {
            sources.sort_by_key(|s| s.span().0);
        } else {
            sources.sort_by_key(|s| std::cmp::Reverse(s.span().1));
        }
        for m in sources {
            let (start, end, n) = m.span();
            if let Some(edge) = points.get(want.saturating_sub(1)) {
                let beyond = if ascending {
                    start > edge.0
                } else {
                    end < edge.0
                };
                if points.len() >= want && beyond {
                    break;
                }
            }
            match &m {
                Source::Chunk(c) => match codec::decode(&self.chunk_data(c.id).await?) {
                    Ok(decoded) => {
                        points.extend(decoded.into_iter().filter(|p| p.0 >= from && p.0 <= to))
                    }
                    Err(e) if n > 0 => page.damaged.push(self.damaged(series, c, &e)),
                    Err(_) => {}
                },
                Source::File(f) => match self.read_archived(f, dn, identifier, from, to).await {
                    Ok(read) => points.extend(read),
                    Err(reason) => page.damaged.push(self.damaged_file(series, f, reason)),
                },
            }
            points.sort_by(|a, b| cmp_points(a, b, ascending));
            points.truncate(want);
        }
        // The points at the cursor's time that earlier pages returned.
        let mut skipped = 0;
        let start_ts = cursor.map(|c| c.ts);
        points.retain(|p| {
            if Some(p.0) == start_ts && skipped < skip {
                skipped += 1;
                false
            } else {
                true
            }
        });
        points.truncate(limit);
        if points.len() >= limit {
            if let Some(last) = points.last() {
                let at_last = points.iter().filter(|p| p.0 == last.0).count();
                let before = if Some(last.0) == start_ts { skip } else { 0 };
                page.next = Some(Cursor {
                    ts: last.0,
                    skip: at_last + before,
                });
            }
        }
        page.points = points;
        Ok(page)
    }

    /// The newest point at or before `at`.
    pub async fn value_at(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
        at: i64,
    ) -> Result<(Option<(i64, Value)>, Vec<Damaged>), StorageError> {
        let page = self
            .range(pk, dn, identifier, i64::MIN, at, 1, false, None)
            .await?;
        Ok((page.points.into_iter().next(), page.damaged))
    }

    /// Aggregates of one property per `interval` ms over `[from, to]`; buckets without points
    /// are left out. Whole chunks inside one bucket are summarised from their statistics.
    pub async fn aggregate(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
        from: i64,
        to: i64,
        interval: i64,
    ) -> Result<(Vec<Bucket>, Vec<Damaged>), StorageError> {
        let Some(series) = self.series_id(pk, dn, identifier).await? else {
            return Ok((Vec::new(), Vec::new()));
        };
        let from = from.max(self.floor(pk, identifier, crate::registry::now_ms()));
        if from > to {
            return Ok((Vec::new(), Vec::new()));
        }
        let (landed, mut damaged) = self.landed(series, from, to).await?;
        // Buckets are counted over the span the series has points in, not the span asked.
        let Some((first, last)) = self.extent(series, &landed).await? else {
            return Ok((Vec::new(), damaged));
        };
        let n = buckets(from.max(first), to.min(last), interval);
        if n > MAX_BUCKETS {
            return Err(StorageError::TooLarge(format!(
                "{n} buckets of {interval} ms over the points of `{pk}/{dn}` `{identifier}` between {} and {}: at most {MAX_BUCKETS}; choose a larger interval or a shorter range",
                from.max(first),
                to.min(last)
            )));
        }
        let bucket_of = |ts: i64| ts.div_euclid(interval) * interval;
        let mut acc: BTreeMap<i64, Acc> = BTreeMap::new();
        for (t, v) in &landed {
            fold(acc.entry(bucket_of(*t)).or_default(), *t, v);
        }
        let mut decode = Vec::new();
        for m in self.metas(series, from, to, true).await? {
            if let Some((min, max, sum, first, last)) = m.stats {
                if m.start >= from && m.end <= to && bucket_of(m.start) == bucket_of(m.end) {
                    let a = acc.entry(bucket_of(m.start)).or_default();
                    let n = u64::try_from(m.n).unwrap_or(0);
                    a.add_count(n);
                    a.merge_numbers(n, sum, min, max, (m.start, first), (m.end, last));
                    continue;
                }
            }
            decode.push(m);
        }
        for group in decode.chunks(64) {
            let mut datas = self.chunk_datas(group.iter().map(|m| m.id)).await?;
            for m in group {
                // Reaped since its metadata was read: nothing left to count.
                let Some(data) = datas.remove(&m.id) else {
                    continue;
                };
                match codec::decode_numbers(&data) {
                    Ok(Some((ts, vals))) => {
                        // Points come sorted: fold each bucket's run locally, then merge once.
                        let mut run: Option<(i64, Acc)> = None;
                        for (t, v) in ts.into_iter().zip(vals) {
                            if t < from || t > to {
                                continue;
                            }
                            let b = bucket_of(t);
                            match &mut run {
                                Some((rb, a)) if *rb == b => a.add(t, v),
                                _ => {
                                    if let Some((rb, a)) = run.take() {
                                        acc.entry(rb).or_default().merge(&a);
                                    }
                                    let mut a = Acc::default();
                                    a.add(t, v);
                                    run = Some((b, a));
                                }
                            }
                        }
                        if let Some((rb, a)) = run {
                            acc.entry(rb).or_default().merge(&a);
                        }
                    }
                    Ok(None) => match codec::decode(&data) {
                        Ok(points) => {
                            for (t, v) in points.iter().filter(|p| p.0 >= from && p.0 <= to) {
                                fold(acc.entry(bucket_of(*t)).or_default(), *t, v);
                            }
                        }
                        Err(e) => damaged.push(self.damaged(series, m, &e)),
                    },
                    Err(e) => damaged.push(self.damaged(series, m, &e)),
                }
            }
        }
        for f in self.file_metas(series, from, to).await? {
            if let Some((min, max, sum, first, last)) = f.stats {
                if f.start >= from && f.end <= to && bucket_of(f.start) == bucket_of(f.end) {
                    let a = acc.entry(bucket_of(f.start)).or_default();
                    let n = u64::try_from(f.n).unwrap_or(0);
                    a.add_count(n);
                    a.merge_numbers(n, sum, min, max, (f.start, first), (f.end, last));
                    continue;
                }
            }
            match self.read_archived(&f, dn, identifier, from, to).await {
                Ok(points) => {
                    for (t, v) in &points {
                        fold(acc.entry(bucket_of(*t)).or_default(), *t, v);
                    }
                }
                Err(reason) => damaged.push(self.damaged_file(series, &f, reason)),
            }
        }
        let rows = sqlx::query(
            "SELECT ts, value FROM property_history WHERE series_id = $1 AND ts >= $2 AND ts <= $3",
        )
        .bind(series)
        .bind(from)
        .bind(to)
        .fetch_all(&self.db.pool)
        .await?;
        for r in &rows {
            let ts: i64 = r.try_get(0)?;
            let text: String = r.try_get(1)?;
            fold(
                acc.entry(bucket_of(ts)).or_default(),
                ts,
                &codec::stored_value(&text),
            );
        }
        Ok((acc.iter().map(|(t, a)| a.bucket(*t)).collect(), damaged))
    }
}

/// Buckets one query over many series may return in total.
pub const MAX_TOTAL_BUCKETS: usize = 1_000_000;

/// Queries of several series run at once at most (the SQLite pool has 4 connections).
const PARALLEL: usize = 4;

/// Aggregates or damage of one series.
pub type SeriesBuckets = (Vec<Bucket>, Vec<Damaged>);

impl Tsdb {
    /// [`Tsdb::aggregate`] for many series (product, device, property), a few at a time,
    /// answers in the order asked.
    pub async fn aggregate_many(
        &self,
        series: &[(String, String, String)],
        from: i64,
        to: i64,
        interval: i64,
    ) -> Result<Vec<SeriesBuckets>, StorageError> {
        use futures_util::stream::{self, StreamExt};
        // Owned keys: a stream of borrowed ones is not `Send` for every lifetime in a handler.
        let mut answers =
            stream::iter(series.to_vec())
                .map(|(pk, dn, id)| async move {
                    self.aggregate(&pk, &dn, &id, from, to, interval).await
                })
                .buffered(PARALLEL);
        let mut out = Vec::with_capacity(series.len());
        let mut total = 0usize;
        while let Some(a) = answers.next().await {
            let a = a?;
            total += a.0.len();
            if total > MAX_TOTAL_BUCKETS {
                return Err(StorageError::TooLarge(format!(
                    "more than {MAX_TOTAL_BUCKETS} buckets over {} series: ask for fewer series, a shorter range or a larger interval",
                    series.len()
                )));
            }
            out.push(a);
        }
        Ok(out)
    }
}

fn fold(a: &mut Acc, ts: i64, v: &Value) {
    match numeric(v) {
        Some(x) => a.add(ts, x),
        None => a.add_count(1),
    }
}

/// How many buckets `[from, to]` makes at `interval`.
pub fn buckets(from: i64, to: i64, interval: i64) -> i64 {
    if interval <= 0 || to < from {
        return 0;
    }
    // In i128: the whole i64 range at 1 ms does not fit an i64.
    let n = i128::from(to.div_euclid(interval)) - i128::from(from.div_euclid(interval)) + 1;
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_counts_never_overflow() {
        assert_eq!(buckets(0, 59_999, 60_000), 1);
        assert_eq!(buckets(-1, 0, 60_000), 2);
        assert_eq!(buckets(i64::MIN, i64::MAX, 1), i64::MAX);
        assert_eq!(buckets(5, 4, 1), 0);
        assert_eq!(buckets(0, 10, 0), 0);
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor { ts: -5, skip: 3 };
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        assert_eq!(Cursor::parse("x:1"), None);
        assert_eq!(Cursor::parse("5"), None);
    }
}
