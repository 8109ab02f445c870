//! Storage of thing data: property series (latest value and history), events, service calls,
//! shadows, gateway topology and raw messages. Same SQL on SQLite and PostgreSQL.

use crate::storage::{Db, StorageError};
use serde::Serialize;
use sqlx::Row;
use std::collections::HashMap;

/// One property value to store. `series_id` comes from [`Db::series_ids`].
#[derive(Debug, Clone)]
pub struct PropertyRow {
    /// Series (device + identifier).
    pub series_id: i64,
    /// When the value was measured, ms since the Unix epoch.
    pub ts: i64,
    /// The value as JSON text.
    pub value: String,
    /// False when the storage policy keeps only the latest value of this point (it is not
    /// added to the history).
    pub history: bool,
}

/// One event as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// Event identifier from the thing model.
    pub identifier: String,
    /// `info`, `alert` or `error` (from the thing model; `info` without one).
    pub event_type: String,
    /// The Alink message id the device sent.
    pub message_id: String,
    /// The output data as JSON text.
    pub output: String,
    /// ms since the Unix epoch.
    pub ts: i64,
}

/// Raw bytes to or from a device of a product with data format `raw`.
#[derive(Debug, Clone)]
pub struct RawRow {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// `up`, `down` or `down_reply`.
    pub direction: &'static str,
    /// The bytes.
    pub payload: Vec<u8>,
    /// ms since the Unix epoch.
    pub ts: i64,
}

/// A service call (including property set/get) as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ServiceCall {
    /// Product key.
    pub product_key: String,
    /// Device name.
    pub device_name: String,
    /// The Alink message id sent to the device.
    pub message_id: String,
    /// Service identifier (`property.set` and `property.get` for those).
    pub identifier: String,
    /// `async` or `sync` (RRPC).
    pub call_type: String,
    /// Input parameters as JSON text.
    pub params: String,
    /// `pending`, `succeeded`, `failed` or `timed_out`.
    pub status: String,
    /// Alink code from the device's reply.
    pub code: Option<i64>,
    /// The device's reply (`data`) as JSON text.
    pub reply: Option<String>,
    /// ms since the Unix epoch.
    pub created_at: i64,
    /// When a pending call becomes `timed_out`, ms.
    pub deadline: i64,
    /// When the reply arrived, ms.
    pub replied_at: Option<i64>,
}

/// A device shadow as stored (JSON objects as text).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ShadowRow {
    /// Reported state.
    pub reported: String,
    /// Desired state.
    pub desired: String,
    /// Per-attribute update times.
    pub metadata: String,
    /// Version, raised by every update.
    pub version: i64,
    /// ms since the Unix epoch.
    pub updated_at: i64,
}

/// A sub-device in a gateway's topology.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TopoRow {
    /// Sub-device product key.
    pub product_key: String,
    /// Sub-device name.
    pub device_name: String,
    /// Gateway product key.
    pub gateway_product_key: String,
    /// Gateway device name.
    pub gateway_device_name: String,
    /// When the relation was added, ms.
    pub created_at: i64,
}

/// One message's rows, with its duplicate-dropping key (product key, device name, message id).
pub type ThingMessage = (
    Option<(String, String, String)>,
    Vec<PropertyRow>,
    Vec<EventRow>,
    Vec<RawRow>,
);

/// A series key: product key, device name, property identifier.
pub type SeriesKey = (String, String, String);

const CALL_COLS: &str = "product_key, device_name, message_id, identifier, call_type, params, status, code, reply, created_at, deadline, replied_at";

/// Rows per multi-row statement: large enough to amortise the statement, within every engine's
/// parameter limit (SQLite's is 32766 in the bundled build).
const CHUNK: usize = 256;

