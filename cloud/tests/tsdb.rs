//! Time-series storage on SQLite and PostgreSQL: sealing under concurrent ingest (two sealers
//! at once, as two nodes would), pages over landing segments, rows and chunks, aggregates over
//! chunks equal to aggregates over raw points, retention boundaries, damaged chunks and
//! segments, rows of the former landing table, and through the server:
//! storage policies on device posts, the API and its refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ironlink_cloud::metrics::Metrics;
use ironlink_cloud::registry;
use ironlink_cloud::storage::Db;
use ironlink_cloud::thing::store::PropertyRow;
use ironlink_cloud::tsdb::policy::{Mode, Policy};
use ironlink_cloud::tsdb::query::{Bucket, Cursor};
use ironlink_cloud::tsdb::{Landed, TimeseriesConfig, Tsdb, Verdict};
use rumqttc::QoS;
use serde_json::{json, Value};
use std::sync::Arc;

struct Engine {
    db: Db,
    /// A pool of its own for checks the product has no query for.
    pool: sqlx::AnyPool,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDb>,
}

async fn pool(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(url).await.unwrap()
}

async fn engines(prefix: &str) -> Vec<Engine> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut out = vec![Engine {
        db: Db::connect(&url).await.unwrap(),
        pool: pool(&url).await,
        _dir: Some(dir),
        pg: None,
    }];
    if let Some(pg) = postgres_database(prefix).await {
        out.push(Engine {
            db: Db::connect(&pg.url).await.unwrap(),
            pool: pool(&pg.url).await,
            _dir: None,
            pg: Some(pg),
        });
    }
    out
}

async fn done(e: Engine) {
    e.db.close().await;
    e.pool.close().await;
    if let Some(pg) = e.pg {
        pg.drop_db().await;
    }
}

/// An integer the product has no query for, e.g. `SELECT COUNT(*) ...`, with one optional
/// bound `$1`.
async fn scalar(pool: &sqlx::AnyPool, sql: &str, bind: Option<i64>) -> i64 {
    let mut q = sqlx::query(sql);
    if let Some(b) = bind {
        q = q.bind(b);
    }
    sqlx::Row::try_get(&q.fetch_one(pool).await.unwrap(), 0).unwrap()
}

/// A product with one device, and the series ids of `props`.
async fn series(db: &Db, props: &[&str]) -> (String, Vec<i64>) {
    let p = registry::create_product(db, serde_json::from_value(json!({"name": "ts"})).unwrap())
        .await
        .unwrap();
    let pk = p.product_key;
    registry::create_devices(db, &pk, vec!["dev1".into()], 0)
        .await
        .unwrap();
    let keys: Vec<_> = props
        .iter()
        .map(|p| (pk.clone(), "dev1".to_owned(), (*p).to_owned()))
        .collect();
    let ids = db.series_ids(&keys).await.unwrap();
    (pk, keys.iter().map(|k| ids[k]).collect())
}

async fn tsdb(db: &Db, chunk_points: usize) -> Arc<Tsdb> {
    open(
        db,
        TimeseriesConfig {
            chunk_points,
            ..TimeseriesConfig::default()
        },
    )
    .await
}

async fn open(db: &Db, config: TimeseriesConfig) -> Arc<Tsdb> {
    Tsdb::open(db.clone(), config, Arc::new(Metrics::default()))
        .await
        .unwrap()
}

/// Stores rows as the writer does: committed, then told to the sealer's index.
async fn ingest(db: &Db, t: &Tsdb, rows: &[(i64, i64, Value)]) {
    let rows: Vec<PropertyRow> = rows
        .iter()
        .map(|(sid, ts, v)| PropertyRow {
            series_id: *sid,
            ts: *ts,
            value: v.to_string(),
            history: true,
        })
        .collect();
    db.store_thing_data(&rows, &[], &[]).await.unwrap();
    t.stored(
        rows.iter()
            .map(|r| Landed::new(r.series_id, r.ts, Verdict::Store)),
    );
}

/// Every point of a property, oldest first, read page by page.
async fn all_points(t: &Tsdb, pk: &str, id: &str, page: usize, asc: bool) -> Vec<(i64, Value)> {
    let mut out = Vec::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..100_000 {
        let p = t
            .range(pk, "dev1", id, i64::MIN, i64::MAX, page, asc, cursor)
            .await
            .unwrap();
        assert!(p.damaged.is_empty(), "{:?}", p.damaged);
        assert!(p.points.len() <= page);
        out.extend(p.points);
        match p.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    if !asc {
        out.reverse();
    }
    out
}

fn value(prop: usize, i: i64) -> Value {
    match prop {
        0 => json!(i * 7 % 1000),
        1 => json!(20.0 + (i as f64 / 50.0).sin() * 5.0),
        2 => json!(format!("state-{}", i % 5)),
        _ => json!({"lat": 30.0 + i as f64 * 1e-4, "fix": i % 3, "tag": "g"}),
    }
}

/// Equal lists, or the first difference.
fn same(got: &[(i64, Value)], want: &[(i64, Value)], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|i| got.get(*i) != want.get(*i)) {
        panic!(
            "{what}: {} points, {} expected; first difference at {i}: {:?} vs {:?}",
            got.len(),
            want.len(),
            got.get(i.saturating_sub(1)..(i + 2).min(got.len())),
            want.get(i.saturating_sub(1)..(i + 2).min(want.len()))
        );
    }
}

