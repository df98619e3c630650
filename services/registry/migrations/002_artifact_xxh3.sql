-- Each artifact's XXH3-128, taken in the same pass over the bytes as its SHA-256 (empty for artifacts
-- registered before, or copied without one): downloads check it instead of re-hashing SHA-256.
ALTER TABLE registry_artifacts ADD COLUMN xxh3_128 text NOT NULL DEFAULT '';
