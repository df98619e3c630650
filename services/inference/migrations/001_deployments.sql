-- Deployments: a name routing a tenant's requests to a stable model version and an optional canary.
CREATE TABLE inference_deployments (
    tenant         text        NOT NULL,
    name           text        NOT NULL,
    model          text        NOT NULL,
    stable_version bigint      NOT NULL CHECK (stable_version > 0),
    canary_version bigint      CHECK (canary_version > 0),
    canary_weight  integer     NOT NULL DEFAULT 0 CHECK (canary_weight BETWEEN 0 AND 100),
    state          text        NOT NULL CHECK (state IN ('LOADING', 'READY', 'FAILED')),
    message        text        NOT NULL DEFAULT '',
    etag           text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);