fn sorted(mut v: Vec<(i64, Value)>) -> Vec<(i64, Value)> {
    ironlink_cloud::tsdb::query::order(&mut v);
    v
}

#[tokio::test]
async fn sealing_under_concurrent_ingest_loses_and_duplicates_nothing() {
    for e in engines("ts_seal").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["count", "temp", "state", "pos"]).await;
        let t = tsdb(&db, 100).await;
        let mut expected: Vec<Vec<(i64, Value)>> = vec![Vec::new(); sids.len()];
        let mut batches = Vec::new();
        for b in 0..60i64 {
            let mut rows = Vec::new();
            for (p, sid) in sids.iter().enumerate() {
                for k in 0..37i64 {
                    let i = b * 37 + k;
                    // Every 10th point shares its time with the one before (ties cross pages).
                    let ts = 1_700_000_000_000 + (i - i64::from(i % 10 == 9)) * 1000;
                    rows.push((*sid, ts, value(p, i)));
                    expected[p].push((ts, value(p, i)));
                }
            }
            batches.push(rows);
        }
        let writer = {
            let (db, t) = (db.clone(), t.clone());
            tokio::spawn(async move {
                for rows in batches {
                    ingest(&db, &t, &rows).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        // Two sealers at once, as two cloud nodes on one database would run them.
        let sealers: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                let w = writer.abort_handle();
                tokio::spawn(async move {
                    let mut sealed = 0;
                    for _ in 0..10_000 {
                        match t.seal(false).await {
                            Ok(s) => sealed += s.points,
                            // PostgreSQL: two sealers deleting the same rows may deadlock or
                            // conflict; the loser's transaction rolls back and its rows stay.
                            Err(err) => eprintln!("seal: {err}"),
                        }
                        if w.is_finished() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    sealed
                })
            })
            .collect();
        writer.await.unwrap();
        let mut sealed = 0;
        for s in sealers {
            sealed += s.await.unwrap();
        }
        sealed += t.seal(true).await.unwrap().points;
        let total: usize = expected.iter().map(Vec::len).sum();
        assert_eq!(sealed, total, "every point sealed exactly once");
        let chunks = scalar(
            &e.pool,
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM property_chunks",
            None,
        )
        .await;
        assert_eq!(chunks as usize, total);
        for (p, id) in ["count", "temp", "state", "pos"].iter().enumerate() {
            let want = sorted(expected[p].clone());
            let asc = all_points(&t, &pk, id, 97, true).await;
            same(&asc, &want, &format!("{id} ascending"));
            let desc = all_points(&t, &pk, id, 64, false).await;
            same(&desc, &want, &format!("{id} descending"));
        }
        done(e).await;
    }
}

fn raw_buckets(points: &[(i64, f64)], from: i64, to: i64, interval: i64) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    for (ts, v) in points.iter().filter(|p| p.0 >= from && p.0 <= to) {
        let time = ts.div_euclid(interval) * interval;
        match out.last_mut().filter(|b| b.time == time) {
            Some(b) => {
                b.count += 1;
                b.sum = Some(b.sum.unwrap() + v);
                b.min = Some(b.min.unwrap().min(*v));
                b.max = Some(b.max.unwrap().max(*v));
                b.last = Some(*v);
            }
            None => out.push(Bucket {
                time,
                count: 1,
                avg: None,
                min: Some(*v),
                max: Some(*v),
                sum: Some(*v),
                first: Some(*v),
                last: Some(*v),
            }),
        }
    }
    for b in &mut out {
        b.avg = Some(b.sum.unwrap() / b.count as f64);
    }
    out
}

fn assert_buckets_eq(got: &[Bucket], want: &[Bucket], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: bucket count");
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0),
        (a, b) => a == b,
    };
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.time, g.count), (w.time, w.count), "{what}");
        assert_eq!(
            (g.min, g.max, g.first, g.last),
            (w.min, w.max, w.first, w.last),
            "{what} at {}",
            g.time
        );
        assert!(
            close(g.sum, w.sum) && close(g.avg, w.avg),
            "{what} at {}: {g:?} vs {w:?}",
            g.time
        );
    }
}

