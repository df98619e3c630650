-- Accepted ingests survive a restart: each PENDING version has an owner (the replica building it) and a
-- lease it renews while it builds. A replica resumes a PENDING version whose lease has expired, from the
-- corpus stored in S3 at `sources/datasets/{tenant}/{name}/v{version}/corpus`.
ALTER TABLE dataset_versions
    -- the replica building the version ('' once released or finished)
    ADD COLUMN owner            text        NOT NULL DEFAULT '',
    -- when the owner's claim lapses unless renewed; NULL for versions reserved before this migration
    ADD COLUMN lease_expires_at timestamptz,
    -- how many builds of the version were started (the first one included)
    ADD COLUMN attempts         integer     NOT NULL DEFAULT 0;
