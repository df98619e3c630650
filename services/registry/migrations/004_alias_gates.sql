-- Promotion gates (services/registry/gates.py): an alias moves only to a version whose evaluation on the
-- gate's data is no worse than its current target's by max_regression (relative).
CREATE TABLE registry_alias_gates (
    tenant          text             NOT NULL,
    name            text             NOT NULL,
    alias           text             NOT NULL,
    dataset_name    text             NOT NULL,
    dataset_version bigint           NOT NULL CHECK (dataset_version >= 1),
    split           text             NOT NULL,
    metric          text             NOT NULL,
    max_regression  double precision NOT NULL CHECK (max_regression >= 0),
    updated_by      text             NOT NULL DEFAULT '',
    updated_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name, alias)
);

-- Every gate decision lands in the history: a refused move (or one waiting for an evaluation) is an
-- entry too, at the alias's current revision, so `sequence` is unique among the moves only.
ALTER TABLE registry_alias_history ADD COLUMN decision text NOT NULL DEFAULT 'moved'
    CHECK (decision IN ('moved', 'refused', 'pending'));
ALTER TABLE registry_alias_history ADD COLUMN gate text NOT NULL DEFAULT '';
ALTER TABLE registry_alias_history DROP CONSTRAINT registry_alias_history_tenant_name_alias_sequence_key;
CREATE UNIQUE INDEX registry_alias_history_moves ON registry_alias_history (tenant, name, alias, sequence)
    WHERE decision = 'moved';