#[tokio::test]
async fn aggregates_over_chunks_equal_aggregates_over_raw_points() {
    for e in engines("ts_agg").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp", "count"]).await;
        let t = tsdb(&db, 128).await;
        // Irregular times (1-3 s apart) over about 3 hours, floats and integers.
        let mut ts = 1_700_000_000_000i64;
        let mut temp = Vec::new();
        let mut count = Vec::new();
        let mut rows = Vec::new();
        for i in 0..5000i64 {
            ts += 1000 + (i * 7919 % 3) * 1000;
            let v = ((i as f64) / 40.0).sin() * 10.0 + 20.0;
            temp.push((ts, v));
            count.push((ts, i as f64));
            rows.push((sids[0], ts, json!(v)));
            rows.push((sids[1], ts, json!(i)));
        }
        ingest(&db, &t, &rows).await;
        let (from, to) = (temp[10].0, temp[4900].0);
        let cases = [
            (60_000, from, to),
            (3_600_000, i64::MIN, i64::MAX),
            (86_400_000, 0, i64::MAX),
            (1000, from, from + 600_000),
        ];
        let mut before = Vec::new();
        for (interval, f, to) in cases {
            before.push(
                t.aggregate(&pk, "dev1", "temp", f, to, interval)
                    .await
                    .unwrap()
                    .0,
            );
        }
        t.seal(true).await.unwrap();
        for ((interval, f, to), hot) in cases.into_iter().zip(before) {
            let (got, damaged) = t
                .aggregate(&pk, "dev1", "temp", f, to, interval)
                .await
                .unwrap();
            assert!(damaged.is_empty());
            let want = raw_buckets(&temp, f, to, interval);
            assert_buckets_eq(&got, &want, &format!("temp per {interval} ms, sealed"));
            assert_buckets_eq(&hot, &want, &format!("temp per {interval} ms, rows"));
            let (got, _) = t
                .aggregate(&pk, "dev1", "count", f, to, interval)
                .await
                .unwrap();
            assert_buckets_eq(&got, &raw_buckets(&count, f, to, interval), "count");
        }
        // The value at a time, from chunks.
        let (p, _) = t
            .value_at(&pk, "dev1", "temp", temp[2000].0 + 1)
            .await
            .unwrap();
        assert_eq!(p.unwrap().0, temp[2000].0);
        let (p, _) = t
            .value_at(&pk, "dev1", "temp", temp[0].0 - 1)
            .await
            .unwrap();
        assert!(p.is_none());
        done(e).await;
    }
}

#[tokio::test]
async fn retention_drops_whole_chunks_and_hides_older_points_at_once() {
    for e in engines("ts_ttl").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp", "keep"]).await;
        let t = tsdb(&db, 60).await;
        let now = registry::now_ms();
        // One point a minute for 5 hours, up to now.
        let rows: Vec<(i64, i64, Value)> = (0..300i64)
            .flat_map(|m| {
                // Half a minute off the minute: no point sits on the retention's edge.
                let ts = now - (299 - m) * 60_000 + 30_000;
                [(sids[0], ts, json!(m)), (sids[1], ts, json!(m))]
            })
            .collect();
        ingest(&db, &t, &rows).await;
        t.seal(true).await.unwrap();
        let hour = 3_600_000;
        t.put_policy(Policy {
            product_key: pk.clone(),
            identifier: "*".into(),
            mode: Mode::All,
            ttl_ms: Some(2 * hour),
            updated_at: now,
        })
        .await
        .unwrap();
        t.put_policy(Policy {
            product_key: pk.clone(),
            identifier: "keep".into(),
            mode: Mode::All,
            ttl_ms: Some(0),
            updated_at: now,
        })
        .await
        .unwrap();
        // Queries hide what is past the retention before the reaper runs.
        let visible = all_points(&t, &pk, "temp", 1000, true).await;
        let cutoff = now - 2 * hour;
        assert!(visible.iter().all(|p| p.0 >= cutoff));
        assert_eq!(
            visible.len(),
            rows.iter()
                .filter(|r| r.0 == sids[0] && r.1 >= cutoff)
                .count()
        );
        let (chunks, _) = t.reap(now).await.unwrap();
        // 5 chunks of 60 minutes: the 2 that end before the cutoff go; the one that ends at it
        // and the newer ones stay.
        assert_eq!(chunks, 2, "whole chunks only");
        let left = scalar(
            &e.pool,
            "SELECT COUNT(*) FROM property_chunks WHERE series_id = $1",
            Some(sids[0]),
        )
        .await;
        assert_eq!(left, 3);
        assert_eq!(all_points(&t, &pk, "temp", 1000, true).await, visible);
        // A property kept forever keeps all of it.
        assert_eq!(all_points(&t, &pk, "keep", 1000, true).await.len(), 300);
        // A late point from long ago is hidden while it waits in a landing segment, and
        // dropped once sealed (its chunk is past the retention).
        ingest(&db, &t, &[(sids[0], now - 10 * hour, json!(1))]).await;
        assert_eq!(all_points(&t, &pk, "temp", 1000, true).await, visible);
        assert_eq!(t.seal(false).await.unwrap().points, 1);
        assert_eq!(t.reap(now).await.unwrap(), (1, 0));
        assert_eq!(all_points(&t, &pk, "temp", 1000, true).await, visible);
        done(e).await;
    }
}

