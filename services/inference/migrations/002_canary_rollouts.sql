-- Canary rollouts (services/inference/canary.py): a deployment's canary weight advanced step by step
-- while the canary stays healthy, promoted at 100, or rolled back to 0; every move is an event.
CREATE TABLE inference_canary_rollouts (
    id                   bigserial        PRIMARY KEY,
    tenant               text             NOT NULL,
    name                 text             NOT NULL,  -- the deployment
    model                text             NOT NULL,
    stable_version       bigint           NOT NULL CHECK (stable_version > 0),
    canary_version       bigint           NOT NULL CHECK (canary_version > 0),
    steps                integer[]        NOT NULL,
    interval_s           double precision NOT NULL CHECK (interval_s >= 0),
    min_requests         integer          NOT NULL CHECK (min_requests >= 1),
    max_error_rate_delta double precision NOT NULL CHECK (max_error_rate_delta >= 0),
    max_latency_ratio    double precision NOT NULL CHECK (max_latency_ratio >= 1),
    latency_statistic    text             NOT NULL CHECK (latency_statistic IN ('p95', 'mean')),
    state                text             NOT NULL
                         CHECK (state IN ('PROGRESSING', 'PROMOTED', 'ROLLED_BACK', 'ABORTED')),
    step_index           integer          NOT NULL DEFAULT 0,
    weight               integer          NOT NULL CHECK (weight BETWEEN 0 AND 100),
    baseline             jsonb            NOT NULL DEFAULT '{}',  -- counters when the step began
    step_started_at      timestamptz      NOT NULL DEFAULT now(),
    reason               text             NOT NULL DEFAULT '',
    created_at           timestamptz      NOT NULL DEFAULT now(),
    updated_at           timestamptz      NOT NULL DEFAULT now()
);
-- At most one rollout in progress per deployment.
CREATE UNIQUE INDEX inference_canary_rollouts_progressing
    ON inference_canary_rollouts (tenant, name) WHERE state = 'PROGRESSING';
CREATE INDEX inference_canary_rollouts_by_deployment ON inference_canary_rollouts (tenant, name, id);

CREATE TABLE inference_canary_events (
    id          bigserial   PRIMARY KEY,
    rollout_id  bigint      NOT NULL REFERENCES inference_canary_rollouts (id) ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text        NOT NULL CHECK (kind IN ('STARTED', 'ADVANCED', 'PROMOTED', 'ROLLED_BACK', 'ABORTED')),
    from_weight integer     NOT NULL,
    to_weight   integer     NOT NULL,
    reason      text        NOT NULL DEFAULT '',
    observed    jsonb       NOT NULL DEFAULT '{}'  -- per track: requests, errors, error_rate, latency_s
);
CREATE INDEX inference_canary_events_by_rollout ON inference_canary_events (rollout_id, id);
