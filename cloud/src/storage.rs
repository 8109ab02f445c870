//! Registry storage on sqlx: SQLite by default, PostgreSQL when the URL says so.
//!
//! Queries are written once in SQL both engines accept (numbered `$n` parameters, BIGINT
//! integers and flags); only the migrations differ, kept side by side in `migrations/`.

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database refused or failed a statement.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The URL names an engine we do not support.
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://...")]
    UnsupportedUrl(String),
    /// A uniqueness constraint refused a row.
    #[error("{0}")]
    Conflict(String),
    /// The request asks for more than a query may answer (says what and what to change).
    #[error("{0}")]
    TooLarge(String),
}

/// Which engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite (embedded default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool plus the engine it talks to.
#[derive(Debug, Clone)]
pub struct Db {
    pub(crate) pool: AnyPool,
    engine: Engine,
    /// Devices' tags as rules read them (`attribute()`), by device.
    tags: Arc<TagCache>,
}

/// Devices' tags read by the rules engine for each message: kept in memory, dropped when this
/// process changes them or deletes the device, and re-read after [`TAGS_FRESH`] (so a change
/// made by another instance on the same database shows within that time).
#[derive(Debug, Default)]
struct TagCache {
    by_device: std::sync::Mutex<HashMap<(String, String), CachedTags>>,
}

/// Tags and when they were read.
type CachedTags = (std::time::Instant, Arc<TagMap>);

/// A device's tags.
pub type TagMap = serde_json::Map<String, serde_json::Value>;

/// How long cached tags are used without reading them again.
const TAGS_FRESH: std::time::Duration = std::time::Duration::from_secs(30);
/// Devices whose tags are cached at most (then the cache starts over).
const TAGS_CACHED_MAX: usize = 100_000;

impl TagCache {
    fn get(&self, pk: &str, dn: &str) -> Option<Arc<TagMap>> {
        let map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(pk.to_owned(), dn.to_owned()))
            .filter(|(at, _)| at.elapsed() < TAGS_FRESH)
            .map(|(_, t)| t.clone())
    }

    fn put(&self, pk: &str, dn: &str, tags: Arc<TagMap>) {
        let mut map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= TAGS_CACHED_MAX {
            map.clear();
        }
        map.insert(
            (pk.to_owned(), dn.to_owned()),
            (std::time::Instant::now(), tags),
        );
    }

    fn forget(&self, pk: &str, dn: &str) {
        self.by_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(pk.to_owned(), dn.to_owned()));
    }
}

/// A product as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Product {
    /// Generated product key.
    pub product_key: String,
    /// Human name.
    pub name: String,
    /// `direct`, `gateway` or `sub-device`.
    pub node_type: String,
    /// `alink-json` or `raw`.
    pub data_format: String,
    /// Secret for dynamic registration.
    pub product_secret: String,
    /// 1 when devices may register themselves with the product secret.
    #[serde(serialize_with = "as_bool")]
    pub dynamic_register: i64,
    /// Free text.
    pub description: String,
    /// Creation time, ms since the Unix epoch.
    pub created_at: i64,
    /// Owner: a gateway may only add sub-devices of products of its own tenant.
    pub tenant: String,
}

/// Which devices a list shows.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceFilter<'a> {
    /// Stored status: `online`, `offline` or `unactive`.
    pub status: Option<&'a str>,
    /// A tag's key and value.
    pub tag: Option<(&'a str, &'a str)>,
    /// Text the device name contains.
    pub name: Option<&'a str>,
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Escapes LIKE's wildcards with `\`.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A device as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Device {
    /// Product key.
    pub product_key: String,
    /// Device name, unique per product.
    pub device_name: String,
    /// Device secret.
    pub device_secret: String,
    /// 0 when disabled.
    #[serde(serialize_with = "as_bool")]
    pub enabled: i64,
    /// `unactive`, `online` or `offline`.
    pub status: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
    /// First time the device came online, ms.
    pub first_online_at: Option<i64>,
    /// Last time the device came online, ms.
    pub last_online_at: Option<i64>,
    /// Last time the device went offline, ms.
    pub last_offline_at: Option<i64>,
    /// Remote address of the last connection.
    pub client_addr: Option<String>,
    /// JSON object of tags.
    pub tags: String,
}