/// Flips one bit of the `data` of row `id` of `table`, at `at(length)`.
async fn flip_bit(pool: &sqlx::AnyPool, table: &str, id: i64, at: impl Fn(usize) -> usize) {
    let mut data: Vec<u8> = sqlx::query_scalar(&format!("SELECT data FROM {table} WHERE id = $1"))
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    let i = at(data.len());
    data[i] ^= 0x10;
    sqlx::query(&format!("UPDATE {table} SET data = $1 WHERE id = $2"))
        .bind(data)
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_damaged_chunk_is_reported_with_its_series_and_the_rest_answers() {
    for e in engines("ts_bad").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp"]).await;
        let t = tsdb(&db, 50).await;
        let rows: Vec<_> = (0..200i64).map(|i| (sids[0], 1000 * i, json!(i))).collect();
        ingest(&db, &t, &rows).await;
        t.seal(true).await.unwrap();
        ingest(&db, &t, &[(sids[0], 500_000, json!(500))]).await;
        let pool = e.pool.clone();
        let id = scalar(&pool, "SELECT MIN(id) FROM property_chunks", None).await;
        // Damage the chunk's bytes (same length, one bit flipped in its body).
        flip_bit(&pool, "property_chunks", id, |len| len / 2).await;
        let page = t
            .range(&pk, "dev1", "temp", i64::MIN, i64::MAX, 1000, true, None)
            .await
            .unwrap();
        assert_eq!(
            page.damaged.len(),
            1,
            "{:?} {}",
            page.damaged,
            page.points.len()
        );
        assert_eq!(page.damaged[0].series, sids[0]);
        assert_eq!((page.damaged[0].start, page.damaged[0].end), (0, 49_000));
        assert!(
            page.damaged[0].reason.contains("checksum"),
            "{:?}",
            page.damaged
        );
        assert_eq!(page.points.len(), 151, "the other chunks and the row");
        // Buckets narrower than a chunk decode it: the damage shows.
        let (buckets, damaged) = t
            .aggregate(&pk, "dev1", "temp", 0, i64::MAX, 10_000)
            .await
            .unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 151);
        // A bucket holding the whole chunk answers from its statistics (kept apart from its
        // bytes, intact).
        let (buckets, damaged) = t
            .aggregate(&pk, "dev1", "temp", 0, i64::MAX, 1_000_000)
            .await
            .unwrap();
        assert!(damaged.is_empty());
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 201);
        done(e).await;
    }
}

#[tokio::test]
async fn a_damaged_landing_segment_is_reported_kept_and_the_rest_is_sealed() {
    for e in engines("ts_badseg").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp", "count"]).await;
        let t = tsdb(&db, 50).await;
        // Three writer batches: three segments of both series.
        for b in 0..3i64 {
            let rows: Vec<_> = (0..10i64)
                .flat_map(|i| {
                    let ts = (b * 10 + i) * 1000;
                    [(sids[0], ts, json!(ts)), (sids[1], ts, json!(i))]
                })
                .collect();
            ingest(&db, &t, &rows).await;
        }
        let pool = e.pool.clone();
        let id = scalar(&pool, "SELECT MIN(id) FROM property_segments", None).await;
        flip_bit(&pool, "property_segments", id, |len| len - 2).await;
        let page = t
            .range(&pk, "dev1", "temp", i64::MIN, i64::MAX, 1000, true, None)
            .await
            .unwrap();
        assert_eq!(page.damaged.len(), 1, "{:?}", page.damaged);
        assert!(page.damaged[0].segment);
        assert_eq!(page.damaged[0].chunk, id);
        assert_eq!((page.damaged[0].start, page.damaged[0].end), (0, 9_000));
        assert!(
            page.damaged[0].reason.contains("checksum"),
            "{:?}",
            page.damaged
        );
        assert_eq!(page.points.len(), 20, "the two intact segments");
        // Sealing takes the intact segments and marks the damaged one, which stays.
        assert_eq!(t.seal(false).await.unwrap().points, 40);
        let (left, marked) = (
            scalar(&pool, "SELECT COUNT(*) FROM property_segments", None).await,
            scalar(
                &pool,
                "SELECT COUNT(*) FROM property_segments WHERE damaged LIKE '%checksum%'",
                None,
            )
            .await,
        );
        assert_eq!((left, marked), (1, 1));
        assert_eq!(t.seal(false).await.unwrap().points, 0, "not sealed again");
        let page = t
            .range(&pk, "dev1", "temp", i64::MIN, i64::MAX, 1000, true, None)
            .await
            .unwrap();
        assert_eq!((page.points.len(), page.damaged.len()), (20, 1));
        let (buckets, damaged) = t
            .aggregate(&pk, "dev1", "count", 0, i64::MAX, 10_000)
            .await
            .unwrap();
        assert_eq!(damaged.len(), 1);
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 20);
        done(e).await;
    }
}

#[tokio::test]
async fn rows_of_the_former_landing_table_are_read_and_sealed_and_deleted_series_leave_nothing() {
    for e in engines("ts_legacy").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp"]).await;
        // Rows as a server before landing segments wrote them, and a point in a segment.
        for i in 0..30i64 {
            sqlx::query("INSERT INTO property_history (series_id, ts, value) VALUES ($1, $2, $3)")
                .bind(sids[0])
                .bind(i * 1000)
                .bind(json!(i).to_string())
                .execute(&e.pool)
                .await
                .unwrap();
        }
        let t = tsdb(&db, 16).await;
        ingest(&db, &t, &[(sids[0], 30_000, json!(30))]).await;
        let want: Vec<(i64, Value)> = (0..=30i64).map(|i| (i * 1000, json!(i))).collect();
        assert_eq!(all_points(&t, &pk, "temp", 7, true).await, want);
        assert_eq!(all_points(&t, &pk, "temp", 7, false).await, want);
        let sealed = t.seal(true).await.unwrap();
        assert_eq!(sealed.points, 31);
        assert_eq!(
            scalar(&e.pool, "SELECT COUNT(*) FROM property_history", None).await,
            0
        );
        assert_eq!(all_points(&t, &pk, "temp", 100, true).await, want);
        // A device deleted while its points wait in a segment: the sealer drops them.
        let (pk2, other) = {
            let p = registry::create_product(
                &db,
                serde_json::from_value(json!({"name": "gone"})).unwrap(),
            )
            .await
            .unwrap();
            registry::create_devices(&db, &p.product_key, vec!["dev1".into()], 0)
                .await
                .unwrap();
            let key = (p.product_key.clone(), "dev1".to_owned(), "temp".to_owned());
            let ids = db.series_ids(std::slice::from_ref(&key)).await.unwrap();
            (p.product_key, ids[&key])
        };
        ingest(
            &db,
            &t,
            &[(other, 1, json!(1)), (sids[0], 31_000, json!(31))],
        )
        .await;
        assert!(db.delete_device(&pk2, "dev1").await.unwrap());
        assert_eq!(t.seal(false).await.unwrap().points, 1);
        assert_eq!(
            scalar(
                &e.pool,
                "SELECT COUNT(*) FROM property_chunks WHERE series_id = $1",
                Some(other)
            )
            .await,
            0
        );
        done(e).await;
    }
}

