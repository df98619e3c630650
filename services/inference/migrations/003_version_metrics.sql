-- Fleet-wide per-version figures (services/inference/metrics.py `FleetMetrics`): every inference process
-- adds what it served since its last flush (every 2 s, and at shutdown) into the row of the current
-- 10-second bucket of PostgreSQL's clock, so the sums over a window are what the whole fleet served in it.
-- The canary controller judges rollouts from them (services/inference/canary.py `DatabaseMetrics`).
-- Buckets older than a retention (6 h by default) are deleted by the flushers.
CREATE TABLE inference_version_metrics (
    tenant            text             NOT NULL,
    deployment        text             NOT NULL,
    model             text             NOT NULL,
    version           bigint           NOT NULL CHECK (version > 0),
    canary            boolean          NOT NULL,  -- the track the requests were routed on
    bucket_start      timestamptz      NOT NULL,
    requests          bigint           NOT NULL DEFAULT 0,
    errors            bigint           NOT NULL DEFAULT 0,
    latency_sum       double precision NOT NULL DEFAULT 0,  -- seconds, over every request
    -- cumulative request counts per upper bound of metrics.LATENCY_BOUNDS (the Prometheus histogram's
    -- buckets, +Inf last); changing those bounds needs a new migration
    latency_buckets   bigint[]         NOT NULL,
    prompt_tokens     bigint           NOT NULL DEFAULT 0,
    completion_tokens bigint           NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, deployment, model, version, canary, bucket_start)
);
CREATE INDEX inference_version_metrics_by_bucket ON inference_version_metrics (bucket_start);
