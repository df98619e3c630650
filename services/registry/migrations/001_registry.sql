-- The model registry: models, versions with artifacts and lineage, aliases with history, exports,
-- and the deployments (written by the inference service through MarkDeployed) that pin versions.

-- One row per model; next_version is the per-model counter, locked FOR UPDATE to hand out numbers.
CREATE TABLE registry_models (
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    next_version bigint      NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE registry_versions (
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    version         bigint      NOT NULL,
    state           text        NOT NULL CHECK (state IN ('PENDING', 'READY', 'FAILED', 'DELETING')),
    registration_id uuid        NOT NULL UNIQUE,
    source_prefix   text        NOT NULL,
    prefix          text        NOT NULL,
    dataset_name    text        NOT NULL DEFAULT '',
    dataset_version bigint      NOT NULL DEFAULT 0,
    training_job_id text        NOT NULL DEFAULT '',
    code_version    text        NOT NULL DEFAULT '',
    environment     jsonb       NOT NULL DEFAULT '{}',
    parent_name     text        NOT NULL DEFAULT '',
    parent_version  bigint      NOT NULL DEFAULT 0,
    metrics         jsonb       NOT NULL DEFAULT '{}',
    description     text        NOT NULL DEFAULT '',
    digest          text        NOT NULL DEFAULT '',
    error           text        NOT NULL DEFAULT '',
    created_by      text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    ready_at        timestamptz,
    collected_at    timestamptz,  -- when a FAILED/DELETING version's objects were removed
    PRIMARY KEY (tenant, name, version),
    FOREIGN KEY (tenant, name) REFERENCES registry_models (tenant, name)
);
CREATE INDEX registry_versions_dataset ON registry_versions (tenant, dataset_name, dataset_version);
CREATE INDEX registry_versions_unsettled ON registry_versions (state) WHERE state <> 'READY';

CREATE TABLE registry_artifacts (
    tenant  text   NOT NULL,
    name    text   NOT NULL,
    version bigint NOT NULL,
    path    text   NOT NULL,
    key     text   NOT NULL,
    size    bigint NOT NULL,
    sha256  text   NOT NULL,
    role    text   NOT NULL,
    PRIMARY KEY (tenant, name, version, path),
    FOREIGN KEY (tenant, name, version) REFERENCES registry_versions ON DELETE CASCADE
);

CREATE TABLE registry_aliases (
    tenant     text        NOT NULL,
    name       text        NOT NULL,
    alias      text        NOT NULL,
    version    bigint      NOT NULL,
    etag       text        NOT NULL,
    revision   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text        NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, name, alias),
    FOREIGN KEY (tenant, name, version) REFERENCES registry_versions
);

-- Append-only: rows are only ever inserted (a trigger refuses updates and deletes).
CREATE TABLE registry_alias_history (
    id           bigserial   PRIMARY KEY,
    tenant       text        NOT NULL,
    name         text        NOT NULL,
    alias        text        NOT NULL,
    sequence     bigint      NOT NULL,
    from_version bigint      NOT NULL,
    to_version   bigint      NOT NULL,
    actor        text        NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name, alias, sequence)
);

CREATE FUNCTION registry_alias_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'registry_alias_history is append-only';
END $$;
CREATE TRIGGER registry_alias_history_append_only BEFORE UPDATE OR DELETE ON registry_alias_history
    FOR EACH ROW EXECUTE FUNCTION registry_alias_history_append_only();

CREATE TABLE registry_exports (
    id              uuid        PRIMARY KEY,
    tenant          text        NOT NULL,
    name            text        NOT NULL,
    version         bigint      NOT NULL,
    format          text        NOT NULL CHECK (format IN ('onnx', 'onnx-int8', 'torchscript')),
    state           text        NOT NULL CHECK (state IN ('PENDING', 'RUNNING', 'READY', 'FAILED')),
    parity          jsonb       NOT NULL DEFAULT '{}',
    error           text        NOT NULL DEFAULT '',
    artifacts       jsonb       NOT NULL DEFAULT '[]',
    triton_prefix   text        NOT NULL DEFAULT '',
    triton_model    text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name, version, format),
    FOREIGN KEY (tenant, name, version) REFERENCES registry_versions ON DELETE CASCADE
);

-- Deployments that serve a version (written by the inference service via MarkDeployed).
CREATE TABLE registry_deployments (
    tenant     text        NOT NULL,
    name       text        NOT NULL,
    version    bigint      NOT NULL,
    deployment text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name, version, deployment),
    FOREIGN KEY (tenant, name, version) REFERENCES registry_versions
);
