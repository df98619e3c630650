-- Deploy in one step (services/inference/deployments.py): a deployment naming a version with no ONNX export
-- yet is EXPORTING while the registry exports it and checks parity, then LOADING, READY or FAILED.
ALTER TABLE inference_deployments DROP CONSTRAINT inference_deployments_state_check;
ALTER TABLE inference_deployments ADD CONSTRAINT inference_deployments_state_check
    CHECK (state IN ('EXPORTING', 'LOADING', 'READY', 'FAILED'));
