-- The registry reservation a job's final model is being uploaded into ({"id", "version", "prefix",
-- "lease_seconds"}), recorded before the first byte goes: a later attempt of the job resumes it (or
-- finds it committed) instead of registering a second version.
ALTER TABLE training_jobs ADD COLUMN model_reservation jsonb;
