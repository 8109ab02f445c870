-- Named users of the API and console, their API keys (console sessions are keys too), and the
-- audit log of every change made through the API. The admin token of {data_dir}/admin-token
-- stays the root credential; it acts as the user "admin" with the role admin.
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    -- admin | operator | viewer
    role          TEXT NOT NULL,
    -- pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE TABLE api_keys (
    -- The public part of the key (ilk_<id>_<secret>).
    id           TEXT PRIMARY KEY,
    user_name    TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    -- The key's role: at most its user's.
    role         TEXT NOT NULL,
    -- SHA-256 of the secret part, hex.
    secret_hash  TEXT NOT NULL,
    label        TEXT NOT NULL,
    -- 1 for a console session made by POST /login.
    session      INTEGER NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_user ON api_keys (user_name);
CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    role    TEXT NOT NULL,
    -- The key the request came with (empty for the admin token).
    key_id  TEXT NOT NULL,
    method  TEXT NOT NULL,
    path    TEXT NOT NULL,
    status  INTEGER NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
