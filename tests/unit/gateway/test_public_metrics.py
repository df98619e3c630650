"""Issue 15: the gateway's /metrics is public (Prometheus scrapes it without a key), so none of its series
may carry a name a tenant chose or a tenant's own name: a deployment's figures are its tenant's, at
GET /v1/deployments/{name}/metrics. Checked on the metrics a gateway process registers (a fresh
interpreter: this one may hold the services' metrics, which the gateway never serves)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[3]
TENANT_CHOSEN = {"tenant", "deployment", "model", "dataset", "name", "key_id", "alias"}

PROBE = """
import json
import gateway.server  # everything the gateway process imports, so every metric it registers
from prometheus_client import REGISTRY
labels = {}
for family in REGISTRY.collect():
    for sample in family.samples:
        labels.setdefault(family.name, set()).update(sample.labels)
    if not family.samples:
        labels.setdefault(family.name, set())
print(json.dumps({name: sorted(names) for name, names in labels.items()}))
"""


def test_no_public_gateway_metric_carries_a_tenant_chosen_label():
    import os

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"}
    output = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, check=True, capture_output=True,
                            text=True).stdout
    labels = json.loads(output)
    assert "llmp_completion_tokens" in labels  # the gateway's token count is still there, aggregated
    leaking = {name: sorted(set(names) & TENANT_CHOSEN) for name, names in labels.items()
               if set(names) & TENANT_CHOSEN}
    assert not leaking, f"public metrics labelled with tenant-chosen names: {leaking}"
