//! Storage of application access: access keys, consumer groups, subscriptions, and the durable
//! per-group message queue.

use crate::storage::{Db, StorageError};
use serde::Serialize;
use sqlx::Row;

/// An application access key.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AccessKey {
    /// Public id.
    pub access_key_id: String,
    /// Secret the application signs with.
    pub access_key_secret: String,
    /// Free text.
    pub description: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
}

/// A consumer group.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ConsumerGroup {
    /// Generated id.
    pub group_id: String,
    /// Unique name.
    pub name: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
}

/// A product's messages of some types, for one group.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Subscription {
    /// Product key.
    pub product_key: String,
    /// Consumer group.
    pub group_id: String,
    /// Comma-separated message types.
    pub message_types: String,
    /// ms since the Unix epoch.
    pub created_at: i64,
}

/// A message waiting for a group.
#[derive(Debug, Clone)]
pub struct QueuedRow {
    /// Row id (per group queue position).
    pub id: i64,
    /// Topic.
    pub topic: String,
    /// Message id, the same in every group.
    pub message_id: String,
    /// Body.
    pub payload: Vec<u8>,
    /// When the platform generated it, ms.
    pub generated_at: i64,
}

/// A message to enqueue for one group.
#[derive(Debug, Clone)]
pub struct NewRow {
    /// Group.
    pub group_id: String,
    /// Topic.
    pub topic: String,
    /// Message id.
    pub message_id: String,
    /// Body.
    pub payload: Vec<u8>,
    /// ms.
    pub generated_at: i64,
}

fn conflict(e: sqlx::Error, what: String) -> StorageError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StorageError::Conflict(what),
        _ => e.into(),
    }
}

