"""The one route table of the REST API, gathered from the view modules."""

from __future__ import annotations

from gateway.http import Route
from gateway.views import (
    completions,
    console,
    datasets,
    deployments,
    evaluations,
    keys,
    model_files,
    models,
    openai_compat,
    system,
    training_jobs,
)

# Every view module, in the order /openapi.json lists them.
VIEW_MODULES = [system, keys, datasets, training_jobs, evaluations, models, model_files, deployments, completions,
                openai_compat, console]


def all_routes() -> list[Route]:
    table: list[Route] = []
    for module in VIEW_MODULES:
        table.extend(module.ROUTES)
    seen: set[tuple[str, str]] = set()
    for route in table:
        if (route.method, route.path) in seen:
            raise RuntimeError(f"route {route.method} {route.path} declared twice")
        seen.add((route.method, route.path))
    return table
