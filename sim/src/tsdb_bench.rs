//! `bench timeseries`: the time-series store on a generated fleet, side by side in one run with
//! the same points as plain rows in the same kind of database, and as Parquet with zstd written
//! by polars (what a user would export to instead), when a Python with polars is given.
//!
//! The fleet: `devices` devices × 10 properties × `seconds` at 1 Hz, mixing smooth floats
//! (the simulator's sine and random-walk generators, at the precision sensors report), a
//! full-precision noisy float, counters, booleans (0/1 and JSON true/false) and enums.
//!
//! Measured: bytes per point (file growth after VACUUM, so indexes and row overhead count),
//! ingest through the storage engine's write path (batches as the thing-data writer commits
//! them) with the sealer running, and downsampling (1-minute aggregates) of one property over a
//! day and of one property of every device over the whole run.

use crate::scenario::{Generator, Series};
use anyhow::{bail, Context, Result};
use ironlink_cloud::metrics::Metrics;
use ironlink_cloud::storage::Db;
use ironlink_cloud::thing::store::PropertyRow;
use ironlink_cloud::tsdb::{Landed, TimeseriesConfig, Tsdb, Verdict};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `bench timeseries`.
#[derive(Debug, Clone)]
pub struct TsdbBench {
    /// Devices.
    pub devices: usize,
    /// Samples per property (at 1 Hz in `bench timeseries`).
    pub seconds: usize,
    /// Seconds between samples.
    pub step_secs: u64,
    /// Points per chunk.
    pub chunk_points: usize,
    /// A Python with polars, for the Parquet baseline.
    pub python: Option<PathBuf>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct TsdbResult {
    /// Points stored.
    pub points: u64,
    /// Ironlink, bytes per point after sealing (database growth).
    pub ironlink_bytes_per_point: f64,
    /// Of which chunk payloads (the compressed columns alone).
    pub chunk_payload_bytes_per_point: f64,
    /// The same points as rows in the same database (property_history and its index).
    pub rows_bytes_per_point: f64,
    /// Parquet with zstd through polars (wide: a row per device and second, one column per
    /// property), when measured.
    pub parquet_zstd_bytes_per_point: Option<f64>,
    /// rows / ironlink.
    pub ratio_vs_rows: f64,
    /// parquet / ironlink.
    pub ratio_vs_parquet: Option<f64>,
    /// Points per second through the write path with the sealer running.
    pub ingest_points_per_sec: f64,
    /// Points per second of the plain row inserts (same batches, no sealer).
    pub rows_ingest_points_per_sec: f64,
    /// Points sealed while ingest ran.
    pub sealed_during_ingest: u64,
    /// Seconds after the last write until every point was sealed and small chunks merged.
    pub settle_secs: f64,
    /// Chunks after the server's own merges.
    pub chunks: u64,
    /// Bytes per point after the server's own merges (small chunks of series that have not
    /// sent enough since wait for more); `ironlink_bytes_per_point` is after every merge.
    pub settled_bytes_per_point: f64,
    /// 1-minute aggregates of one property over a day (86,400 points), median ms.
    pub downsample_day_one_ms: f64,
    /// 1-minute aggregates of one property of every device over the run, ms.
    pub downsample_fleet_ms: f64,
    /// Devices in that query.
    pub fleet_devices: usize,
    /// Archive tier: bytes per point of the Parquet files (long form: a row per point).
    pub archive_bytes_per_point: f64,
    /// Points per second moved from chunks into Parquet files.
    pub archive_points_per_sec: f64,
    /// The day-long 1-minute downsample again, read from the archive, median ms.
    pub downsample_day_one_archived_ms: f64,
    /// The fleet's 1-minute downsample again, read from the archive, ms.
    pub downsample_fleet_archived_ms: f64,
}

const PROPS: usize = 10;

fn generator(kind: &str, base: f64, amplitude: f64, period_s: u64, noise: f64) -> Generator {
    Generator {
        generator: kind.into(),
        base,
        amplitude,
        period: Some(Duration::from_secs(period_s)),
        noise,
        min: Some(base - 50.0),
        max: Some(base + 50.0),
        anomalies: Vec::new(),
    }
}

/// One device's 10 properties.
struct Device {
    temp: Series,
    humidity: Series,
    pressure: Series,
    vibration: Series,
    energy: i64,
    pulses: i64,
    rng: u64,
    on: bool,
    door: bool,
    mode: i64,
    alarm: i64,
}

impl Device {
    fn new(i: usize) -> Self {
        let seed = i as u64 * 7919 + 1;
        Self {
            temp: Series::new(&generator("sine", 22.0, 4.0, 3600, 0.05), i, seed),
            humidity: Series::new(&generator("random-walk", 55.0, 0.0, 1, 0.2), i, seed + 1),
            pressure: Series::new(&generator("sine", 1013.0, 2.0, 7200, 0.6), i, seed + 2),
            vibration: Series::new(&generator("sine", 0.0, 0.0, 1, 1.0), i, seed + 3),
            energy: 1_000_000 + i as i64 * 17,
            pulses: 0,
            rng: seed | 1,
            on: i.is_multiple_of(2),
            door: false,
            mode: (i % 4) as i64,
            alarm: 0,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64: deterministic and cheap.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The 10 values at second `s`.
    fn values(&mut self, s: usize) -> [Value; PROPS] {
        let t = Duration::from_secs(s as u64);
        let r = self.rand();
        self.energy += (r % 6) as i64;
        self.pulses += 1;
        if r.is_multiple_of(600) {
            self.on = !self.on;
        }
        if r % 900 == 1 {
            self.door = !self.door;
        }
        if r % 900 == 2 {
            self.mode = ((r >> 8) % 4) as i64;
        }
        if r % 1200 == 3 {
            self.alarm = ((r >> 16) % 3) as i64;
        }
        let round = |v: f64, p: f64| (v * p).round() / p;
        [
            json!(round(self.temp.next(t), 100.0)),
            json!(round(self.humidity.next(t), 10.0)),
            json!(round(self.pressure.next(t), 100.0)),
            json!(self.vibration.next(t)),
            json!(self.energy),
            json!(self.pulses),
            json!(i64::from(self.on)),
            json!(self.door),
            json!(self.mode),
            json!(self.alarm),
        ]
    }
}

const NAMES: [&str; PROPS] = [
    "temp",
    "humidity",
    "pressure",
    "vibration",
    "energy",
    "pulses",
    "on",
    "door",
    "mode",
    "alarm",
];

/// A database with a product, `devices` devices and their series; returns (product key,
/// series ids per device, file size after VACUUM).
async fn prepare(
    url: &str,
    path: &Path,
    devices: usize,
) -> Result<(Db, String, Vec<Vec<i64>>, u64)> {
    let db = Db::connect(url).await?;
    let product = ironlink_cloud::registry::create_product(
        &db,
        serde_json::from_value(json!({"name": "ts-bench"}))?,
    )
    .await?;
    let mut names = Vec::new();
    let mut created = 0;
    while created < devices {
        let n = (devices - created).min(1000);
        let devs = ironlink_cloud::registry::create_devices(
            &db,
            &product.product_key,
            (created..created + n)
                .map(|i| format!("dev-{i:06}"))
                .collect(),
            0,
        )
        .await?;
        names.extend(devs.into_iter().map(|d| d.device_name));
        created += n;
    }
    let mut ids = Vec::with_capacity(devices);
    for dn in &names {
        let keys: Vec<_> = NAMES
            .iter()
            .map(|p| (product.product_key.clone(), dn.clone(), (*p).to_owned()))
            .collect();
        let m = db.series_ids(&keys).await?;
        ids.push(keys.iter().filter_map(|k| m.get(k).copied()).collect());
    }
    let size = vacuum_size(path).await?;
    Ok((db, product.product_key, ids, size))
}

/// A connection of the benchmark's own (the server's pool is not public).
async fn conn(path: &Path) -> Result<sqlx::AnyConnection> {
    sqlx::any::install_default_drivers();
    Ok(
        <sqlx::AnyConnection as sqlx::Connection>::connect(&format!("sqlite://{}", path.display()))
            .await?,
    )
}

/// The database file's size once compacted (VACUUM, WAL folded in).
async fn vacuum_size(path: &Path) -> Result<u64> {
    let mut c = conn(path).await?;
    for sql in [
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "VACUUM",
        "PRAGMA wal_checkpoint(TRUNCATE)",
    ] {
        sqlx::Executor::execute(&mut c, sql).await?;
    }
    sqlx::Connection::close(c).await?;
    Ok(std::fs::metadata(path)?.len())
}

async fn scalar(path: &Path, sql: &str) -> Result<i64> {
    let mut c = conn(path).await?;
    let v: i64 = sqlx::Row::try_get(&sqlx::query(sql).fetch_one(&mut c).await?, 0)?;
    sqlx::Connection::close(c).await?;
    Ok(v)
}

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
/// Devices per write batch: a batch is one second of this many devices, about what the
/// thing-data writer commits at once (512 messages).
const BATCH_DEVICES: usize = 500;

/// Runs the benchmark.
pub async fn run(o: &TsdbBench) -> Result<TsdbResult> {
    let dir = tempfile::tempdir()?;
    let points = (o.devices * o.seconds * PROPS) as u64;

    // Ironlink: the write path with the server's sealer loop running (landing segments into
    // chunks, small chunks merged), then everything sealed and merged.
    let path = dir.path().join("ironlink.db");
    let url = format!("sqlite://{}", path.display());
    let (db, pk, ids, empty) = prepare(&url, &path, o.devices).await?;
    let metrics = Arc::new(Metrics::default());
    let tsdb = Tsdb::open(
        db.clone(),
        TimeseriesConfig {
            chunk_points: o.chunk_points,
            archive_dir: Some(dir.path().join("archive")),
            ..TimeseriesConfig::default()
        },
        metrics.clone(),
    )
    .await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let sealer = tokio::spawn(ironlink_cloud::tsdb::run(tsdb.clone(), stop));
    let started = Instant::now();
    write_all(Sink::Store(&db, &tsdb), &ids, o).await?;
    let ingest_secs = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    sealer.await?;
    let sealed_during_ingest = metrics
        .points_sealed
        .load(std::sync::atomic::Ordering::Relaxed);
    let settle = Instant::now();
    tsdb.seal(true).await?;
    // Bounded: each pass merges at least one group of chunks or stops.
    for _ in 0..100_000 {
        if tsdb.compact(usize::MAX).await?.0 == 0 {
            break;
        }
    }
    let settle_secs = settle.elapsed().as_secs_f64();
    let chunks = scalar(&path, "SELECT COUNT(*) FROM property_chunks").await?;
    // What the server holds now: its merges wait for more points of each series.
    let settled_bytes = vacuum_size(&path).await?.saturating_sub(empty);
    // Where it converges as series fill: every run of small chunks merged.
    for _ in 0..100_000 {
        if tsdb.compact_all(usize::MAX).await?.0 == 0 {
            break;
        }
    }
    let ironlink_bytes = vacuum_size(&path).await?.saturating_sub(empty);
    let payload = scalar(
        &path,
        "SELECT CAST(COALESCE(SUM(LENGTH(data)), 0) AS BIGINT) FROM property_chunks",
    )
    .await?;
    let stored = scalar(
        &path,
        "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM property_chunks",
    )
    .await?;
    if stored as u64 != points {
        bail!("{points} points written but {stored} in chunks");
    }

    // Downsampling: a day of one property on a device of its own, and the fleet's `temp`.
    let day_ids = {
        // A product and device for the day-long series.
        let p = ironlink_cloud::registry::create_product(
            &db,
            serde_json::from_value(json!({"name": "day"}))?,
        )
        .await?;
        ironlink_cloud::registry::create_devices(&db, &p.product_key, vec!["day-0001".into()], 0)
            .await?;
        let key = (
            p.product_key.clone(),
            "day-0001".to_owned(),
            "temp".to_owned(),
        );
        let m = db.series_ids(std::slice::from_ref(&key)).await?;
        (p.product_key, m.get(&key).copied().context("day series")?)
    };
    let mut dev = Device::new(999_999);
    let mut rows = Vec::with_capacity(86_400);
    for s in 0..86_400usize {
        rows.push(PropertyRow {
            series_id: day_ids.1,
            ts: T0 + s as i64 * 1000,
            value: dev.values(s)[0].to_string(),
            history: true,
        });
    }
    for chunk in rows.chunks(5000) {
        db.store_thing_data(chunk, &[], &[]).await?;
    }
    tsdb.stored(
        rows.iter()
            .map(|r| Landed::new(r.series_id, r.ts, Verdict::Store)),
    );
    tsdb.seal(true).await?;
    let fleet: Vec<(String, String, String)> = (0..o.devices)
        .map(|i| (pk.clone(), format!("dev-{i:06}"), "temp".to_owned()))
        .collect();
    let (downsample_day_one_ms, downsample_fleet_ms) =
        downsamples(&tsdb, &day_ids.0, &fleet, o).await?;

    // Archive tier: everything into Parquet files, then the same queries again.
    let started = Instant::now();
    let archived = tsdb.archive(ironlink_cloud::registry::now_ms(), 0).await?;
    let archive_secs = started.elapsed().as_secs_f64();
    if archived.points as u64 != points + 86_400 {
        bail!(
            "{} points archived, {} expected",
            archived.points,
            points + 86_400
        );
    }
    let archive_bytes: i64 = tsdb
        .archive_files(None, 100_000)
        .await?
        .iter()
        .map(|f| f.bytes)
        .sum();
    let (downsample_day_one_archived_ms, downsample_fleet_archived_ms) =
        downsamples(&tsdb, &day_ids.0, &fleet, o).await?;
    db.close().await;

    // Plain rows: the same points into the same table, no sealer.
    let rows_path = dir.path().join("rows.db");
    let rows_url = format!("sqlite://{}", rows_path.display());
    let (rows_db, _, rows_ids, rows_empty) = prepare(&rows_url, &rows_path, o.devices).await?;
    let started = Instant::now();
    write_all(Sink::Rows(&rows_path), &rows_ids, o).await?;
    let rows_secs = started.elapsed().as_secs_f64();
    rows_db.close().await;
    let rows_bytes = vacuum_size(&rows_path).await?.saturating_sub(rows_empty);

    // Parquet with zstd through polars.
    let parquet = match &o.python {
        Some(py) => Some(parquet_bytes(py, dir.path(), o)?),
        None => None,
    };
    let pp = |b: u64| b as f64 / points as f64;
    let ironlink = pp(ironlink_bytes);
    Ok(TsdbResult {
        points,
        ironlink_bytes_per_point: ironlink,
        chunk_payload_bytes_per_point: payload as f64 / points as f64,
        rows_bytes_per_point: pp(rows_bytes),
        parquet_zstd_bytes_per_point: parquet.map(pp),
        ratio_vs_rows: pp(rows_bytes) / ironlink,
        ratio_vs_parquet: parquet.map(|p| pp(p) / ironlink),
        ingest_points_per_sec: points as f64 / ingest_secs,
        rows_ingest_points_per_sec: points as f64 / rows_secs,
        sealed_during_ingest,
        settle_secs,
        chunks: chunks as u64,
        settled_bytes_per_point: settled_bytes as f64 / points as f64,
        downsample_day_one_ms,
        downsample_fleet_ms,
        fleet_devices: o.devices,
        archive_bytes_per_point: archive_bytes as f64 / archived.points as f64,
        archive_points_per_sec: archived.points as f64 / archive_secs,
        downsample_day_one_archived_ms,
        downsample_fleet_archived_ms,
    })
}

/// The day-long 1-minute downsample of one property (median of 21 runs, ms) and the fleet's
/// (one run, ms).
async fn downsamples(
    tsdb: &Tsdb,
    day_pk: &str,
    fleet: &[(String, String, String)],
    o: &TsdbBench,
) -> Result<(f64, f64)> {
    let mut runs = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let (b, damaged) = tsdb
            .aggregate(day_pk, "day-0001", "temp", T0, T0 + 86_399_000, 60_000)
            .await?;
        runs.push(t.elapsed().as_secs_f64() * 1000.0);
        if b.len() != 1440 || !damaged.is_empty() {
            bail!("a day of 1-minute buckets came back as {} buckets", b.len());
        }
    }
    runs.sort_by(f64::total_cmp);
    let t = Instant::now();
    let answers = tsdb
        .aggregate_many(fleet, T0, T0 + o.seconds as i64 * 1000, 60_000)
        .await?;
    if answers.iter().any(|(b, d)| b.is_empty() || !d.is_empty()) {
        bail!("a device without buckets");
    }
    Ok((runs[runs.len() / 2], t.elapsed().as_secs_f64() * 1000.0))
}

/// Where [`write_all`] writes.
enum Sink<'a> {
    /// The thing-data store, telling the time-series store.
    Store(&'a Db, &'a Arc<Tsdb>),
    /// Plain rows into the database file at this path.
    Rows(&'a Path),
}

/// Writes every point, second by second, in batches of [`BATCH_DEVICES`] devices: through
/// the thing-data store and the time-series store when given one, else as plain rows of
/// `property_history` (the baseline).
async fn write_all(sink: Sink<'_>, ids: &[Vec<i64>], o: &TsdbBench) -> Result<()> {
    let mut rows_conn = match sink {
        Sink::Rows(path) => {
            let mut c = conn(path).await?;
            // The server's settings (one pragma per statement).
            for pragma in [
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA cache_size=-32768",
            ] {
                sqlx::Executor::execute(&mut c, pragma).await?;
            }
            Some(c)
        }
        Sink::Store(..) => None,
    };
    let mut devices: Vec<Device> = (0..o.devices).map(Device::new).collect();
    let mut rows = Vec::with_capacity(BATCH_DEVICES * PROPS);
    for s in 0..o.seconds {
        let ts = T0 + s as i64 * 1000 * o.step_secs as i64;
        for (chunk_ids, chunk_devs) in ids
            .chunks(BATCH_DEVICES)
            .zip(devices.chunks_mut(BATCH_DEVICES))
        {
            rows.clear();
            for (sids, d) in chunk_ids.iter().zip(chunk_devs.iter_mut()) {
                for (sid, v) in sids.iter().zip(d.values(s)) {
                    rows.push(PropertyRow {
                        series_id: *sid,
                        ts,
                        value: v.to_string(),
                        history: true,
                    });
                }
            }
            match (&sink, rows_conn.as_mut()) {
                (Sink::Store(db, t), _) => {
                    db.store_thing_data(&rows, &[], &[]).await?;
                    t.stored(
                        rows.iter()
                            .map(|r| Landed::new(r.series_id, r.ts, Verdict::Store)),
                    );
                }
                (_, Some(c)) => plain_rows(c, &rows).await?,
                (Sink::Rows(_), None) => bail!("no connection for plain rows"),
            }
        }
    }
    Ok(())
}

/// The baseline: rows of `property_history` (series, time, JSON text) with its `(series_id,
/// ts)` index, multi-row inserts of 1,000 rows, one transaction per batch.
async fn plain_rows(c: &mut sqlx::AnyConnection, rows: &[PropertyRow]) -> Result<()> {
    let mut tx = sqlx::Connection::begin(c).await?;
    for part in rows.chunks(1000) {
        let sql = format!(
            "INSERT INTO property_history (series_id, ts, value) VALUES {}",
            ironlink_cloud::storage::placeholders(
                ironlink_cloud::storage::Engine::Sqlite,
                part.len(),
                3
            )
        );
        let mut q = sqlx::query(&sql);
        for r in part {
            q = q.bind(r.series_id).bind(r.ts).bind(&r.value);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Bytes of the same points as Parquet (zstd) written by polars: one row per device and
/// second, a typed column per property, sorted by device and time.
fn parquet_bytes(python: &Path, dir: &Path, o: &TsdbBench) -> Result<u64> {
    use std::io::Write;
    let csv = dir.join("points.csv");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    writeln!(w, "device,ts,{}", NAMES.join(","))?;
    for i in 0..o.devices {
        let mut d = Device::new(i);
        for s in 0..o.seconds {
            let v = d.values(s);
            let cells: Vec<String> = v.iter().map(Value::to_string).collect();
            writeln!(w, "dev-{i:06},{},{}", T0 + s as i64 * 1000, cells.join(","))?;
        }
    }
    w.flush()?;
    drop(w);
    let out = dir.join("points.parquet");
    let script = format!(
        "import polars as pl\n\
         df = pl.read_csv({csv:?}, schema_overrides={{'door': pl.Boolean}})\n\
         df.sort(['device', 'ts']).write_parquet({out:?}, compression='zstd')\n",
        csv = csv.display().to_string(),
        out = out.display().to_string(),
    );
    let status = std::process::Command::new(python)
        .arg("-c")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", python.display()))?;
    if !status.success() {
        bail!("polars could not write the Parquet baseline ({status})");
    }
    let len = std::fs::metadata(&out)?.len();
    let _ = std::fs::remove_file(&csv);
    Ok(len)
}

/// The report as a table.
pub fn table(r: &TsdbResult) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "points                              {}\n",
        r.points
    ));
    s.push_str(&format!(
        "bytes/point  ironlink (chunks)       {:.3} (payload {:.3}), every small chunk merged\n",
        r.ironlink_bytes_per_point, r.chunk_payload_bytes_per_point
    ));
    s.push_str(&format!(
        "bytes/point  plain rows              {:.2}  -> {:.1}:1\n",
        r.rows_bytes_per_point, r.ratio_vs_rows
    ));
    match (r.parquet_zstd_bytes_per_point, r.ratio_vs_parquet) {
        (Some(p), Some(x)) => s.push_str(&format!(
            "bytes/point  parquet+zstd (polars)   {p:.3}  -> parquet/ironlink {x:.2}\n"
        )),
        _ => s.push_str("bytes/point  parquet+zstd            not measured (--python)\n"),
    }
    s.push_str(&format!(
        "ingest points/s with sealing        {:.0} (plain rows {:.0}); sealed during ingest {}\n",
        r.ingest_points_per_sec, r.rows_ingest_points_per_sec, r.sealed_during_ingest
    ));
    s.push_str(&format!(
        "after the last write                {:.2} s to seal and merge what is due: {} chunks, {:.3} bytes/point\n",
        r.settle_secs, r.chunks, r.settled_bytes_per_point
    ));
    s.push_str(&format!(
        "1-min downsample, 1 property, 1 day {:.2} ms (median of 21)\n",
        r.downsample_day_one_ms
    ));
    s.push_str(&format!(
        "1-min downsample, {} devices        {:.0} ms\n",
        r.fleet_devices, r.downsample_fleet_ms
    ));
    s.push_str(&format!(
        "archive: bytes/point {:.3}; {:.0} points/s into Parquet\n",
        r.archive_bytes_per_point, r.archive_points_per_sec
    ));
    s.push_str(&format!(
        "archived: 1-min downsample, 1 day   {:.2} ms; {} devices {:.0} ms\n",
        r.downsample_day_one_archived_ms, r.fleet_devices, r.downsample_fleet_archived_ms
    ));
    s
}

/// Options of `bench jobs`.
#[derive(Debug, Clone)]
pub struct JobsBench {
    /// The fleet (devices × 10 properties, `seconds` samples `step_secs` apart).
    pub fleet: TsdbBench,
    /// The `ironlink-cloud` binary whose analytics worker runs the job.
    pub cloud: PathBuf,
}

/// Results of `bench jobs`.
#[derive(Debug, Clone, Serialize)]
pub struct JobsResult {
    /// Points in the day.
    pub points: u64,
    /// Devices.
    pub devices: usize,
    /// Seconds between samples.
    pub step_secs: u64,
    /// The daily per-device, per-property aggregate in SQLite SQL over the same points as plain
    /// rows (before sealing), ms (median of 3).
    pub sqlite_rows_ms: f64,
    /// The same aggregate as an Ironlink job over the sealed chunks: the whole worker process
    /// (start, database, read, compute, Parquet result), ms (median of 3).
    pub job_ms: f64,
    /// sqlite / job.
    pub ratio: f64,
    /// Result rows.
    pub result_rows: u64,
    /// The same job narrowed to one property (pushdown reads a tenth), ms (median of 3).
    pub job_one_property_ms: f64,
    /// History rows that narrowed job read.
    pub one_property_rows: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs one job through the worker process; (ms, summary).
fn worker_run(
    cloud: &Path,
    url: &str,
    archive: &Path,
    query: &str,
    out: &Path,
) -> Result<(f64, Value)> {
    use std::io::{BufRead, Write};
    let spec = json!({
        "database_url": url,
        "timeseries": TimeseriesConfig { archive_dir: Some(archive.to_owned()), ..TimeseriesConfig::default() },
        "query": query,
        "window": [T0 - 1, T0 + 86_400_000],
        "max_rows": 100_000_000u64,
        "max_result_rows": 10_000_000u64,
        "memory_mb": 16_384u64,
        "out": out,
    });
    let started = Instant::now();
    let mut child = std::process::Command::new(cloud)
        .arg("analytics-worker")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", cloud.display()))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    writeln!(stdin, "{spec}")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut done = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line?).unwrap_or(Value::Null);
        if let Some(d) = v.get("done") {
            done = Some(d.clone());
        } else if let Some(e) = v.get("error") {
            bail!("the job failed: {e}");
        }
    }
    drop(stdin);
    child.wait()?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok((ms, done.context("the worker gave no result")?))
}

/// Runs `bench jobs`: a day of a fleet, aggregated per device and property by SQLite over plain
/// rows and by an analytics job over the sealed chunks, in the same run.
pub async fn run_jobs(o: &JobsBench) -> Result<JobsResult> {
    let dir = tempfile::tempdir()?;
    let f = &o.fleet;
    let points = (f.devices * f.seconds * PROPS) as u64;
    let path = dir.path().join("ironlink.db");
    let url = format!("sqlite://{}", path.display());
    let archive = dir.path().join("archive");
    let (db, _pk, ids, _) = prepare(&url, &path, f.devices).await?;
    let tsdb = Tsdb::open(
        db.clone(),
        TimeseriesConfig {
            chunk_points: f.chunk_points,
            archive_dir: Some(archive.clone()),
            ..TimeseriesConfig::default()
        },
        Arc::new(Metrics::default()),
    )
    .await?;
    write_all(Sink::Rows(&path), &ids, f).await?;
    // Baseline: the same aggregate in SQLite over plain rows, before they are sealed.
    let sql = format!(
        "SELECT s.device_name, s.identifier, COUNT(*), AVG(CAST(h.value AS REAL)), MIN(CAST(h.value AS REAL)), MAX(CAST(h.value AS REAL)) \
         FROM property_history h JOIN property_series s ON s.id = h.series_id \
         WHERE h.ts >= {T0} AND h.ts < {} GROUP BY s.device_name, s.identifier",
        T0 + 86_400_000
    );
    let mut sqlite = Vec::new();
    let mut groups = 0;
    for _ in 0..3 {
        let mut c = conn(&path).await?;
        let started = Instant::now();
        groups = sqlx::query(&sql).fetch_all(&mut c).await?.len();
        sqlite.push(started.elapsed().as_secs_f64() * 1000.0);
        sqlx::Connection::close(c).await?;
    }
    if groups != f.devices * PROPS {
        bail!("SQLite answered {groups} groups");
    }
    tsdb.resync().await?;
    tsdb.seal(true).await?;
    db.close().await;
    let query = "SELECT device_name, identifier, count(*) AS n, avg(value) AS mean, min(value) AS low, max(value) AS high \
                 FROM history WHERE ts >= '2026-01-01' AND ts < '2026-01-02' GROUP BY device_name, identifier";
    let one = "SELECT device_name, count(*) AS n, avg(value) AS mean, min(value) AS low, max(value) AS high \
               FROM history WHERE identifier = 'temp' AND ts >= '2026-01-01' AND ts < '2026-01-02' GROUP BY device_name";
    let (mut job, mut narrow) = (Vec::new(), Vec::new());
    let (mut rows, mut one_rows, mut read) = (0, 0, 0);
    for i in 0..3 {
        let (ms, s) = worker_run(
            &o.cloud,
            &url,
            &archive,
            query,
            &dir.path().join(format!("all-{i}.parquet")),
        )?;
        job.push(ms);
        rows = s["rows"].as_u64().unwrap_or(0);
        read = s["history_rows"].as_u64().unwrap_or(0);
        let (ms, s) = worker_run(
            &o.cloud,
            &url,
            &archive,
            one,
            &dir.path().join(format!("one-{i}.parquet")),
        )?;
        narrow.push(ms);
        one_rows = s["history_rows"].as_u64().unwrap_or(0);
    }
    if read != points || rows != (f.devices * PROPS) as u64 {
        bail!("the job read {read} of {points} points into {rows} rows");
    }
    let (sqlite_rows_ms, job_ms) = (median(sqlite), median(job));
    Ok(JobsResult {
        points,
        devices: f.devices,
        step_secs: f.step_secs,
        sqlite_rows_ms,
        job_ms,
        ratio: sqlite_rows_ms / job_ms,
        result_rows: rows,
        job_one_property_ms: median(narrow),
        one_property_rows: one_rows,
    })
}

/// The `bench jobs` report as a Markdown table.
pub fn jobs_table(r: &JobsResult) -> String {
    format!(
        "| fleet | points | SQLite SQL over rows | Ironlink job (worker process) | ratio | job, one property |\n|---|---|---|---|---|---|\n| {} devices × 10 properties × 1 day every {} s | {} | {:.0} ms | {:.0} ms | {:.2}x | {:.0} ms ({} rows read) |\n",
        r.devices, r.step_secs, r.points, r.sqlite_rows_ms, r.job_ms, r.ratio, r.job_one_property_ms, r.one_property_rows
    )
}
