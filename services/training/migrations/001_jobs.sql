-- Training jobs, the nodes that run them (one row per node, each with its own lease), their metric
-- series and their event log (what WatchJob streams).

CREATE TABLE training_jobs (
    id               uuid        PRIMARY KEY,
    tenant           text        NOT NULL,
    state            text        NOT NULL DEFAULT 'QUEUED'
                     CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    spec             jsonb       NOT NULL,           -- resolved spec (every default filled in)
    spec_sha256      text        NOT NULL,           -- of the canonical spec + model name: idempotency check
    priority         integer     NOT NULL DEFAULT 0, -- higher first
    idempotency_key  text,
    model_name       text        NOT NULL,
    dataset_manifest_key text    NOT NULL,           -- manifest.json of the dataset version (READY at submit)
    nnodes           integer     NOT NULL CHECK (nnodes >= 1),
    max_steps        bigint      NOT NULL,
    step             bigint      NOT NULL DEFAULT 0,
    latest_metrics   jsonb       NOT NULL DEFAULT '{}',
    metrics_step     bigint      NOT NULL DEFAULT 0,
    environment      jsonb       NOT NULL DEFAULT '{}',
    model_version    bigint,                         -- registered version, once SUCCEEDED
    error            text        NOT NULL DEFAULT '',
    cancel_requested boolean     NOT NULL DEFAULT false,
    attempt          integer     NOT NULL DEFAULT 0, -- runs started; a lost worker's job is re-run with attempt + 1
    lease_seconds    double precision NOT NULL,      -- how long a node's lease lasts without a heartbeat
    rdzv_endpoint    text,                           -- host:port of this attempt's c10d rendezvous (node 0)
    dispatched_at    timestamptz,                    -- last time Celery messages were sent; NULL: send again
    created_by       text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, idempotency_key)
);
CREATE INDEX training_jobs_tenant_created ON training_jobs (tenant, created_at DESC, id DESC);
CREATE INDEX training_jobs_queue ON training_jobs (priority DESC, created_at, id)
    WHERE state IN ('QUEUED', 'RUNNING');

CREATE TABLE training_job_nodes (
    job_id           uuid        NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    node_rank        integer     NOT NULL,
    worker           text,                           -- holder of the lease (host:pid:task), NULL when free
    host             text,
    lease_expires_at timestamptz,
    claimed_at       timestamptz,
    released         boolean     NOT NULL DEFAULT false, -- the node's torchrun exited cleanly
    PRIMARY KEY (job_id, node_rank)
);

CREATE TABLE training_job_metrics (
    job_id      uuid             NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    name        text             NOT NULL,
    step        bigint           NOT NULL,
    value       double precision NOT NULL,
    recorded_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name, step)                 -- a resumed run re-logging a step overwrites it
);

CREATE TABLE training_job_events (
    sequence   bigserial   PRIMARY KEY,
    job_id     uuid        NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    kind       text        NOT NULL CHECK (kind IN ('state', 'progress', 'metrics', 'checkpoint')),
    payload    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX training_job_events_job ON training_job_events (job_id, sequence);
