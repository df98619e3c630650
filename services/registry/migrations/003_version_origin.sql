-- How a version came to be: 'imported' for a checkpoint brought in through ImportModelVersion, empty for
-- versions registered from llmp's own training. Imports also show while PENDING and FAILED (GetImport).
ALTER TABLE registry_versions ADD COLUMN origin text NOT NULL DEFAULT '';
