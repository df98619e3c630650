-- API keys: the secret is stored only as its SHA-256.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    tenant        text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('admin', 'developer', 'inference')),
    name          text        NOT NULL DEFAULT '',
    secret_sha256 text        NOT NULL,
    rate_limit    double precision NOT NULL DEFAULT 50 CHECK (rate_limit > 0),
    created_by    text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);
