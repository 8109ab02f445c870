//! Named users with roles, their API keys (a console login is a key too), and the audit log
//! of every change made through the API.
//!
//! - Roles: `viewer` reads, `operator` also changes devices, products, rules, OTA and data,
//!   `admin` also manages users, keys, application access keys and reads the audit log. The
//!   admin token of `{data_dir}/admin-token` acts as the user `admin` with the role admin.
//! - Passwords: PBKDF2-HMAC-SHA256, 600,000 iterations (OWASP's figure), a random salt each;
//!   hashed off the async threads. Five wrong passwords for a name within a minute refuse that
//!   name's logins for the rest of the minute.
//! - API keys: `ilk_<id>_<secret>`, 128 random bits of secret; only the SHA-256 of the secret
//!   is stored. A key's role is at most its user's (checked at every use, so lowering a user
//!   lowers their keys); keys may expire and be revoked, which takes effect at once on this
//!   node (the lookup cache is dropped with it).
//! - Audit: each change is committed before its answer is sent (requests that arrive together
//!   share one insert).

use crate::registry::now_ms;
use crate::storage::{Db, StorageError};
use rand::RngCore;
use serde::Serialize;
use sha2::Digest;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but secrets.
    Viewer,
    /// Also changes devices, products, rules, OTA campaigns and data.
    Operator,
    /// Also manages users, keys and application access, and reads the audit log.
    Admin,
}

impl Role {
    /// Parses `viewer`, `operator` or `admin`.
    pub fn parse(s: &str) -> Result<Self, UserError> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            _ => Err(UserError::Invalid(format!(
                "unknown role `{s}`: use viewer, operator or admin"
            ))),
        }
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's name (`admin` for the admin token).
    pub name: String,
    /// The role this credential carries.
    pub role: Role,
    /// The API key's id; empty for the admin token.
    pub key_id: String,
}

impl Principal {
    /// The admin token's principal.
    pub fn root() -> Self {
        Self {
            name: ROOT.to_owned(),
            role: Role::Admin,
            key_id: String::new(),
        }
    }
}

/// The name the admin token acts as; no user may take it.
pub const ROOT: &str = "admin";

/// Why a users operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The request is wrong (the reason says how).
    #[error("{0}")]
    Invalid(String),
    /// No such user or key.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    Conflict(String),
    /// Wrong name or password.
    #[error("{0}")]
    Unauthorized(String),
    /// Too many wrong passwords for this name just now.
    #[error("{0}")]
    TooMany(String),
    /// The credential asking may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The server could not do it now (retry).
    #[error("{0}")]
    Unavailable(String),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for UserError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

/// A user as listed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    /// Name.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    #[schema(value_type = String)]
    pub role: Role,
    /// Created, ms since the epoch.
    pub created_at: i64,
}

/// An API key as listed (never its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// The key's id (the public part of `ilk_<id>_<secret>`).
    pub id: String,
    /// Its user.
    pub user: String,
    /// Its role (at most its user's).
    #[schema(value_type = String)]
    pub role: Role,
    /// What it is for.
    pub label: String,
    /// True for a console session made by logging in.
    pub session: bool,
    /// Created, ms since the epoch.
    pub created_at: i64,
    /// When it stops working, ms since the epoch; none: never.
    pub expires_at: Option<i64>,
    /// When it was revoked, ms since the epoch.
    pub revoked_at: Option<i64>,
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Position in the log (ascending).
    pub id: i64,
    /// When, ms since the epoch.
    pub at: i64,
    /// The user.
    pub actor: String,
    /// The role the request carried.
    pub role: String,
    /// The API key used; empty for the admin token.
    pub key_id: String,
    /// HTTP method.
    pub method: String,
    /// Path under /api/v1.
    pub path: String,
    /// The answer's HTTP status.
    pub status: i64,
}

const ITERATIONS: u32 = 600_000;
/// How long a console login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a key looked up stays in memory (a revocation on another node is seen after it).
const CACHE_TTL: Duration = Duration::from_secs(10);
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

/// A key as looked up: what `resolve` needs.
#[derive(Debug, Clone)]
struct KeyRow {
    user: String,
    role: Role,
    secret_hash: String,
    expires_at: Option<i64>,
    revoked: bool,
}

