-- Rules engine: rules (SQL + actions), window state saved at a clean shutdown, the dead-letter
-- store of actions that kept failing, user tables written by rules, and per-product
-- data-parsing scripts.
CREATE TABLE rules (
    rule_id     TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    sql_text    TEXT NOT NULL,
    actions     TEXT NOT NULL,
    enabled     BIGINT NOT NULL DEFAULT 1,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE rule_state (
    rule_id  TEXT PRIMARY KEY,
    state    TEXT NOT NULL,
    saved_at BIGINT NOT NULL
);

CREATE TABLE rule_dead_letters (
    id        BIGSERIAL PRIMARY KEY,
    rule_id   TEXT NOT NULL,
    action    BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    payload   TEXT NOT NULL,
    error     TEXT NOT NULL,
    attempts  BIGINT NOT NULL,
    at        BIGINT NOT NULL
);
CREATE INDEX rule_dead_letters_rule ON rule_dead_letters (rule_id, id);

CREATE TABLE rule_rows (
    id         BIGSERIAL PRIMARY KEY,
    table_name TEXT NOT NULL,
    rule_id    TEXT NOT NULL,
    row_json   TEXT NOT NULL,
    at         BIGINT NOT NULL
);
CREATE INDEX rule_rows_table ON rule_rows (table_name, id);

CREATE TABLE product_scripts (
    product_key TEXT PRIMARY KEY REFERENCES products (product_key) ON DELETE CASCADE,
    script      TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
