-- Over-the-air updates: packages, the versions devices report, campaigns, one job per device
-- and campaign, and each job's history. A job's state changes are committed before the
-- notice they lead to is published, so a restarted scheduler never repeats an attempt.
CREATE TABLE ota_packages (
    id           TEXT PRIMARY KEY,
    product_key  TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    module       TEXT NOT NULL,
    version      TEXT NOT NULL,
    src_versions TEXT NOT NULL DEFAULT '[]',
    file_name    TEXT NOT NULL,
    size         BIGINT NOT NULL,
    sha256       TEXT NOT NULL,
    md5          TEXT NOT NULL,
    ed25519      TEXT,
    sign_method  TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    UNIQUE (product_key, module, version)
);

CREATE TABLE ota_modules (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    module      TEXT NOT NULL,
    version     TEXT NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (product_key, device_name, module)
);

CREATE TABLE ota_campaigns (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    package_id  TEXT NOT NULL REFERENCES ota_packages (id),
    product_key TEXT NOT NULL,
    module      TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    target      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    state       TEXT NOT NULL,
    stage       TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    rate        TEXT NOT NULL DEFAULT '{}',
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE TABLE ota_jobs (
    campaign_id  TEXT NOT NULL REFERENCES ota_campaigns (id) ON DELETE CASCADE,
    product_key  TEXT NOT NULL,
    device_name  TEXT NOT NULL,
    module       TEXT NOT NULL,
    canary       BIGINT NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,
    attempt      BIGINT NOT NULL DEFAULT 0,
    retries      BIGINT NOT NULL DEFAULT 0,
    step         BIGINT,
    reason       TEXT NOT NULL DEFAULT '',
    from_version TEXT,
    notified_at  BIGINT,
    deadline     BIGINT,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (campaign_id, product_key, device_name)
);

CREATE INDEX ota_jobs_state ON ota_jobs (campaign_id, state, canary);
CREATE INDEX ota_jobs_device ON ota_jobs (product_key, device_name, module);

CREATE TABLE ota_history (
    id          BIGSERIAL PRIMARY KEY,
    campaign_id TEXT NOT NULL,
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    step        BIGINT,
    detail      TEXT NOT NULL DEFAULT '',
    at          BIGINT NOT NULL
);

CREATE INDEX ota_history_device ON ota_history (product_key, device_name, at);
CREATE INDEX ota_history_campaign ON ota_history (campaign_id, at);

-- Server-wide OTA settings: the key download tokens are signed with (shared by every node).
CREATE TABLE ota_settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
