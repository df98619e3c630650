"""Per-version Prometheus metrics, so a canary can be judged against its stable version.

`tenant` is a label because deployment names are per tenant: two tenants' `chat` must not add up in one
rollout's figures.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

LABELS = ["tenant", "deployment", "model", "version", "canary"]

REQUESTS = Counter("llmp_inference_requests_total", "Generation requests by served version and outcome",
                   [*LABELS, "outcome"])
LATENCY = Histogram("llmp_inference_request_seconds", "Generation latency by served version", LABELS,
                    buckets=LATENCY_BUCKETS)
FIRST_TOKEN = Histogram("llmp_inference_first_token_seconds", "Time to first token by served version", LABELS,
                        buckets=LATENCY_BUCKETS)
TOKENS = Counter("llmp_inference_tokens_total", "Tokens by served version and kind (prompt, completion)",
                 [*LABELS, "kind"])
