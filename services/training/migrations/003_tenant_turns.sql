-- Fair claims across tenants: when each tenant last had a node claimed. The next free node goes to the
-- tenant served least recently (priority only orders a tenant's own jobs), so one tenant's queue of many
-- jobs cannot starve another's single one. Also indexes the per-tenant quota sums done at submit.
CREATE TABLE training_tenant_turns (
    tenant          text        PRIMARY KEY,
    last_claimed_at timestamptz NOT NULL
);
CREATE INDEX training_jobs_tenant_active ON training_jobs (tenant) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX training_jobs_tenant_finished ON training_jobs (tenant, finished_at);