type AuditJob = (Principal, String, String, u16, oneshot::Sender<()>);

/// Users, keys and the audit log.
#[derive(Debug)]
pub struct Users {
    db: Db,
    cache: Mutex<HashMap<String, (Instant, Option<KeyRow>)>>,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    audit: mpsc::Sender<AuditJob>,
}

impl Users {
    /// Users over `db`; starts the audit writer and, unless `retention` is zero, the pruner
    /// of entries older than it (on the current runtime).
    pub fn new(db: Db, retention: Duration) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(audit_writer(db.clone(), rx));
        if !retention.is_zero() {
            let (db, weak) = (db.clone(), tx.downgrade());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PRUNE_EVERY);
                // Ends with the server (the last sender of the audit channel goes with it).
                while weak.upgrade().is_some() {
                    tick.tick().await;
                    let before = now_ms()
                        .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
                    match prune_audit(&db, before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            entries = n,
                            "audit log entries past their retention deleted"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "audit log pruning failed; retried later")
                        }
                    }
                }
            });
        }
        Self {
            db,
            cache: Mutex::default(),
            failures: Mutex::default(),
            audit: tx,
        }
    }

    /// Creates a user.
    pub async fn create(&self, name: &str, role: Role, password: &str) -> Result<User, UserError> {
        check_name(name)?;
        check_password(password)?;
        let hash = hash_password(password.to_owned()).await?;
        let at = now_ms();
        let r = sqlx::query(
            "INSERT INTO users (name, role, password_hash, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(role.as_str())
        .bind(&hash)
        .bind(at)
        .execute(&self.db.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(UserError::Conflict(format!("user `{name}` exists")));
        }
        Ok(User {
            name: name.to_owned(),
            role,
            created_at: at,
        })
    }

    /// Every user, by name.
    pub async fn list(&self) -> Result<Vec<User>, UserError> {
        let rows = sqlx::query("SELECT name, role, created_at FROM users ORDER BY name")
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(User {
                    name: r.try_get(0)?,
                    role: Role::parse(&r.try_get::<String, _>(1)?)?,
                    created_at: r.try_get(2)?,
                })
            })
            .collect()
    }

    /// Changes a user's role and/or password. A new password ends the user's console
    /// sessions (not their API keys).
    pub async fn update(
        &self,
        name: &str,
        role: Option<Role>,
        password: Option<&str>,
    ) -> Result<(), UserError> {
        if let Some(p) = password {
            check_password(p)?;
        }
        let hash = match password {
            Some(p) => Some(hash_password(p.to_owned()).await?),
            None => None,
        };
        let mut tx = self.db.write_tx().await?;
        let exists = sqlx::query("SELECT 1 FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Err(UserError::NotFound(format!("no user `{name}`")));
        }
        if let Some(role) = role {
            sqlx::query("UPDATE users SET role = $1 WHERE name = $2")
                .bind(role.as_str())
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(hash) = hash {
            sqlx::query("UPDATE users SET password_hash = $1 WHERE name = $2")
                .bind(&hash)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE user_name = $2 AND session = 1 AND revoked_at IS NULL",
            )
            .bind(now_ms())
            .bind(name)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.forget_all();
        Ok(())
    }

    /// Deletes a user and their keys; false when there was none.
    pub async fn delete(&self, name: &str) -> Result<bool, UserError> {
        let r = sqlx::query("DELETE FROM users WHERE name = $1")
            .bind(name)
            .execute(&self.db.pool)
            .await?;
        self.forget_all();
        Ok(r.rows_affected() > 0)
    }

    /// Checks a name and password; on success a console session key valid for
    /// [`SESSION_TTL`]: `(token, key)`.
    pub async fn login(&self, name: &str, password: &str) -> Result<(String, ApiKey), UserError> {
        {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            f.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
            if f.get(name).is_some_and(|(n, _)| *n >= MAX_FAILURES) {
                return Err(UserError::TooMany(format!(
                    "{MAX_FAILURES} wrong passwords for `{name}` within a minute: wait a minute"
                )));
            }
        }
        let row = sqlx::query("SELECT password_hash, role FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await?;
        let (stored, role) = match &row {
            Some(r) => (
                r.try_get::<String, _>(0)?,
                Some(Role::parse(&r.try_get::<String, _>(1)?)?),
            ),
            // Hash anyway, so an unknown name takes as long as a wrong password.
            None => (DUMMY_HASH.to_owned(), None),
        };
        let ok = verify_password(password.to_owned(), stored).await;
        let Some(role) = role.filter(|_| ok) else {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            if f.len() < CACHE_MAX || f.contains_key(name) {
                f.entry(name.to_owned()).or_insert((0, Instant::now())).0 += 1;
            }
            return Err(UserError::Unauthorized(
                "wrong user name or password".into(),
            ));
        };
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.create_key(
            name,
            Some(role),
            role,
            "console session",
            Some(SESSION_TTL),
            true,
        )
        .await
    }

    /// Makes an API key for `user` with `role` (default: the user's; at most the user's, and
    /// at most `cap`, the role of the credential asking). Returns the token, shown only here,
    /// and the key.
    pub async fn create_key(
        &self,
        user: &str,
        role: Option<Role>,
        cap: Role,
        label: &str,
        ttl: Option<Duration>,
        session: bool,
    ) -> Result<(String, ApiKey), UserError> {
        if label.chars().count() > 200 || label.chars().any(char::is_control) {
            return Err(UserError::Invalid(
                "label: at most 200 characters, no control characters".into(),
            ));
        }
        let over_cap =
            || UserError::Forbidden("a key may not carry a role above the caller's".into());
        if role.is_some_and(|r| r > cap) {
            return Err(over_cap());
        }
        let user_role = sqlx::query("SELECT role FROM users WHERE name = $1")
            .bind(user)
            .fetch_optional(&self.db.pool)
            .await?
            .map(|r| r.try_get::<String, _>(0))
            .transpose()?;
        let Some(user_role) = user_role else {
            return Err(UserError::NotFound(format!("no user `{user}`")));
        };
        let user_role = Role::parse(&user_role)?;
        let role = role.unwrap_or(user_role);
        if role > cap {
            return Err(over_cap());
        }
        if role > user_role {
            return Err(UserError::Invalid(format!(
                "a key of `{user}` may carry at most the role {}",
                user_role.as_str()
            )));
        }
        let mut id = [0u8; 6];
        let mut secret = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let (id, secret) = (hex::encode(id), hex::encode(secret));
        let at = now_ms();
        let expires_at =
            ttl.map(|t| at.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)));
        sqlx::query(
            "INSERT INTO api_keys (id, user_name, role, secret_hash, label, session, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(user)
        .bind(role.as_str())
        .bind(sha256_hex(&secret))
        .bind(label)
        .bind(i64::from(session))
        .bind(at)
        .bind(expires_at)
        .execute(&self.db.pool)
        .await?;
        let token = format!("ilk_{id}_{secret}");
        Ok((
            token,
            ApiKey {
                id,
                user: user.to_owned(),
                role,
                label: label.to_owned(),
                session,
                created_at: at,
                expires_at,
                revoked_at: None,
            },
        ))
    }

    /// Keys, newest first: of one user, or of everyone. Console sessions that ended are left
    /// out.
    pub async fn keys(&self, user: Option<&str>) -> Result<Vec<ApiKey>, UserError> {
        let now = now_ms();
        let sql = "SELECT id, user_name, role, label, session, created_at, expires_at, revoked_at FROM api_keys \
                   WHERE ($1 = '' OR user_name = $1) AND NOT (session = 1 AND (revoked_at IS NOT NULL OR expires_at < $2)) \
                   ORDER BY created_at DESC, id";
        let rows = sqlx::query(sql)
            .bind(user.unwrap_or(""))
            .bind(now)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiKey {
                    id: r.try_get(0)?,
                    user: r.try_get(1)?,
                    role: Role::parse(&r.try_get::<String, _>(2)?)?,
                    label: r.try_get(3)?,
                    session: r.try_get::<i64, _>(4)? != 0,
                    created_at: r.try_get(5)?,
                    expires_at: r.try_get(6)?,
                    revoked_at: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// The user a key belongs to, if it exists.
    pub async fn key_owner(&self, id: &str) -> Result<Option<String>, UserError> {
        Ok(sqlx::query("SELECT user_name FROM api_keys WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?)
    }

    /// Revokes a key; false when there is none (or it was revoked before).
    pub async fn revoke(&self, id: &str) -> Result<bool, UserError> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(&self.db.pool)
                .await?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(r.rows_affected() > 0)
    }

    /// The principal of an API key token, if it is a live key.
    pub async fn resolve(&self, token: &str) -> Result<Option<Principal>, UserError> {
        let Some((id, secret)) = token
            .strip_prefix("ilk_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(None);
        };
        if id.len() != 12 || secret.len() != 32 {
            return Ok(None);
        }
        let cached = {
            let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            c.get(id)
                .filter(|(at, _)| at.elapsed() < CACHE_TTL)
                .map(|(_, row)| row.clone())
        };
        let row = match cached {
            Some(row) => row,
            None => {
                let row = self.lookup(id).await?;
                let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if c.len() >= CACHE_MAX {
                    c.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
                    if c.len() >= CACHE_MAX {
                        c.clear();
                    }
                }
                c.insert(id.to_owned(), (Instant::now(), row.clone()));
                row
            }
        };
        let Some(row) = row else { return Ok(None) };
        let live = !row.revoked && row.expires_at.is_none_or(|e| e > now_ms());
        if !live
            || !ironlink_shared::sign::constant_eq(
                sha256_hex(secret).as_bytes(),
                row.secret_hash.as_bytes(),
            )
        {
            return Ok(None);
        }
        Ok(Some(Principal {
            name: row.user,
            role: row.role,
            key_id: id.to_owned(),
        }))
    }

    async fn lookup(&self, id: &str) -> Result<Option<KeyRow>, UserError> {
        let r = sqlx::query(
            "SELECT k.user_name, k.role, u.role, k.secret_hash, k.expires_at, k.revoked_at FROM api_keys k JOIN users u ON u.name = k.user_name WHERE k.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(r) = r else { return Ok(None) };
        let key_role = Role::parse(&r.try_get::<String, _>(1)?)?;
        let user_role = Role::parse(&r.try_get::<String, _>(2)?)?;
        Ok(Some(KeyRow {
            user: r.try_get(0)?,
            role: key_role.min(user_role),
            secret_hash: r.try_get(3)?,
            expires_at: r.try_get(4)?,
            revoked: r.try_get::<Option<i64>, _>(5)?.is_some(),
        }))
    }

    fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Records a change made by `who`; returns once it is committed (or the log failed,
    /// which is logged: the change itself is already made).
    pub async fn audit(&self, who: &Principal, method: &str, path: &str, status: u16) {
        let (tx, rx) = oneshot::channel();
        let job = (who.clone(), method.to_owned(), path.to_owned(), status, tx);
        if self.audit.send(job).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The audit log, newest first: up to `limit` entries before the id `before` (none: the
    /// newest), of one actor or of all.
    pub async fn audit_log(
        &self,
        limit: u32,
        before: Option<i64>,
        actor: Option<&str>,
    ) -> Result<Vec<AuditEntry>, UserError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, role, key_id, method, path, status FROM audit_log \
             WHERE id < $1 AND ($2 = '' OR actor = $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(actor.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0)?,
                    at: r.try_get(1)?,
                    actor: r.try_get(2)?,
                    role: r.try_get(3)?,
                    key_id: r.try_get(4)?,
                    method: r.try_get(5)?,
                    path: r.try_get(6)?,
                    status: r.try_get(7)?,
                })
            })
            .collect()
    }
}

/// How often entries past the audit retention are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Deletes audit entries older than `before` (ms), 10,000 per statement so that no
/// transaction holds the write lock for long; returns how many.
pub async fn prune_audit(db: &Db, before: i64) -> Result<u64, UserError> {
    let mut total = 0;
    loop {
        let r = sqlx::query(
            "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < $1 ORDER BY id LIMIT 10000)",
        )
        .bind(before)
        .execute(&db.pool)
        .await?;
        total += r.rows_affected();
        if r.rows_affected() < 10_000 {
            return Ok(total);
        }
    }
}

/// Commits audit entries in batches: whatever waits when the previous insert ends goes in the
/// next one; each request is answered once its entry is in.
async fn audit_writer(db: Db, mut rx: mpsc::Receiver<AuditJob>) {
    let mut batch: Vec<AuditJob> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let at = now_ms();
        let sql = format!(
            "INSERT INTO audit_log (at, actor, role, key_id, method, path, status) VALUES {}",
            crate::storage::placeholders(db.engine(), batch.len(), 7)
        );
        let mut q = sqlx::query(&sql);
        for (who, method, path, status, _) in &batch {
            q = q
                .bind(at)
                .bind(who.name.clone())
                .bind(who.role.as_str())
                .bind(who.key_id.clone())
                .bind(method.clone())
                .bind(path.clone())
                .bind(i64::from(*status));
        }
        if let Err(e) = q.execute(&db.pool).await {
            tracing::error!(error = %e, entries = batch.len(), "audit log entries could not be stored");
        }
        for (.., done) in batch.drain(..) {
            let _ = done.send(());
        }
    }
}

fn check_name(name: &str) -> Result<(), UserError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b));
    if !ok {
        return Err(UserError::Invalid(
            "user name: 1 to 64 of A-Z a-z 0-9 _ . @ -".into(),
        ));
    }
    if name == ROOT {
        return Err(UserError::Invalid(format!(
            "`{ROOT}` is the admin token's name: choose another"
        )));
    }
    Ok(())
}

