-- Datasets and their immutable versions. Every row carries its tenant; every query filters by it.

-- One row per dataset name, holding the version counter so numbers are never reused after a delete.
CREATE TABLE datasets (
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    last_version bigint      NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE dataset_versions (
    id           bigserial   PRIMARY KEY,
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    version      bigint      NOT NULL,
    state        text        NOT NULL CHECK (state IN ('PENDING', 'READY', 'FAILED')),
    -- content address: SHA-256 of the corpus bytes and the canonical options
    digest       text        NOT NULL,
    options      jsonb       NOT NULL,
    source_bytes bigint      NOT NULL,
    -- splits, cleaning counts, tokenizer, dtype (empty until READY)
    stats        jsonb       NOT NULL DEFAULT '{}',
    -- every object of the version: [{key, size, sha256, role}]
    objects      jsonb       NOT NULL DEFAULT '[]',
    manifest_key text        NOT NULL DEFAULT '',
    error        text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    UNIQUE (tenant, name, version),
    FOREIGN KEY (tenant, name) REFERENCES datasets (tenant, name)
);

-- At most one live (PENDING or READY) version per content address: re-creating returns it.
CREATE UNIQUE INDEX dataset_versions_live_digest ON dataset_versions (tenant, name, digest)
    WHERE state <> 'FAILED';
CREATE INDEX dataset_versions_pending ON dataset_versions (state) WHERE state = 'PENDING';
