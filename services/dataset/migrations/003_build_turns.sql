-- Fair turns across tenants for dataset builds: when each tenant last had a build started, on any replica.
-- A replica with a free build slot takes over the lapsed PENDING version of the tenant served least recently
-- (oldest first within it), so one tenant's many interrupted builds cannot starve another's.
CREATE TABLE dataset_tenant_turns (
    tenant          text        PRIMARY KEY,
    last_started_at timestamptz NOT NULL
);
