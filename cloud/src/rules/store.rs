//! Rules, their saved window state, dead letters, user tables and scripts, in the platform's
//! database (SQLite or PostgreSQL, the same SQL for both).

use crate::storage::{Db, StorageError};
use serde::Serialize;
use sqlx::Row;

/// A rule as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RuleRow {
    /// Id.
    pub rule_id: String,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The SQL.
    pub sql_text: String,
    /// Actions, JSON.
    pub actions: String,
    /// 1 when enabled.
    pub enabled: i64,
    /// 1 when its messages and outputs go through a durable queue (at least once).
    pub durable: i64,
    /// ms since the Unix epoch.
    pub created_at: i64,
    /// ms since the Unix epoch.
    pub updated_at: i64,
}

/// A dead letter: an action's output that kept failing.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// Id.
    pub id: i64,
    /// Rule.
    pub rule_id: String,
    /// Index of the action in the rule.
    pub action: i64,
    /// Action kind.
    pub kind: String,
    /// What it was to deliver (JSON).
    pub payload: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i64,
    /// When it was given up, ms.
    pub at: i64,
}

const RULE_COLS: &str =
    "rule_id, name, description, sql_text, actions, enabled, created_at, updated_at, durable";

fn conflict(e: sqlx::Error, name: &str) -> StorageError {
    if let sqlx::Error::Database(d) = &e {
        let m = d.message().to_ascii_lowercase();
        if m.contains("unique") || m.contains("duplicate") {
            return StorageError::Conflict(format!("a rule named `{name}` exists already"));
        }
    }
    e.into()
}

impl Db {
    /// Inserts a rule.
    pub async fn insert_rule(&self, r: &RuleRow) -> Result<(), StorageError> {
        let sql =
            format!("INSERT INTO rules ({RULE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
        sqlx::query(&sql)
            .bind(&r.rule_id)
            .bind(&r.name)
            .bind(&r.description)
            .bind(&r.sql_text)
            .bind(&r.actions)
            .bind(r.enabled)
            .bind(r.created_at)
            .bind(r.updated_at)
            .bind(r.durable)
            .execute(&self.pool)
            .await
            .map_err(|e| conflict(e, &r.name))?;
        Ok(())
    }

    /// Replaces a rule's definition; false when there is no such rule.
    pub async fn update_rule(&self, r: &RuleRow) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE rules SET name = $2, description = $3, sql_text = $4, actions = $5, enabled = $6, updated_at = $7, durable = $8 WHERE rule_id = $1",
        )
        .bind(&r.rule_id)
        .bind(&r.name)
        .bind(&r.description)
        .bind(&r.sql_text)
        .bind(&r.actions)
        .bind(r.enabled)
        .bind(r.updated_at)
        .bind(r.durable)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict(e, &r.name))?;
        Ok(done.rows_affected() > 0)
    }

    /// All rules, oldest first.
    pub async fn list_rules(&self) -> Result<Vec<RuleRow>, StorageError> {
        let sql = format!("SELECT {RULE_COLS} FROM rules ORDER BY created_at, rule_id");
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// Deletes a rule with its saved state; false when there was none.
    pub async fn delete_rule(&self, id: &str) -> Result<bool, StorageError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM rule_state WHERE rule_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM rules WHERE rule_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    /// Saves window states (replacing earlier ones).
    pub async fn save_rule_states(
        &self,
        states: &[(String, String)],
        at: i64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        for (id, state) in states {
            sqlx::query("DELETE FROM rule_state WHERE rule_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO rule_state (rule_id, state, saved_at) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(state)
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Takes the saved window states (they are deleted: a state is restored once).
    pub async fn take_rule_states(&self) -> Result<Vec<(String, String, i64)>, StorageError> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query("SELECT rule_id, state, saved_at FROM rule_state")
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM rule_state")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Stores a dead letter.
    pub async fn insert_dead_letter(&self, d: &DeadLetter) -> Result<(), StorageError> {
        sqlx::query("INSERT INTO rule_dead_letters (rule_id, action, kind, payload, error, attempts, at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&d.rule_id)
            .bind(d.action)
            .bind(&d.kind)
            .bind(&d.payload)
            .bind(&d.error)
            .bind(d.attempts)
            .bind(d.at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Dead letters, newest first, optionally of one rule.
    pub async fn list_dead_letters(
        &self,
        rule: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        let cols = "id, rule_id, action, kind, payload, error, attempts, at";
        Ok(match rule {
            Some(r) => {
                sqlx::query_as(&format!(
                "SELECT {cols} FROM rule_dead_letters WHERE rule_id = $1 ORDER BY id DESC LIMIT $2"
            ))
                .bind(r)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query_as(&format!(
                    "SELECT {cols} FROM rule_dead_letters ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        })
    }

    /// Deletes dead letters (all of a rule, or one by id); how many.
    pub async fn delete_dead_letters(
        &self,
        rule: &str,
        id: Option<i64>,
    ) -> Result<u64, StorageError> {
        let done = match id {
            Some(id) => {
                sqlx::query("DELETE FROM rule_dead_letters WHERE rule_id = $1 AND id = $2")
                    .bind(rule)
                    .bind(id)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM rule_dead_letters WHERE rule_id = $1")
                    .bind(rule)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// Appends rows to a user table.
    pub async fn insert_rule_rows(
        &self,
        table: &str,
        rule: &str,
        rows: &[String],
        at: i64,
    ) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO rule_rows (table_name, rule_id, row_json, at) VALUES ($1, $2, $3, $4)",
            )
            .bind(table)
            .bind(rule)
            .bind(r)
            .bind(at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rows of a user table after `after` (row id), oldest first: id, rule, row, at.
    pub async fn list_rule_rows(
        &self,
        table: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, i64)>, StorageError> {
        let rows = sqlx::query("SELECT id, rule_id, row_json, at FROM rule_rows WHERE table_name = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(table)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// Sets a product's data-parsing script.
    pub async fn put_script(&self, pk: &str, script: &str, at: i64) -> Result<(), StorageError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM product_scripts WHERE product_key = $1")
            .bind(pk)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO product_scripts (product_key, script, updated_at) VALUES ($1, $2, $3)",
        )
        .bind(pk)
        .bind(script)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every product's script: product key, script, updated at.
    pub async fn list_scripts(&self) -> Result<Vec<(String, String, i64)>, StorageError> {
        let rows = sqlx::query("SELECT product_key, script, updated_at FROM product_scripts")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Removes a product's script; false when it had none.
    pub async fn delete_script(&self, pk: &str) -> Result<bool, StorageError> {
        let done = sqlx::query("DELETE FROM product_scripts WHERE product_key = $1")
            .bind(pk)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
