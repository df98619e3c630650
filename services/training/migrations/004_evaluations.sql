-- Evaluation jobs share the training jobs' machinery (queue, leases, events, cancel, idempotent submit):
-- a row of kind 'evaluation' holds its request in `spec`, the evaluated model in model_name/model_version,
-- its figures in latest_metrics. Training and evaluation workers claim only their own kind.
ALTER TABLE training_jobs ADD COLUMN kind text NOT NULL DEFAULT 'training'
    CHECK (kind IN ('training', 'evaluation'));
CREATE INDEX training_jobs_evaluations ON training_jobs (tenant, model_name, model_version, created_at DESC)
    WHERE kind = 'evaluation';