fn check_password(p: &str) -> Result<(), UserError> {
    if p.chars().count() < 8 || p.len() > 1024 {
        return Err(UserError::Invalid(
            "password: at least 8 characters, at most 1,024 bytes".into(),
        ));
    }
    Ok(())
}

/// A hash of no one's password, verified for unknown names.
const DUMMY_HASH: &str = "pbkdf2-sha256$600000$00000000000000000000000000000000$0000000000000000000000000000000000000000000000000000000000000000";

async fn hash_password(password: String) -> Result<String, UserError> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    tokio::task::spawn_blocking(move || {
        let hash =
            pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(password.as_bytes(), &salt, ITERATIONS);
        format!(
            "pbkdf2-sha256${ITERATIONS}${}${}",
            hex::encode(salt),
            hex::encode(hash)
        )
    })
    .await
    .map_err(|e| UserError::Unavailable(format!("the password could not be hashed: {e}")))
}

async fn verify_password(password: String, stored: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let mut parts = stored.split('$');
        let (Some("pbkdf2-sha256"), Some(iter), Some(salt), Some(hash), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return false;
        };
        let (Ok(iter), Ok(salt), Ok(hash)) =
            (iter.parse::<u32>(), hex::decode(salt), hex::decode(hash))
        else {
            return false;
        };
        if !(1..=10_000_000).contains(&iter) || hash.len() != 32 {
            return false;
        }
        let got = pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(password.as_bytes(), &salt, iter);
        ironlink_shared::sign::constant_eq(&got, &hash)
    })
    .await
    .unwrap_or(false)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_and_refuse() {
        let h = hash_password("correct horse".into()).await.unwrap();
        assert!(h.starts_with("pbkdf2-sha256$600000$"));
        assert!(verify_password("correct horse".into(), h.clone()).await);
        assert!(!verify_password("correct horsf".into(), h.clone()).await);
        assert!(!verify_password("x".into(), DUMMY_HASH.into()).await);
        for broken in [
            "",
            "pbkdf2-sha256$1$zz$00",
            "md5$1$00$00",
            "pbkdf2-sha256$0$00$00",
        ] {
            assert!(
                !verify_password("x".into(), broken.into()).await,
                "{broken}"
            );
        }
    }

    #[test]
    fn names_roles_and_passwords_are_checked() {
        assert!(check_name("ops.team-1@site").is_ok());
        for bad in ["", "admin", "a b", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert_eq!(Role::parse("operator").ok(), Some(Role::Operator));
        assert!(Role::parse("root").is_err());
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}