/// Splits into chunks of 256, then powers of two, so statements come in few shapes and stay in
/// the prepared-statement cache.
fn chunks<T>(mut rest: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = 1usize << rest.len().min(CHUNK).ilog2();
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

impl Db {
    /// Series ids for these keys, creating the missing ones.
    pub async fn series_ids(
        &self,
        keys: &[SeriesKey],
    ) -> Result<HashMap<SeriesKey, i64>, StorageError> {
        let mut out = HashMap::with_capacity(keys.len());
        let mut tx = self.write_tx().await?;
        for chunk in chunks(keys) {
            let sql = format!(
                "INSERT INTO property_series (product_key, device_name, identifier) VALUES {} ON CONFLICT DO NOTHING",
                crate::storage::placeholders(self.engine(), chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(&k.0).bind(&k.1).bind(&k.2);
            }
            q.execute(&mut *tx).await?;
        }
        for k in keys {
            let row = sqlx::query(
                "SELECT id FROM property_series WHERE product_key = $1 AND device_name = $2 AND identifier = $3",
            )
            .bind(&k.0)
            .bind(&k.1)
            .bind(&k.2)
            .fetch_one(&mut *tx)
            .await?;
            out.insert(k.clone(), row.try_get::<i64, _>(0)?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Stores property values (history, and the latest value per series unless a newer one is
    /// already stored), events and raw messages in one transaction.
    pub async fn store_thing_data(
        &self,
        props: &[PropertyRow],
        events: &[EventRow],
        raws: &[RawRow],
    ) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        self.insert_thing_rows(&mut tx, props, events, raws).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Like [`Db::store_thing_data`] for messages that may carry a duplicate-dropping key: a
    /// message whose key was stored before is skipped. Returns, per message, true when it was a
    /// duplicate. One transaction for all.
    pub async fn store_thing_messages(
        &self,
        messages: &[ThingMessage],
        at: i64,
    ) -> Result<Vec<bool>, StorageError> {
        let mut tx = self.write_tx().await?;
        let mut dup = Vec::with_capacity(messages.len());
        for (key, ..) in messages {
            let d = match key {
                None => false,
                Some((pk, dn, id)) => {
                    sqlx::query("INSERT INTO message_ids (product_key, device_name, message_id, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                        .bind(pk)
                        .bind(dn)
                        .bind(id)
                        .bind(at)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 0
                }
            };
            dup.push(d);
        }
        let mut props = Vec::new();
        let mut events = Vec::new();
        let mut raws = Vec::new();
        for ((_, p, e, r), d) in messages.iter().zip(&dup) {
            if !d {
                props.extend(p.iter().cloned());
                events.extend(e.iter().cloned());
                raws.extend(r.iter().cloned());
            }
        }
        self.insert_thing_rows(&mut tx, &props, &events, &raws)
            .await?;
        tx.commit().await?;
        Ok(dup)
    }

    /// Forgets duplicate-dropping keys older than `cutoff`.
    pub async fn expire_message_ids(&self, cutoff: i64) -> Result<u64, StorageError> {
        Ok(sqlx::query("DELETE FROM message_ids WHERE at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn insert_thing_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        props: &[PropertyRow],
        events: &[EventRow],
        raws: &[RawRow],
    ) -> Result<(), StorageError> {
        // History: the batch's points land as one segment (the sealer makes chunks of it).
        let history: Vec<&PropertyRow> = props.iter().filter(|p| p.history).collect();
        if let (Some(min), Some(max)) = (
            history.iter().map(|p| p.ts).min(),
            history.iter().map(|p| p.ts).max(),
        ) {
            let data = crate::tsdb::segment::encode(
                history
                    .iter()
                    .map(|p| (p.series_id, p.ts, p.value.as_str())),
            )
            .map_err(|e| StorageError::TooLarge(format!("a batch of property values: {e}")))?;
            sqlx::query(
                "INSERT INTO property_segments (n, min_ts, max_ts, data) VALUES ($1, $2, $3, $4)",
            )
            .bind(i64::try_from(history.len()).unwrap_or(i64::MAX))
            .bind(min)
            .bind(max)
            .bind(data)
            .execute(&mut **tx)
            .await?;
        }
        // Latest: one row per series (the newest in the batch), and never older than stored.
        let mut newest: HashMap<i64, &PropertyRow> = HashMap::new();
        for p in props {
            let e = newest.entry(p.series_id).or_insert(p);
            if p.ts >= e.ts {
                *e = p;
            }
        }
        let mut latest: Vec<&PropertyRow> = newest.into_values().collect();
        latest.sort_unstable_by_key(|p| p.series_id);
        for chunk in chunks(&latest) {
            let sql = format!(
                "INSERT INTO property_latest (series_id, ts, value) VALUES {} ON CONFLICT (series_id) DO UPDATE SET ts = excluded.ts, value = excluded.value WHERE excluded.ts >= property_latest.ts",
                crate::storage::placeholders(self.engine(), chunk.len(), 3)
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q.bind(p.series_id).bind(p.ts).bind(&p.value);
            }
            q.execute(&mut **tx).await?;
        }
        for chunk in chunks(events) {
            let sql = format!(
                "INSERT INTO events (product_key, device_name, identifier, event_type, message_id, output, ts) VALUES {}",
                crate::storage::placeholders(self.engine(), chunk.len(), 7)
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(&e.product_key)
                    .bind(&e.device_name)
                    .bind(&e.identifier)
                    .bind(&e.event_type)
                    .bind(&e.message_id)
                    .bind(&e.output)
                    .bind(e.ts);
            }
            q.execute(&mut **tx).await?;
        }
        for r in raws {
            sqlx::query("INSERT INTO raw_messages (product_key, device_name, direction, payload, ts) VALUES ($1, $2, $3, $4, $5)")
                .bind(&r.product_key)
                .bind(&r.device_name)
                .bind(r.direction)
                .bind(&r.payload)
                .bind(r.ts)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Latest value of every property of a device: (identifier, ts, JSON text).
    pub async fn latest_properties(
        &self,
        pk: &str,
        dn: &str,
    ) -> Result<Vec<(String, i64, String)>, StorageError> {
        let rows = sqlx::query(
            "SELECT s.identifier, l.ts, l.value FROM property_series s JOIN property_latest l ON l.series_id = s.id WHERE s.product_key = $1 AND s.device_name = $2 ORDER BY s.identifier",
        )
        .bind(pk)
        .bind(dn)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Events of a device in `[from, to]`, newest first, optionally of one identifier.
    pub async fn events(
        &self,
        pk: &str,
        dn: &str,
        identifier: Option<&str>,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT product_key, device_name, identifier, event_type, message_id, output, ts FROM events WHERE product_key = $1 AND device_name = $2 AND ($3 = '' OR identifier = $3) AND ts >= $4 AND ts <= $5 ORDER BY ts DESC, id DESC LIMIT $6",
        )
        .bind(pk)
        .bind(dn)
        .bind(identifier.unwrap_or(""))
        .bind(from)
        .bind(to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Raw messages of a device, newest first: (direction, payload, ts).
    pub async fn raw_messages(
        &self,
        pk: &str,
        dn: &str,
        limit: i64,
    ) -> Result<Vec<(String, Vec<u8>, i64)>, StorageError> {
        let rows = sqlx::query(
            "SELECT direction, payload, ts FROM raw_messages WHERE product_key = $1 AND device_name = $2 ORDER BY ts DESC, id DESC LIMIT $3",
        )
        .bind(pk)
        .bind(dn)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Records a new pending call.
    /// Records a new call; `false` when the device already has a call with this message id
    /// (ids are reused after a restart that came sooner than the calls made).
    pub async fn insert_call(&self, c: &ServiceCall) -> Result<bool, StorageError> {
        let sql = format!(
            "INSERT INTO service_calls ({CALL_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING"
        );
        let done = sqlx::query(&sql)
            .bind(&c.product_key)
            .bind(&c.device_name)
            .bind(&c.message_id)
            .bind(&c.identifier)
            .bind(&c.call_type)
            .bind(&c.params)
            .bind(&c.status)
            .bind(c.code)
            .bind(&c.reply)
            .bind(c.created_at)
            .bind(c.deadline)
            .bind(c.replied_at)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the device's answer to a pending call. `None` when no such call is pending
    /// (unknown id, or already answered or timed out).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_call(
        &self,
        pk: &str,
        dn: &str,
        message_id: &str,
        status: &str,
        code: Option<i64>,
        reply: Option<&str>,
        at: i64,
    ) -> Result<Option<ServiceCall>, StorageError> {
        let r = sqlx::query(
            "UPDATE service_calls SET status = $4, code = $5, reply = $6, replied_at = $7 WHERE product_key = $1 AND device_name = $2 AND message_id = $3 AND status = 'pending'",
        )
        .bind(pk)
        .bind(dn)
        .bind(message_id)
        .bind(status)
        .bind(code)
        .bind(reply)
        .bind(at)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_call(pk, dn, message_id).await
    }

    /// One call.
    pub async fn get_call(
        &self,
        pk: &str,
        dn: &str,
        message_id: &str,
    ) -> Result<Option<ServiceCall>, StorageError> {
        let sql = format!("SELECT {CALL_COLS} FROM service_calls WHERE product_key = $1 AND device_name = $2 AND message_id = $3");
        Ok(sqlx::query_as(&sql)
            .bind(pk)
            .bind(dn)
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// A device's calls, newest first.
    pub async fn list_calls(
        &self,
        pk: &str,
        dn: &str,
        limit: i64,
    ) -> Result<Vec<ServiceCall>, StorageError> {
        let sql = format!("SELECT {CALL_COLS} FROM service_calls WHERE product_key = $1 AND device_name = $2 ORDER BY created_at DESC LIMIT $3");
        Ok(sqlx::query_as(&sql)
            .bind(pk)
            .bind(dn)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Marks pending calls past their deadline as timed out; returns how many.
    pub async fn expire_calls(&self, now: i64) -> Result<u64, StorageError> {
        let r = sqlx::query(
            "UPDATE service_calls SET status = 'timed_out' WHERE status = 'pending' AND deadline < $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// A device's shadow.
    pub async fn get_shadow(&self, pk: &str, dn: &str) -> Result<Option<ShadowRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT reported, desired, metadata, version, updated_at FROM shadows WHERE product_key = $1 AND device_name = $2",
        )
        .bind(pk)
        .bind(dn)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Writes a shadow if its stored version is still `expected` (`None`: no shadow yet).
    /// False when another update came first.
    pub async fn put_shadow(
        &self,
        pk: &str,
        dn: &str,
        expected: Option<i64>,
        s: &ShadowRow,
    ) -> Result<bool, StorageError> {
        let sql = match expected {
            None => "INSERT INTO shadows (product_key, device_name, reported, desired, metadata, version, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            Some(_) => "UPDATE shadows SET reported = $3, desired = $4, metadata = $5, version = $6, updated_at = $7 WHERE product_key = $1 AND device_name = $2 AND version = $8",
        };
        let mut q = sqlx::query(sql)
            .bind(pk)
            .bind(dn)
            .bind(&s.reported)
            .bind(&s.desired)
            .bind(&s.metadata)
            .bind(s.version)
            .bind(s.updated_at);
        if let Some(v) = expected {
            q = q.bind(v);
        }
        let r = q.execute(&self.pool).await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds (or moves) sub-devices to a gateway's topology, all in one transaction.
    pub async fn add_topology(
        &self,
        gateway: (&str, &str),
        subs: &[(String, String)],
        at: i64,
    ) -> Result<(), StorageError> {
        // One row per sub-device (a statement may not update a row twice).
        let mut unique: Vec<&(String, String)> = subs.iter().collect();
        unique.sort();
        unique.dedup();
        let mut tx = self.write_tx().await?;
        for chunk in chunks(&unique) {
            let sql = format!(
                "INSERT INTO topology (product_key, device_name, gateway_product_key, gateway_device_name, created_at) VALUES {} \
                 ON CONFLICT (product_key, device_name) DO UPDATE SET gateway_product_key = excluded.gateway_product_key, gateway_device_name = excluded.gateway_device_name, created_at = excluded.created_at",
                crate::storage::placeholders(self.engine(), chunk.len(), 5)
            );
            let mut q = sqlx::query(&sql);
            for (pk, dn) in chunk {
                q = q.bind(pk).bind(dn).bind(gateway.0).bind(gateway.1).bind(at);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes sub-devices from a gateway's topology; returns those that were in it.
    pub async fn delete_topology(
        &self,
        gateway: (&str, &str),
        subs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StorageError> {
        let mut removed = Vec::new();
        let mut tx = self.write_tx().await?;
        for (pk, dn) in subs {
            let r = sqlx::query("DELETE FROM topology WHERE product_key = $1 AND device_name = $2 AND gateway_product_key = $3 AND gateway_device_name = $4")
                .bind(pk)
                .bind(dn)
                .bind(gateway.0)
                .bind(gateway.1)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() > 0 {
                removed.push((pk.clone(), dn.clone()));
            }
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// A gateway's sub-devices.
    pub async fn topology_of(&self, gpk: &str, gdn: &str) -> Result<Vec<TopoRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT product_key, device_name, gateway_product_key, gateway_device_name, created_at FROM topology WHERE gateway_product_key = $1 AND gateway_device_name = $2 ORDER BY product_key, device_name",
        )
        .bind(gpk)
        .bind(gdn)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The gateways of product `pk`'s sub-devices with these names (those in a topology), by
    /// name: one query per 256 names.
    pub async fn gateways_of_named(
        &self,
        pk: &str,
        names: &[&str],
    ) -> Result<HashMap<String, TopoRow>, StorageError> {
        let rows: Vec<TopoRow> = self
            .select_named(
                "SELECT product_key, device_name, gateway_product_key, gateway_device_name, created_at FROM topology",
                pk,
                names,
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|t| (t.device_name.clone(), t))
            .collect())
    }

    /// The gateway a sub-device belongs to.
    pub async fn gateway_of(&self, pk: &str, dn: &str) -> Result<Option<TopoRow>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT product_key, device_name, gateway_product_key, gateway_device_name, created_at FROM topology WHERE product_key = $1 AND device_name = $2",
        )
        .bind(pk)
        .bind(dn)
        .fetch_optional(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Engine;

    #[test]
    fn placeholders_number_rows_then_columns() {
        assert_eq!(
            crate::storage::placeholders(Engine::Postgres, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(
            crate::storage::placeholders(Engine::Sqlite, 2, 2),
            "(?, ?), (?, ?)"
        );
        let sizes: Vec<usize> = chunks(&[0u8; 700]).map(<[u8]>::len).collect();
        assert_eq!(sizes, [256, 256, 128, 32, 16, 8, 4]);
    }
}
