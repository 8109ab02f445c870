-- Thing models (Alibaba TSL JSON), versioned per product.
CREATE TABLE thing_models (
    product_key TEXT NOT NULL REFERENCES products (product_key) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    tsl         TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (product_key, version)
);