#[tokio::test]
async fn small_chunks_of_a_slow_series_are_merged_without_changing_a_point() {
    for e in engines("ts_compact").await {
        let db = e.db.clone();
        let (pk, sids) = series(&db, &["temp", "label"]).await;
        let t = tsdb(&db, 64).await;
        // Ten seals of 7 points each, as `seal_after` leaves a slow series.
        for round in 0..10i64 {
            let rows: Vec<_> = (0..7i64)
                .flat_map(|k| {
                    let i = round * 7 + k;
                    [
                        (sids[0], i * 60_000, json!(20.0 + i as f64 / 8.0)),
                        (sids[1], i * 60_000, json!(format!("s{}", i % 3))),
                    ]
                })
                .collect();
            ingest(&db, &t, &rows).await;
            t.seal(true).await.unwrap();
        }
        let temp = all_points(&t, &pk, "temp", 1000, true).await;
        let label = all_points(&t, &pk, "label", 1000, true).await;
        let (agg, _) = t
            .aggregate(&pk, "dev1", "temp", 0, i64::MAX, 600_000)
            .await
            .unwrap();
        // Per series: 9 chunks (63 points) fit one chunk of 64 and merge; the tenth stays.
        assert_eq!(t.compact(100).await.unwrap(), (18, 2));
        let chunks = scalar(&e.pool, "SELECT COUNT(*) FROM property_chunks", None).await;
        assert_eq!(chunks, 4);
        same(
            &all_points(&t, &pk, "temp", 1000, true).await,
            &temp,
            "temp",
        );
        same(
            &all_points(&t, &pk, "label", 1000, true).await,
            &label,
            "label",
        );
        let (after, _) = t
            .aggregate(&pk, "dev1", "temp", 0, i64::MAX, 600_000)
            .await
            .unwrap();
        assert_buckets_eq(&after, &agg, "temp after merging");
        // Nothing left to merge: one small chunk per series.
        assert_eq!(t.compact(100).await.unwrap(), (0, 0));
        // The sealer's own pass merges what its seals made small: ten more seals of 7 points
        // beside the 7 left make 11 small chunks per series, 9 (63 points) and 2 merge.
        for round in 10..20i64 {
            let rows: Vec<_> = (0..7i64)
                .map(|k| (sids[0], (round * 7 + k) * 60_000, json!(k)))
                .collect();
            ingest(&db, &t, &rows).await;
            t.seal(false).await.unwrap();
        }
        assert_eq!(t.compact_recent().await.unwrap(), (11, 2));
        assert_eq!(t.compact_recent().await.unwrap(), (0, 0));
        assert_eq!(t.compact(100).await.unwrap(), (0, 0));
        assert_eq!(all_points(&t, &pk, "temp", 1000, true).await.len(), 140);
        done(e).await;
    }
}

const TSL: &str = r#"{
  "properties": [
    {"identifier": "temp", "name": "T", "accessMode": "r", "dataType": {"type": "float", "specs": {"min": "-40", "max": "120"}}},
    {"identifier": "count", "name": "C", "accessMode": "r", "dataType": {"type": "int", "specs": {"min": "0", "max": "1000000"}}},
    {"identifier": "state", "name": "S", "accessMode": "r", "dataType": {"type": "enum", "specs": {"0": "off", "1": "on"}}},
    {"identifier": "label", "name": "L", "accessMode": "r", "dataType": {"type": "text", "specs": {"length": "32"}}}
  ],
  "events": [],
  "services": []
}"#;