/// One online/offline change.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PresenceEvent {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// `online` or `offline`.
    pub status: String,
    /// Why (for offline: clean disconnect, keepalive timeout, kicked, ...).
    pub reason: String,
    /// Remote address.
    pub client_addr: Option<String>,
    /// ms since the Unix epoch.
    pub at: i64,
}

fn as_bool<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(*v != 0)
}

/// Device columns that [`Db::update_device`] sets one at a time.
#[derive(Debug, Clone, Copy)]
enum DeviceColumn {
    Enabled,
    Secret,
    Tags,
}

const PRODUCT_COLS: &str = "product_key, name, node_type, data_format, product_secret, dynamic_register, description, created_at, tenant";
/// `n` numbered placeholders from `$from`: `$2, $3, $4`.
fn numbered(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

const DEVICE_COLS: &str = "product_key, device_name, device_secret, enabled, status, created_at, first_online_at, last_online_at, last_offline_at, client_addr, tags";

/// Splits a batch into chunks of 128, 64, ..., 1 rows, so that multi-row statements come in
/// at most eight shapes and stay in the prepared-statement cache.
fn pow2_chunks<T>(mut rest: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = 1usize << rest.len().min(128).ilog2();
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// `($1, $2, ...), (...)` for `rows` rows of `cols` parameters; `(?, ?, ...)` on SQLite, where
/// numbered parameters cost a scan of the statement's parameter list per bound value (the
/// quadratic cost showed as a third of the server's CPU in `sim bench ingest`).
pub fn placeholders(engine: Engine, rows: usize, cols: usize) -> String {
    if engine == Engine::Sqlite {
        let row = format!("({})", vec!["?"; cols].join(", "));
        return vec![row; rows].join(", ");
    }
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push('$');
            s.push_str(&(r * cols + c + 1).to_string());
        }
        s.push(')');
    }
    s
}