impl Db {
    /// Stores a new access key.
    pub async fn insert_access_key(&self, k: &AccessKey) -> Result<(), StorageError> {
        sqlx::query("INSERT INTO access_keys (access_key_id, access_key_secret, description, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&k.access_key_id)
            .bind(&k.access_key_secret)
            .bind(&k.description)
            .bind(k.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict(e, format!("access key `{}` exists", k.access_key_id)))?;
        Ok(())
    }

    /// Every access key.
    pub async fn list_access_keys(&self) -> Result<Vec<AccessKey>, StorageError> {
        Ok(sqlx::query_as("SELECT access_key_id, access_key_secret, description, created_at FROM access_keys ORDER BY created_at")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Deletes an access key; false when it did not exist.
    pub async fn delete_access_key(&self, id: &str) -> Result<bool, StorageError> {
        let r = sqlx::query("DELETE FROM access_keys WHERE access_key_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Stores a new consumer group; a taken name is a conflict.
    pub async fn insert_group(&self, g: &ConsumerGroup) -> Result<(), StorageError> {
        sqlx::query("INSERT INTO consumer_groups (group_id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&g.group_id)
            .bind(&g.name)
            .bind(g.created_at)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict(e, format!("a consumer group named `{}` exists", g.name)))?;
        Ok(())
    }

    /// Every consumer group.
    pub async fn list_groups(&self) -> Result<Vec<ConsumerGroup>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT group_id, name, created_at FROM consumer_groups ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// One consumer group.
    pub async fn get_group(&self, id: &str) -> Result<Option<ConsumerGroup>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT group_id, name, created_at FROM consumer_groups WHERE group_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Deletes a group, its subscriptions and its queue; false when it did not exist.
    pub async fn delete_group(&self, id: &str) -> Result<bool, StorageError> {
        let mut tx = self.write_tx().await?;
        for sql in [
            "DELETE FROM app_messages WHERE group_id = $1",
            "DELETE FROM subscriptions WHERE group_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        let r = sqlx::query("DELETE FROM consumer_groups WHERE group_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Binds groups to a product's messages of `types` (replacing earlier bindings of those
    /// groups to that product).
    pub async fn put_subscriptions(
        &self,
        pk: &str,
        groups: &[String],
        types: &str,
        at: i64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        for g in groups {
            sqlx::query(
                "INSERT INTO subscriptions (product_key, group_id, message_types, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (product_key, group_id) DO UPDATE SET message_types = excluded.message_types",
            )
            .bind(pk)
            .bind(g)
            .bind(types)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every subscription.
    pub async fn list_subscriptions(&self) -> Result<Vec<Subscription>, StorageError> {
        Ok(sqlx::query_as("SELECT product_key, group_id, message_types, created_at FROM subscriptions ORDER BY product_key, group_id")
            .fetch_all(&self.pool)
            .await?)
    }

    /// Removes one binding; false when it did not exist.
    pub async fn delete_subscription(&self, pk: &str, group: &str) -> Result<bool, StorageError> {
        let r = sqlx::query("DELETE FROM subscriptions WHERE product_key = $1 AND group_id = $2")
            .bind(pk)
            .bind(group)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Appends messages to their groups' queues in one transaction; returns their row ids in
    /// order.
    pub async fn enqueue_app_messages(&self, rows: &[NewRow]) -> Result<Vec<i64>, StorageError> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut tx = self.write_tx().await?;
        for r in rows {
            let row = sqlx::query(
                "INSERT INTO app_messages (group_id, topic, message_id, payload, generated_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(&r.group_id)
            .bind(&r.topic)
            .bind(&r.message_id)
            .bind(&r.payload)
            .bind(r.generated_at)
            .fetch_one(&mut *tx)
            .await?;
            ids.push(row.try_get::<i64, _>(0)?);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// The highest queue row id (0 when the queue is empty).
    pub async fn max_app_message_id(&self) -> Result<i64, StorageError> {
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM app_messages")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Up to `limit` queued messages of a group with ids above `after`, oldest first.
    pub async fn app_backlog(
        &self,
        group: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<QueuedRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT id, topic, message_id, payload, generated_at FROM app_messages WHERE group_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(group)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QueuedRow {
                    id: r.try_get(0)?,
                    topic: r.try_get(1)?,
                    message_id: r.try_get(2)?,
                    payload: r.try_get(3)?,
                    generated_at: r.try_get(4)?,
                })
            })
            .collect()
    }

    /// Removes accepted messages.
    pub async fn ack_app_messages(&self, ids: &[i64]) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        for chunk in ids.chunks(256) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "DELETE FROM app_messages WHERE id IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Drops a group's messages generated before `cutoff`; returns how many.
    pub async fn expire_app_messages(
        &self,
        cutoff: i64,
    ) -> Result<Vec<(String, i64)>, StorageError> {
        let rows = sqlx::query(
            "SELECT group_id, COUNT(*) FROM app_messages WHERE generated_at < $1 GROUP BY group_id",
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let out: Vec<(String, i64)> = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        if !out.is_empty() {
            sqlx::query("DELETE FROM app_messages WHERE generated_at < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
        }
        Ok(out)
    }

    /// Keeps at most `max` messages per group (the newest); returns how many each lost.
    pub async fn trim_app_messages(&self, max: i64) -> Result<Vec<(String, i64)>, StorageError> {
        let rows = sqlx::query(
            "SELECT group_id, COUNT(*) FROM app_messages GROUP BY group_id HAVING COUNT(*) > $1",
        )
        .bind(max)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let group: String = r.try_get(0)?;
            let count: i64 = r.try_get(1)?;
            let excess = count - max;
            sqlx::query(
                "DELETE FROM app_messages WHERE id IN (SELECT id FROM app_messages WHERE group_id = $1 ORDER BY id LIMIT $2)",
            )
            .bind(&group)
            .bind(excess)
            .execute(&self.pool)
            .await?;
            out.push((group, excess));
        }
        Ok(out)
    }

    /// Per group: queued messages and the oldest one's generation time.
    pub async fn app_backlog_stats(&self) -> Result<Vec<(String, i64, i64)>, StorageError> {
        let rows = sqlx::query(
            "SELECT group_id, COUNT(*), MIN(generated_at) FROM app_messages GROUP BY group_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }
}