#[tokio::test]
async fn policies_decide_what_device_posts_store_and_the_api_reads_rows_and_chunks_alike() {
    let srv = start(|c| {
        c.timeseries.chunk_points = 8;
        // Sealed when the test says so.
        c.timeseries.seal_every = std::time::Duration::from_secs(3600);
    })
    .await;
    let pk = srv.product_with_model(json!({"name": "ts"}), TSL).await;
    let put = |id: &str, body: Value| {
        let path = format!("/products/{pk}/storage-policies/{id}");
        let srv = &srv;
        async move { srv.call(reqwest::Method::PUT, &path, Some(body)).await }
    };
    // Refusals name the reason.
    let (s, v) = put("bogus", json!({"mode": "all"})).await;
    assert_eq!(s, 404, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no property `bogus`"),
        "{v}"
    );
    let (s, v) = srv
        .call(
            reqwest::Method::PUT,
            "/products/nope/storage-policies/*",
            Some(json!({"mode": "all"})),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = put("temp", json!({"mode": "on_change", "deadband": -1})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put("temp", json!({"mode": "all", "ttl": "soon"})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put("temp", json!({"mode": "sometimes"})).await;
    assert_eq!(s, 422, "{v}");
    let (s, v) = put("temp", json!({"mode": "interval", "interval_ms": 0})).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = put("temp", json!({"mode": "interval"})).await;
    assert_eq!(s, 422, "{v}");
    // temp: on change beyond 0.5; count: at most one a minute; label: not stored.
    let (s, v) = put(
        "temp",
        json!({"mode": "on_change", "deadband": 0.5, "ttl": "30d"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ttl_ms"], 30 * 86_400_000i64);
    assert_eq!(
        put("count", json!({"mode": "interval", "interval_ms": 60_000}))
            .await
            .0,
        200
    );
    assert_eq!(put("label", json!({"mode": "none"})).await.0, 200);
    let (_, v) = srv.get(&format!("/products/{pk}/storage-policies")).await;
    assert_eq!(v["policies"].as_array().unwrap().len(), 3, "{v}");

    let secret = srv.device(&pk, "dev1").await;
    let mut d = device_v4(&srv, &pk, "dev1", &secret).await;
    let topic = format!("/sys/{pk}/dev1/thing/event/property/post");
    let reply = format!("{topic}_reply");
    d.subscribe_v4(&reply, 1).await;
    let temps = [20.0, 20.2, 20.6, 20.7, 21.2, 19.0, 19.4, 25.0];
    // Within the 30-day retention set above.
    let t0 = (registry::now_ms() - 3_600_000) / 60_000 * 60_000;
    for (i, temp) in temps.iter().enumerate() {
        let ts = t0 + i as i64 * 20_000;
        let body = json!({"id": i.to_string(), "params": {
            "temp": {"value": temp, "time": ts},
            "count": {"value": i, "time": ts},
            "state": {"value": i % 2, "time": ts},
            "label": {"value": format!("l{i}"), "time": ts}}});
        d.publish_v4(
            &topic,
            body.to_string().as_bytes(),
            QoS::AtLeastOnce,
            i as u16 + 10,
        )
        .await;
        // Acknowledged means stored: wait for each reply.
        loop {
            match d.next_v4().await {
                Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) if p.topic == reply => break,
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    }
    let history = |id: &str, q: &str| {
        let path = format!("/devices/{pk}/dev1/properties/{id}/history?order=asc{q}");
        let srv = &srv;
        async move { srv.get(&path).await.1 }
    };
    let values = |v: &Value| -> Vec<Value> {
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].clone())
            .collect()
    };
    assert_eq!(
        values(&history("temp", "").await),
        vec![
            json!(20.0),
            json!(20.6),
            json!(21.2),
            json!(19.0),
            json!(25.0)
        ]
    );
    assert_eq!(
        values(&history("count", "").await),
        vec![json!(0), json!(3), json!(6)]
    );
    assert_eq!(values(&history("state", "").await).len(), 8);
    assert!(values(&history("label", "").await).is_empty());
    // The latest value is kept whatever the policy.
    let (_, v) = srv.get(&format!("/devices/{pk}/dev1/properties")).await;
    let latest: Vec<&Value> = v["properties"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["identifier"] == "label")
        .collect();
    assert_eq!(latest[0]["value"], "l7", "{v}");

    // Seal everything, post more (rows), then read across both.
    let (s, v) = srv.post("/timeseries/seal", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["points"], 5 + 3 + 8, "{v}");
    let before = history("state", "").await;
    for i in 8..12u16 {
        let ts = t0 + i64::from(i) * 20_000;
        let body = json!({"id": i.to_string(), "params": {"state": {"value": i % 2, "time": ts}}});
        d.publish_v4(
            &topic,
            body.to_string().as_bytes(),
            QoS::AtLeastOnce,
            i + 10,
        )
        .await;
        loop {
            match d.next_v4().await {
                Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) if p.topic == reply => break,
                Some(_) => {}
                None => panic!("closed"),
            }
        }
    }
    // Pages of 5 across chunks and rows.
    let mut all = Vec::new();
    let mut q = "&limit=5".to_owned();
    loop {
        let v = history("state", &q).await;
        all.extend(
            v["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["time"].as_i64().unwrap()),
        );
        match v["next"].as_str() {
            Some(n) => q = format!("&limit=5&cursor={n}"),
            None => break,
        }
    }
    assert_eq!(all, (0..12).map(|i| t0 + i * 20_000).collect::<Vec<_>>());
    assert_eq!(before["points"].as_array().unwrap().len(), 8);
    // Aggregates: per minute over the state (0/1) values.
    let (s, v) = srv
        .get(&format!(
            "/devices/{pk}/dev1/properties/state/aggregate?from={t0}&to={}&interval=1m",
            t0 + 240_000
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    let counts: u64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 12, "{v}");
    let (s, v) = srv
        .get(&format!(
            "/devices/{pk}/dev1/properties/state/aggregate?from=0&to={}&interval=1ms",
            t0 + 240_000
        ))
        .await;
    // 220,001 buckets of 1 ms between the first and last point (the range asked is wider).
    assert_eq!(s, 400, "too many buckets: {v}");
    assert!(
        v["message"].as_str().unwrap().contains("220001 buckets"),
        "{v}"
    );
    let (s, _) = srv
        .get(&format!(
            "/devices/{pk}/dev1/properties/label/aggregate?from=0&to={t0}&interval=1ms"
        ))
        .await;
    assert_eq!(s, 200, "no points: no buckets to count");
    // The value at a time.
    let (s, v) = srv
        .get(&format!(
            "/devices/{pk}/dev1/properties/temp/value?at={}",
            t0 + 70_000
        ))
        .await;
    assert_eq!((s, v["value"].clone()), (200, json!(20.6)), "{v}");
    let (s, _) = srv
        .get(&format!("/devices/{pk}/dev1/properties/temp/value?at=1"))
        .await;
    assert_eq!(s, 404);
    // Several series at once.
    let (s, v) = srv
        .post(
            "/timeseries/query",
            json!({"fleet": {"product_key": pk, "device_names": ["dev1"], "identifiers": ["temp", "count"]}, "from": t0, "to": t0 + 300_000, "interval": "1h"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let series = v["series"].as_array().unwrap();
    assert_eq!(series.len(), 2);
    // The points may straddle an hour: add the buckets up.
    let sum = |k: usize, f: &str| -> f64 {
        series[k]["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[f].as_f64().unwrap())
            .fold(if f == "max" { f64::MIN } else { 0.0 }, |a, x| {
                if f == "max" {
                    a.max(x)
                } else {
                    a + x
                }
            })
    };
    assert_eq!(sum(0, "count"), 5.0, "{v}");
    assert_eq!(sum(1, "max"), 6.0, "{v}");
    let (s, v) = srv.post("/timeseries/query", json!({"from": 0})).await;
    assert_eq!((s, v["series"].as_array().unwrap().len()), (200, 0), "{v}");
    let (s, v) = srv
        .post("/timeseries/query", json!({"device_names": ["dev1"]}))
        .await;
    assert_eq!(s, 422, "device names belong in a fleet: {v}");
    // Removing a policy stores every point again.
    let (s, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/products/{pk}/storage-policies/label"),
            None,
        )
        .await;
    assert_eq!(s, 204);
    let (s, _) = srv
        .call(
            reqwest::Method::DELETE,
            &format!("/products/{pk}/storage-policies/label"),
            None,
        )
        .await;
    assert_eq!(s, 404);
}

async fn archiving(db: &Db, chunk_points: usize, dir: &std::path::Path) -> Arc<Tsdb> {
    open(
        db,
        TimeseriesConfig {
            chunk_points,
            archive_dir: Some(dir.to_path_buf()),
            ..TimeseriesConfig::default()
        },
    )
    .await
}

/// Parquet files under `dir`, relative, sorted.
fn parquet_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_str().unwrap().to_owned());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn archiving_moves_old_chunks_into_parquet_and_every_query_reads_them_alike() {
    for e in engines("ts_arch").await {
        let db = e.db.clone();
        let ids = ["count", "temp", "state", "pos"];
        let (pk, sids) = series(&db, &ids).await;
        let dir = tempfile::tempdir().unwrap();
        let t = archiving(&db, 100, dir.path()).await;
        // 3,000 points per property 97 s apart (ties on every 10th): 2023-11-14 22:13 UTC to
        // 2023-11-18 07:03, five UTC days.
        let base = 1_700_000_000_000i64;
        let at = |i: i64| base + (i - i64::from(i % 10 == 9)) * 97_000;
        let mut expected: Vec<Vec<(i64, Value)>> = vec![Vec::new(); ids.len()];
        let mut rows = Vec::new();
        for (p, sid) in sids.iter().enumerate() {
            for i in 0..3000i64 {
                rows.push((*sid, at(i), value(p, i)));
                expected[p].push((at(i), value(p, i)));
            }
        }
        ingest(&db, &t, &rows).await;
        t.seal(true).await.unwrap();
        let intervals = [3_600_000i64, 86_400_000, 7_000_000];
        let mut aggs = Vec::new();
        for id in ["count", "temp"] {
            for iv in intervals {
                let (b, d) = t
                    .aggregate(&pk, "dev1", id, base - 1, base + 400_000_000, iv)
                    .await
                    .unwrap();
                assert!(d.is_empty());
                aggs.push(b);
            }
        }
        let probe = base + 1234 * 97_000 + 5;
        let value_before = t.value_at(&pk, "dev1", "pos", probe).await.unwrap();

        let a = t.archive(registry::now_ms(), 0).await.unwrap();
        assert_eq!((a.files, a.points), (5, 12_000), "{a:?}");
        let chunks_left = scalar(&e.pool, "SELECT COUNT(*) FROM property_chunks", None).await;
        assert_eq!(chunks_left, 0);
        let files = t.archive_files(Some(&pk), 100).await.unwrap();
        let days: Vec<&str> = files.iter().rev().map(|f| f.day.as_str()).collect();
        assert_eq!(
            days,
            [
                "2023-11-14",
                "2023-11-15",
                "2023-11-16",
                "2023-11-17",
                "2023-11-18"
            ]
        );
        for f in &files {
            assert!(f.path.starts_with(&format!("product={pk}/day={}/", f.day)));
            assert!(dir.path().join(&f.path).is_file());
        }
        assert_eq!(parquet_files(dir.path()).len(), 5, "no stray file");

        // Every query answers as it did from chunks.
        for (p, id) in ids.iter().enumerate() {
            let want = sorted(expected[p].clone());
            same(&all_points(&t, &pk, id, 97, true).await, &want, id);
            same(&all_points(&t, &pk, id, 641, false).await, &want, id);
        }
        let mut k = 0;
        for id in ["count", "temp"] {
            for iv in intervals {
                let (b, d) = t
                    .aggregate(&pk, "dev1", id, base - 1, base + 400_000_000, iv)
                    .await
                    .unwrap();
                assert!(d.is_empty());
                assert_buckets_eq(&b, &aggs[k], &format!("{id} per {iv} ms, archived"));
                k += 1;
            }
        }
        assert_eq!(
            t.value_at(&pk, "dev1", "pos", probe).await.unwrap(),
            value_before
        );

        // Late points into archived days, and archived again: a second file of those days,
        // nothing doubled.
        let late = [
            (base + 5 * 97_000 + 1, json!(99.5)),
            (base + 500 * 97_000 + 3, json!(-1.25)),
        ];
        let late_rows: Vec<_> = late
            .iter()
            .map(|(ts, v)| (sids[1], *ts, v.clone()))
            .collect();
        ingest(&db, &t, &late_rows).await;
        expected[1].extend(late.iter().cloned());
        t.seal(true).await.unwrap();
        let a = t.archive(registry::now_ms(), 0).await.unwrap();
        assert_eq!((a.files, a.points), (2, 2), "{a:?}");
        let want_temp = sorted(expected[1].clone());
        same(
            &all_points(&t, &pk, "temp", 500, true).await,
            &want_temp,
            "temp with late points",
        );

        // A damaged file is reported with its path; the rest of the answer stands.
        let files = t.archive_files(Some(&pk), 100).await.unwrap();
        let victim = files.iter().find(|f| f.day == "2023-11-16").unwrap();
        let victim_path = dir.path().join(&victim.path);
        let good = std::fs::read(&victim_path).unwrap();
        std::fs::write(&victim_path, &good[..good.len() / 2]).unwrap();
        let page = t
            .range(&pk, "dev1", "temp", i64::MIN, i64::MAX, 10_000, true, None)
            .await
            .unwrap();
        assert_eq!(page.damaged.len(), 1, "{:?}", page.damaged);
        assert_eq!(page.damaged[0].file.as_deref(), Some(victim.path.as_str()));
        assert_eq!(page.damaged[0].series, sids[1]);
        let lost = want_temp
            .iter()
            .filter(|p| p.0 >= victim.start && p.0 <= victim.end)
            .count();
        assert_eq!(page.points.len(), want_temp.len() - lost);
        let (_, d) = t
            .aggregate(&pk, "dev1", "temp", i64::MIN, i64::MAX, 60_000)
            .await
            .unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        std::fs::write(&victim_path, &good).unwrap();

        // Files a crash left behind (written, never registered) are removed at the next start.
        let stray = dir.path().join(format!(
            "product={pk}/day=2023-11-14/part-0-deadbeef.parquet"
        ));
        std::fs::write(&stray, &good).unwrap();
        let tmp = dir
            .path()
            .join(format!("product={pk}/day=2023-11-15/part-1-0.parquet.tmp"));
        std::fs::write(&tmp, b"half").unwrap();
        drop(t);
        let t = archiving(&db, 100, dir.path()).await;
        assert!(!stray.exists() && !tmp.exists());
        assert_eq!(parquet_files(dir.path()).len(), 7);
        same(
            &all_points(&t, &pk, "temp", 500, true).await,
            &want_temp,
            "temp after a restart",
        );

        // Retention: files whose every series is past it go, newer ones stay; queries agree.
        let now = registry::now_ms();
        let cutoff = 1_700_092_800_000; // 2023-11-16 00:00 UTC
        t.put_policy(Policy {
            product_key: pk.clone(),
            identifier: "*".into(),
            mode: Mode::All,
            ttl_ms: Some(now - cutoff),
            updated_at: now,
        })
        .await
        .unwrap();
        assert_eq!(
            t.reap_archive(now).await.unwrap(),
            4,
            "two files each of the 14th and 15th"
        );
        assert_eq!(parquet_files(dir.path()).len(), 3);
        let kept: Vec<_> = want_temp
            .iter()
            .filter(|p| p.0 >= cutoff)
            .cloned()
            .collect();
        same(
            &all_points(&t, &pk, "temp", 500, true).await,
            &kept,
            "temp past the retention",
        );

        // A deleted device takes its index entries; files left with no series go.
        assert!(db.delete_device(&pk, "dev1").await.unwrap());
        assert_eq!(t.reap_archive(now).await.unwrap(), 3);
        assert!(parquet_files(dir.path()).is_empty());
        assert!(t.archive_files(None, 100).await.unwrap().is_empty());
        done(e).await;
    }
}