impl Db {
    /// Connects (creating a SQLite file when needed) and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Engine::Postgres
        } else {
            return Err(StorageError::UnsupportedUrl(url.to_owned()));
        };
        let url = match engine {
            Engine::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let max = match engine {
            // One writer at a time anyway; a few readers beside it.
            Engine::Sqlite => 4,
            Engine::Postgres => 16,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // cache_size: 32 MiB per connection at most (taken as used): history
                        // inserts land on every series' index page at once, and SQLite's default
                        // 2 MiB spilled them mid-transaction (ingest 35k -> see benchmarks).
                        // temp_store: statement journals in memory, not temp files.
                        conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON; PRAGMA cache_size=-32768; PRAGMA temp_store=MEMORY")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        match engine {
            Engine::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Engine::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self {
            pool,
            engine,
            tags: Arc::default(),
        })
    }

    /// The engine behind this pool.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Begins a transaction that writes. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a deferred transaction that has read before it writes gets
    /// SQLITE_BUSY at once, without waiting out the busy timeout, when another connection
    /// committed meanwhile ("database is locked" under concurrent ingest and API writes).
    pub(crate) async fn write_tx(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.engine {
            Engine::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Engine::Postgres => self.pool.begin().await,
        }
    }

    /// Reverts every migration (used by tests to prove migrations are reversible).
    pub async fn undo_all(&self) -> Result<(), StorageError> {
        match self.engine {
            Engine::Sqlite => SQLITE_MIGRATIONS.undo(&self.pool, 0).await?,
            Engine::Postgres => POSTGRES_MIGRATIONS.undo(&self.pool, 0).await?,
        }
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts a product; a duplicate key is a [`StorageError::Conflict`].
    pub async fn insert_product(&self, p: &Product) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT INTO products ({PRODUCT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        );
        sqlx::query(&sql)
            .bind(&p.product_key)
            .bind(&p.name)
            .bind(&p.node_type)
            .bind(&p.data_format)
            .bind(&p.product_secret)
            .bind(p.dynamic_register)
            .bind(&p.description)
            .bind(p.created_at)
            .bind(&p.tenant)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if unique_violation(&e) {
                    StorageError::Conflict(format!("product `{}` already exists", p.product_key))
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    /// All products, oldest first.
    pub async fn list_products(&self) -> Result<Vec<Product>, StorageError> {
        let sql = format!("SELECT {PRODUCT_COLS} FROM products ORDER BY created_at, product_key");
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// One product.
    pub async fn get_product(&self, pk: &str) -> Result<Option<Product>, StorageError> {
        let sql = format!("SELECT {PRODUCT_COLS} FROM products WHERE product_key = $1");
        Ok(sqlx::query_as(&sql)
            .bind(pk)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Sets whether a product allows dynamic registration. False when no such product.
    pub async fn set_dynamic_register(&self, pk: &str, on: bool) -> Result<bool, StorageError> {
        let r = sqlx::query("UPDATE products SET dynamic_register = $1 WHERE product_key = $2")
            .bind(i64::from(on))
            .bind(pk)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Updates a product's name and description. False when no such product.
    pub async fn update_product_text(
        &self,
        pk: &str,
        name: &str,
        description: &str,
    ) -> Result<bool, StorageError> {
        let r =
            sqlx::query("UPDATE products SET name = $1, description = $2 WHERE product_key = $3")
                .bind(name)
                .bind(description)
                .bind(pk)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Replaces a device's tags (a JSON object as text). False when no such device.
    pub async fn set_device_tags(
        &self,
        pk: &str,
        dn: &str,
        tags: &str,
    ) -> Result<bool, StorageError> {
        let r = self.update_device(DeviceColumn::Tags, tags, pk, dn).await;
        self.tags.forget(pk, dn);
        r
    }

    /// A device's tags (empty when it has none or does not exist), from memory when read
    /// recently: what the rules engine's `attribute()` reads for each message.
    pub async fn device_tags(&self, pk: &str, dn: &str) -> Result<Arc<TagMap>, StorageError> {
        if let Some(t) = self.tags.get(pk, dn) {
            return Ok(t);
        }
        let tags = self
            .get_device(pk, dn)
            .await?
            .and_then(|d| serde_json::from_str::<TagMap>(&d.tags).ok())
            .unwrap_or_default();
        let tags = Arc::new(tags);
        self.tags.put(pk, dn, tags.clone());
        Ok(tags)
    }

    /// Sets one column of a device; false when no such device.
    async fn update_device<'q, T>(
        &self,
        column: DeviceColumn,
        value: T,
        pk: &'q str,
        dn: &'q str,
    ) -> Result<bool, StorageError>
    where
        T: 'q + Send + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>,
    {
        let sql = match column {
            DeviceColumn::Enabled => {
                "UPDATE devices SET enabled = $1 WHERE product_key = $2 AND device_name = $3"
            }
            DeviceColumn::Secret => {
                "UPDATE devices SET device_secret = $1 WHERE product_key = $2 AND device_name = $3"
            }
            DeviceColumn::Tags => {
                "UPDATE devices SET tags = $1 WHERE product_key = $2 AND device_name = $3"
            }
        };
        let r = sqlx::query(sql)
            .bind(value)
            .bind(pk)
            .bind(dn)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a product, its devices and its thing models. False when no such product.
    pub async fn delete_product(&self, pk: &str) -> Result<bool, StorageError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM thing_models WHERE product_key = $1")
            .bind(pk)
            .execute(&mut *tx)
            .await?;
        for sql in [
            "DELETE FROM property_history WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1)",
            "DELETE FROM property_latest WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1)",
            "DELETE FROM property_chunks WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1)",
            // Its archive files lose their index entries; the reaper removes files left empty.
            "DELETE FROM archive_series WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1)",
            "DELETE FROM events WHERE product_key = $1",
            "DELETE FROM service_calls WHERE product_key = $1",
            "DELETE FROM raw_messages WHERE product_key = $1",
            "DELETE FROM topology WHERE gateway_product_key = $1",
            "DELETE FROM devices WHERE product_key = $1",
            "DELETE FROM product_scripts WHERE product_key = $1",
        ] {
            sqlx::query(sql).bind(pk).execute(&mut *tx).await?;
        }
        let r = sqlx::query("DELETE FROM products WHERE product_key = $1")
            .bind(pk)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Stores a new thing model version for a product (the previous ones are kept) and
    /// returns its number, starting at 1.
    pub async fn put_thing_model(&self, pk: &str, tsl: &str, at: i64) -> Result<i64, StorageError> {
        let mut tx = self.write_tx().await?;
        let row: AnyRow = sqlx::query(
            "SELECT COALESCE(MAX(version), 0) AS v FROM thing_models WHERE product_key = $1",
        )
        .bind(pk)
        .fetch_one(&mut *tx)
        .await?;
        let version = row.try_get::<i64, _>("v")? + 1;
        sqlx::query("INSERT INTO thing_models (product_key, version, tsl, created_at) VALUES ($1, $2, $3, $4)")
            .bind(pk)
            .bind(version)
            .bind(tsl)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if unique_violation(&e) {
                    StorageError::Conflict(format!(
                        "thing model of product `{pk}` was changed concurrently; retry"
                    ))
                } else {
                    e.into()
                }
            })?;
        tx.commit().await?;
        Ok(version)
    }

    /// A product's thing model: the given version, or the latest. Returns (version, TSL JSON,
    /// created at).
    pub async fn get_thing_model(
        &self,
        pk: &str,
        version: Option<i64>,
    ) -> Result<Option<(i64, String, i64)>, StorageError> {
        let row: Option<AnyRow> = match version {
            Some(v) => {
                sqlx::query("SELECT version, tsl, created_at FROM thing_models WHERE product_key = $1 AND version = $2")
                    .bind(pk)
                    .bind(v)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT version, tsl, created_at FROM thing_models WHERE product_key = $1 ORDER BY version DESC LIMIT 1")
                    .bind(pk)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.map(|r| -> Result<_, StorageError> {
            Ok((
                r.try_get("version")?,
                r.try_get("tsl")?,
                r.try_get("created_at")?,
            ))
        })
        .transpose()
    }

    /// Inserts devices in one transaction: all or none. A duplicate name is a conflict that
    /// names the device.
    pub async fn insert_devices(&self, devices: &[Device]) -> Result<(), StorageError> {
        let sql = format!(
            "INSERT INTO devices ({DEVICE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        let mut tx = self.write_tx().await?;
        for d in devices {
            sqlx::query(&sql)
                .bind(&d.product_key)
                .bind(&d.device_name)
                .bind(&d.device_secret)
                .bind(d.enabled)
                .bind(&d.status)
                .bind(d.created_at)
                .bind(d.first_online_at)
                .bind(d.last_online_at)
                .bind(d.last_offline_at)
                .bind(&d.client_addr)
                .bind(&d.tags)
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    if unique_violation(&e) {
                        StorageError::Conflict(format!(
                            "device `{}` already exists in product `{}`",
                            d.device_name, d.product_key
                        ))
                    } else {
                        e.into()
                    }
                })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// One device.
    pub async fn get_device(&self, pk: &str, dn: &str) -> Result<Option<Device>, StorageError> {
        let sql = format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE product_key = $1 AND device_name = $2"
        );
        Ok(sqlx::query_as(&sql)
            .bind(pk)
            .bind(dn)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The devices of product `pk` with these names (those that exist), by name: one query
    /// per 256 names.
    pub async fn devices_named(
        &self,
        pk: &str,
        names: &[&str],
    ) -> Result<HashMap<String, Device>, StorageError> {
        let rows: Vec<Device> = self
            .select_named(&format!("SELECT {DEVICE_COLS} FROM devices"), pk, names)
            .await?;
        Ok(rows
            .into_iter()
            .map(|d| (d.device_name.clone(), d))
            .collect())
    }

    /// Rows of `select` (a `SELECT ... FROM table` whose table has `product_key` and
    /// `device_name`) for product `pk` and these names: one query per 256 names.
    pub(crate) async fn select_named<T>(
        &self,
        select: &str,
        pk: &str,
        names: &[&str],
    ) -> Result<Vec<T>, StorageError>
    where
        T: for<'r> sqlx::FromRow<'r, AnyRow> + Send + Unpin,
    {
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(256) {
            let sql = format!(
                "{select} WHERE product_key = $1 AND device_name IN ({})",
                numbered(2, chunk.len())
            );
            let mut q = sqlx::query_as::<_, T>(&sql).bind(pk);
            for n in chunk {
                q = q.bind(*n);
            }
            out.extend(q.fetch_all(&self.pool).await?);
        }
        Ok(out)
    }

    /// A page of a product's devices ordered by name, plus the total count.
    pub async fn list_devices(
        &self,
        pk: &str,
        filter: &DeviceFilter<'_>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<Device>, i64), StorageError> {
        // Tags are a JSON object serialised without spaces: a tag is the text `"k":"v"`.
        let tag_pattern = filter.tag.map(|(k, v)| {
            let text = format!("{}:{}", json_string(k), json_string(v));
            format!("%{}%", like_escape(&text))
        });
        let mut cond = String::from("product_key = $1");
        let mut n = 1;
        if filter.status.is_some() {
            n += 1;
            cond.push_str(&format!(" AND status = ${n}"));
        }
        if tag_pattern.is_some() {
            n += 1;
            cond.push_str(&format!(" AND tags LIKE ${n} ESCAPE '\\'"));
        }
        let name_pattern = filter.name.map(|t| format!("%{}%", like_escape(t)));
        if name_pattern.is_some() {
            n += 1;
            cond.push_str(&format!(" AND device_name LIKE ${n} ESCAPE '\\'"));
        }
        let sql = format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE {cond} ORDER BY device_name LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let mut q = sqlx::query_as(&sql).bind(pk);
        let count_sql = format!("SELECT COUNT(*) AS n FROM devices WHERE {cond}");
        let mut c = sqlx::query(&count_sql).bind(pk);
        if let Some(st) = filter.status {
            q = q.bind(st);
            c = c.bind(st);
        }
        if let Some(t) = &tag_pattern {
            q = q.bind(t.clone());
            c = c.bind(t.clone());
        }
        if let Some(t) = &name_pattern {
            q = q.bind(t.clone());
            c = c.bind(t.clone());
        }
        let rows = q.bind(limit).bind(offset).fetch_all(&self.pool).await?;
        let total: AnyRow = c.fetch_one(&self.pool).await?;
        Ok((rows, total.try_get::<i64, _>("n")?))
    }

    /// Enables or disables a device. False when no such device.
    pub async fn set_device_enabled(
        &self,
        pk: &str,
        dn: &str,
        enabled: bool,
    ) -> Result<bool, StorageError> {
        self.update_device(DeviceColumn::Enabled, i64::from(enabled), pk, dn)
            .await
    }

    /// Replaces a device's secret (dynamic registration). False when no such device.
    pub async fn set_device_secret(
        &self,
        pk: &str,
        dn: &str,
        secret: &str,
    ) -> Result<bool, StorageError> {
        self.update_device(DeviceColumn::Secret, secret, pk, dn)
            .await
    }

    /// Deletes a device. False when no such device.
    pub async fn delete_device(&self, pk: &str, dn: &str) -> Result<bool, StorageError> {
        self.tags.forget(pk, dn);
        let mut tx = self.write_tx().await?;
        for sql in [
            "DELETE FROM property_history WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2)",
            "DELETE FROM property_latest WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2)",
            "DELETE FROM property_chunks WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2)",
            "DELETE FROM archive_series WHERE series_id IN (SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2)",
            "DELETE FROM events WHERE product_key = $1 AND device_name = $2",
            "DELETE FROM service_calls WHERE product_key = $1 AND device_name = $2",
            "DELETE FROM raw_messages WHERE product_key = $1 AND device_name = $2",
            "DELETE FROM topology WHERE gateway_product_key = $1 AND gateway_device_name = $2",
        ] {
            sqlx::query(sql).bind(pk).bind(dn).execute(&mut *tx).await?;
        }
        let r = sqlx::query("DELETE FROM devices WHERE product_key = $1 AND device_name = $2")
            .bind(pk)
            .bind(dn)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Records a batch of presence changes in one transaction: the history rows and each
    /// device's current status, times and address. Multi-row statements keep the cost of a
    /// batch close to that of one change.
    pub async fn record_presence(&self, events: &[PresenceEvent]) -> Result<(), StorageError> {
        // Fold the batch per device, in order, into its final state.
        struct Fold<'a> {
            status: &'a str,
            last_online: Option<i64>,
            first_online: Option<i64>,
            last_offline: Option<i64>,
            addr: Option<&'a str>,
        }
        let mut folds: Vec<((&str, &str), Fold<'_>)> = Vec::new();
        let mut index: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::new();
        for e in events {
            let key = (e.product_key.as_str(), e.device_name.as_str());
            let at = *index.entry(key).or_insert_with(|| {
                folds.push((
                    key,
                    Fold {
                        status: "",
                        last_online: None,
                        first_online: None,
                        last_offline: None,
                        addr: None,
                    },
                ));
                folds.len() - 1
            });
            let f = &mut folds[at].1;
            f.status = &e.status;
            if e.status == "online" {
                f.last_online = Some(e.at);
                f.first_online = f.first_online.or(Some(e.at));
            } else {
                f.last_offline = Some(e.at);
            }
            if let Some(a) = &e.client_addr {
                f.addr = Some(a);
            }
        }
        let mut tx = self.write_tx().await?;
        for chunk in pow2_chunks(events) {
            let mut sql = String::from(
                "INSERT INTO presence_events (product_key, device_name, status, reason, client_addr, at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 6;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6
                ));
            }
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(&e.product_key)
                    .bind(&e.device_name)
                    .bind(&e.status)
                    .bind(&e.reason)
                    .bind(&e.client_addr)
                    .bind(e.at);
            }
            q.execute(&mut *tx).await?;
        }
        for devices in pow2_chunks(&folds) {
            let mut sql = String::from(
                "UPDATE devices SET status = v.column3, \
                 last_online_at = COALESCE(CAST(v.column4 AS BIGINT), last_online_at), \
                 first_online_at = COALESCE(first_online_at, CAST(v.column5 AS BIGINT)), \
                 last_offline_at = COALESCE(CAST(v.column6 AS BIGINT), last_offline_at), \
                 client_addr = COALESCE(v.column7, client_addr) FROM (VALUES ",
            );
            for i in 0..devices.len() {
                let b = i * 7;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7
                ));
            }
            sql.push_str(
                ") AS v WHERE devices.product_key = v.column1 AND devices.device_name = v.column2",
            );
            let mut q = sqlx::query(&sql);
            for (key, f) in devices {
                q = q
                    .bind(key.0)
                    .bind(key.1)
                    .bind(f.status)
                    .bind(f.last_online)
                    .bind(f.first_online)
                    .bind(f.last_offline)
                    .bind(f.addr);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks every device online in storage as offline: run at start-up, since no connection
    /// survives a restart of the process that held it.
    pub async fn reset_online(&self, at: i64) -> Result<u64, StorageError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO presence_events (product_key, device_name, status, reason, client_addr, at) SELECT product_key, device_name, 'offline', 'server restart', client_addr, $1 FROM devices WHERE status = 'online'",
        )
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let r = sqlx::query(
            "UPDATE devices SET status = 'offline', last_offline_at = $1 WHERE status = 'online'",
        )
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected())
    }

    /// A device's most recent presence changes, newest first.
    pub async fn presence_history(
        &self,
        pk: &str,
        dn: &str,
        limit: i64,
    ) -> Result<Vec<PresenceEvent>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT product_key, device_name, status, reason, client_addr, at FROM presence_events WHERE product_key = $1 AND device_name = $2 ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(pk)
        .bind(dn)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::pow2_chunks;

    #[test]
    fn chunks_are_powers_of_two_up_to_128() {
        let v: Vec<u32> = (0..455).collect();
        let sizes: Vec<usize> = pow2_chunks(&v).map(<[u32]>::len).collect();
        assert_eq!(sizes, [128, 128, 128, 64, 4, 2, 1]);
        assert_eq!(pow2_chunks::<u8>(&[]).count(), 0);
    }
}

#[cfg(test)]
mod pragma_tests {
    use super::Db;
    use sqlx::Row;

    /// Read-then-write transactions from several connections at once: each waits for the
    /// write lock instead of failing with "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_read_then_write_transactions_wait_their_turn() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE counter (n BIGINT PRIMARY KEY)")
            .execute(&db.pool)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let mut tx = db.write_tx().await?;
                    let row = sqlx::query("SELECT COALESCE(MAX(n), 0) AS n FROM counter")
                        .fetch_one(&mut *tx)
                        .await?;
                    let n: i64 = row.try_get("n")?;
                    tokio::task::yield_now().await;
                    sqlx::query("INSERT INTO counter (n) VALUES ($1)")
                        .bind(n + 1)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let row = sqlx::query("SELECT COUNT(*) AS c, MAX(n) AS m FROM counter")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(row.try_get::<i64, _>("c").unwrap(), 80);
        assert_eq!(row.try_get::<i64, _>("m").unwrap(), 80);
    }

    #[tokio::test]
    async fn every_sqlite_pragma_of_after_connect_applies() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("p.db").display()))
            .await
            .unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        for (pragma, want) in [
            ("synchronous", 1i64),
            ("busy_timeout", 10000),
            ("foreign_keys", 1),
            ("cache_size", -32768),
            ("temp_store", 2),
        ] {
            let row = sqlx::query(&format!("PRAGMA {pragma}"))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            assert_eq!(row.try_get::<i64, _>(0).unwrap(), want, "{pragma}");
        }
    }
}
