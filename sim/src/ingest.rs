//! `bench ingest`: TSL-validated property ingest into storage, next to a plain batched insert
//! of the same rows into the same kind of database in the same run. Loopback only; bounded.
//!
//! Devices publish QoS 1 property posts of 10 properties each, a window of messages in flight
//! per device. Ironlink acknowledges a post only after its values are committed, so the last
//! PUBACK marks the end of the work.

use crate::cloud_process::{alink_connect, connect_raw, Cloud, WAIT};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use ironlink_cloud::storage::Db;
use rumqttc::mqttbytes::v4;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of `bench ingest`.
#[derive(Debug, Clone)]
pub struct IngestBench {
    /// Publishing devices.
    pub devices: usize,
    /// Messages per device (10 properties each).
    pub messages: usize,
    /// Messages in flight per device.
    pub window: usize,
    /// `None`: SQLite in a temp dir; else a PostgreSQL URL (both runs use it).
    pub database_url: Option<String>,
    /// The ironlink-cloud binary.
    pub cloud_bin: Option<PathBuf>,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct IngestResult {
    /// `sqlite` or `postgres`.
    pub engine: String,
    /// Property values stored through Ironlink (MQTT, validation, storage).
    pub properties: u64,
    /// Ironlink properties per second.
    pub ironlink_props_per_sec: f64,
    /// Plain batched inserts of the same number of rows, rows per second (mean of the runs
    /// before and after Ironlink's).
    pub plain_insert_rows_per_sec: f64,
    /// The plain run before Ironlink's, rows per second.
    pub plain_before: f64,
    /// The plain run after Ironlink's, rows per second.
    pub plain_after: f64,
    /// ironlink / plain.
    pub ratio: f64,
}

const PROPS: usize = 10;

fn tsl() -> serde_json::Value {
    let props: Vec<serde_json::Value> = (0..PROPS)
        .map(|i| serde_json::json!({"identifier": format!("p{i}"), "name": format!("p{i}"), "accessMode": "r",
            "dataType": {"type": "double", "specs": {"min": "-1000000", "max": "1000000"}}}))
        .collect();
    serde_json::json!({ "properties": props })
}

async fn drive_device(
    addr: std::net::SocketAddr,
    connect: BytesMut,
    topic: String,
    messages: usize,
    window: usize,
) -> Result<()> {
    let mut s = connect_raw(addr, &connect)
        .await
        .context("device connect refused")?;
    let mut sent = 0usize;
    let mut acked = 0usize;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::with_capacity(64 * 1024);
    while acked < messages {
        while sent < messages && sent - acked < window {
            let mut body = format!("{{\"id\":\"{sent}\",\"version\":\"1.0\",\"params\":{{");
            for i in 0..PROPS {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!("\"p{i}\":{}.5", (sent + i) % 1000));
            }
            body.push_str("}}");
            let mut p = v4::Publish::new(&topic, rumqttc::QoS::AtLeastOnce, body.into_bytes());
            p.pkid = u16::try_from(sent % 60_000 + 1).unwrap_or(1);
            p.write(&mut out)
                .map_err(|e| anyhow::anyhow!("encode: {e:?}"))?;
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        match tokio::time::timeout(WAIT, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => bail!(
                "connection closed or silent with {} of {messages} acknowledged",
                acked
            ),
        }
        while buf.len() >= 4 {
            if buf[0] != 0x40 {
                bail!("unexpected packet 0x{:02x} instead of PUBACK", buf[0]);
            }
            let _ = buf.split_to(4);
            acked += 1;
        }
    }
    Ok(())
}

/// Runs the benchmark.
/// Runs the benchmark: the plain insert, Ironlink, and the plain insert again (the plain rate
/// reported is the mean of the two, so both sides share the machine's state alike).
pub async fn run(o: &IngestBench) -> Result<IngestResult> {
    let before = plain_insert(o).await?;
    let ironlink = ironlink_ingest(o).await?;
    let after = plain_insert(o).await?;
    let plain = (before + after) / 2.0;
    Ok(IngestResult {
        engine: if o.database_url.is_some() {
            "postgres".into()
        } else {
            "sqlite".into()
        },
        properties: (o.devices * o.messages * PROPS) as u64,
        ironlink_props_per_sec: ironlink,
        plain_insert_rows_per_sec: plain,
        plain_before: before,
        plain_after: after,
        ratio: ironlink / plain,
    })
}

/// Property values per second through Ironlink, every acknowledged value checked in storage.
async fn ironlink_ingest(o: &IngestBench) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut config =
        String::from("[mqtt]\nconnects_per_second = 1000000\nconnect_burst = 1000000\n");
    if let Some(url) = &o.database_url {
        config = format!("database_url = \"{url}\"\n{config}");
    }
    let cloud = Cloud::start_bench(o.cloud_bin.as_deref(), dir.path(), &config)?;
    let pk = cloud
        .create_product(serde_json::json!({"name": "ingest"}))
        .await?;
    let (s, v) = cloud
        .api(
            reqwest::Method::PUT,
            &format!("/products/{pk}/thing-model"),
            Some(tsl()),
        )
        .await?;
    if s != 200 {
        bail!("importing the thing model: {s} {v}");
    }
    let mut jobs = Vec::new();
    for (dn, secret) in cloud.create_devices(&pk, o.devices).await? {
        jobs.push((
            alink_connect(&pk, &dn, &secret, 600)?,
            format!("/sys/{pk}/{dn}/thing/event/property/post"),
        ));
    }
    let start = Instant::now();
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(c, t)| tokio::spawn(drive_device(cloud.mqtt, c, t, o.messages, o.window)))
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let properties = (o.devices * o.messages * PROPS) as u64;
    let ironlink = properties as f64 / elapsed;
    let metrics = reqwest::get(format!("http://{}/metrics", cloud.http))
        .await?
        .text()
        .await?;
    let stored: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ironlink_properties_stored_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("properties_stored metric")?;
    if stored != properties {
        bail!("Ironlink acknowledged {properties} property values but counted {stored} stored");
    }
    drop(cloud);
    // Count the rows in the server's database too: acknowledged means committed.
    let server_url = match &o.database_url {
        Some(u) => u.clone(),
        None => format!("sqlite://{}", dir.path().join("ironlink.db").display()),
    };
    sqlx::any::install_default_drivers();
    let mut check = <sqlx::AnyConnection as sqlx::Connection>::connect(&server_url).await?;
    let rows: i64 = sqlx::Row::try_get(
        // Rows of the former landing table, plus the points the sealer moved into chunks.
        &sqlx::query("SELECT (SELECT COUNT(*) FROM property_history h JOIN property_series s ON s.id = h.series_id WHERE s.product_key = $1) + (SELECT CAST(COALESCE(SUM(c.n), 0) AS BIGINT) FROM property_chunks c JOIN property_series s ON s.id = c.series_id WHERE s.product_key = $2)")
            .bind(&pk)
            .bind(&pk)
            .fetch_one(&mut check)
            .await?,
        0,
    )?;
    // Points still in landing segments (every series of every batch in one row each).
    let series: std::collections::HashSet<i64> =
        sqlx::query_scalar("SELECT id FROM property_series WHERE product_key = $1")
            .bind(&pk)
            .fetch_all(&mut check)
            .await?
            .into_iter()
            .collect();
    let mut landed = 0i64;
    for data in sqlx::query_scalar::<_, Vec<u8>>("SELECT data FROM property_segments")
        .fetch_all(&mut check)
        .await?
    {
        let seg = ironlink_cloud::tsdb::segment::Segment::parse(&data)
            .map_err(|e| anyhow::anyhow!("a landing segment: {e}"))?;
        landed += (0..seg.len())
            .filter(|i| series.contains(&seg.series(*i)))
            .count() as i64;
    }
    let rows = rows + landed;
    if u64::try_from(rows).unwrap_or(0) != properties {
        bail!("Ironlink acknowledged {properties} property values but its history holds {rows}");
    }
    Ok(ironlink)
}

/// Rows per second of a plain batched insert of the same rows.
async fn plain_insert(o: &IngestBench) -> Result<f64> {
    let properties = o.devices * o.messages * PROPS;
    // Baseline: the same rows, inserted in batches of the size the server's writer uses.
    let base_dir = tempfile::tempdir()?;
    let url = match &o.database_url {
        Some(u) => u.clone(),
        None => format!("sqlite://{}", base_dir.path().join("plain.db").display()),
    };
    let db = Db::connect(&url).await?;
    let product = ironlink_cloud::registry::create_product(
        &db,
        serde_json::from_value(serde_json::json!({"name": "plain"}))?,
    )
    .await?;
    let devs =
        ironlink_cloud::registry::create_devices(&db, &product.product_key, Vec::new(), o.devices)
            .await?;
    let keys: Vec<_> = devs
        .iter()
        .flat_map(|d| {
            (0..PROPS).map(move |i| {
                (
                    d.product_key.clone(),
                    d.device_name.clone(),
                    format!("p{i}"),
                )
            })
        })
        .collect();
    let ids = db.series_ids(&keys).await?;
    let series: Vec<i64> = keys.iter().filter_map(|k| ids.get(k).copied()).collect();
    db.close().await;
    // A plain batched insert: multi-row INSERTs of the same rows into the same history table,
    // in transactions as large as the server's, on one connection with the server's settings.
    let mut rows = Vec::with_capacity(properties);
    for m in 0..o.messages {
        for sid in &series {
            rows.push((
                *sid,
                1_700_000_000_000 + m as i64,
                format!("{}.5", m % 1000),
            ));
        }
    }
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&url).await?;
    if o.database_url.is_none() {
        // One pragma per statement.
        for pragma in ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL"] {
            sqlx::Executor::execute(&mut conn, pragma).await?;
        }
    }
    // Anonymous `?` parameters on SQLite (numbered ones cost a list scan per bound value).
    let pg = o.database_url.is_some();
    let mut sql = String::from("INSERT INTO property_history (series_id, ts, value) VALUES ");
    for r in 0..256 {
        if r > 0 {
            sql.push_str(", ");
        }
        if pg {
            sql.push_str(&format!("(${}, ${}, ${})", r * 3 + 1, r * 3 + 2, r * 3 + 3));
        } else {
            sql.push_str("(?, ?, ?)");
        }
    }
    let start = Instant::now();
    for batch in rows.chunks(512 * PROPS) {
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        for chunk in batch.chunks(256) {
            if chunk.len() < 256 {
                for (sid, ts, v) in chunk {
                    sqlx::query(
                        "INSERT INTO property_history (series_id, ts, value) VALUES ($1, $2, $3)",
                    )
                    .bind(sid)
                    .bind(ts)
                    .bind(v)
                    .execute(&mut *tx)
                    .await?;
                }
                continue;
            }
            let mut q = sqlx::query(&sql);
            for (sid, ts, v) in chunk {
                q = q.bind(sid).bind(ts).bind(v);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(rows.len() as f64 / start.elapsed().as_secs_f64())
}

/// The results as a table.
pub fn table(r: &IngestResult) -> String {
    format!(
        "engine    properties  ironlink props/s  plain insert rows/s  ratio\n{:<9} {:>10}  {:>16.0}  {:>19.0}  {:.2}\n",
        r.engine, r.properties, r.ironlink_props_per_sec, r.plain_insert_rows_per_sec, r.ratio
    )
}
