"""Per-tenant training quotas, counted from the job records in PostgreSQL so every coordinator replica sees
the same totals: training nodes held at once by a tenant's queued and running jobs, and node-hours run in
the last 24 hours (wall time from a job's start to its end, or now, × nnodes × nproc_per_node: one node-hour
is one process on one node for an hour, a GPU-hour on GPU machines).

Both are checked when a job is submitted, under a per-tenant advisory lock so two replicas cannot both admit
the job that passes a limit. A refusal is 429 `rate_limited` with Retry-After, its message naming the quota
and its setting: both free up by themselves (jobs end; the 24-hour window slides), so the client retries
later rather than changing its request. A job already running is never stopped for its tenant's node-hours.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import Settings
from services.common.errors import RateLimited

NODES_RETRY_AFTER = 60.0  # seconds: about when a running job may have ended
HOURS_RETRY_AFTER = 3600.0  # seconds: the window slides by the hour that scrolled out


@dataclass(frozen=True)
class TrainingQuotas:
    max_nodes: int = 8  # LLMP_TENANT_MAX_TRAINING_NODES
    node_hours_per_day: float = 192.0  # LLMP_TENANT_NODE_HOURS_PER_DAY

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingQuotas:
        return cls(settings.tenant_max_training_nodes, float(settings.tenant_node_hours_per_day))

    async def admit(self, conn, tenant: str, nnodes: int) -> None:
        """Refuse (RateLimited) a job of `nnodes` that would pass the tenant's quotas; call inside the
        transaction that inserts it, so the lock taken here covers the insert."""
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('llmp.training.quota:' || %s, 0))",
                           (tenant,))
        cursor = await conn.execute(
            """SELECT coalesce(sum(nnodes) FILTER (WHERE state IN ('QUEUED', 'RUNNING')), 0) AS nodes,
                      coalesce(sum(nnodes * coalesce((spec->'distributed'->>'nproc_per_node')::int, 1)
                                   * extract(epoch FROM coalesce(finished_at, now())
                                                        - greatest(started_at, now() - interval '1 day')))
                               FILTER (WHERE started_at IS NOT NULL), 0) / 3600.0 AS node_hours
               FROM training_jobs
               WHERE tenant = %s AND (state IN ('QUEUED', 'RUNNING') OR finished_at > now() - interval '1 day')""",
            (tenant,))
        used = await cursor.fetchone()
        if used["nodes"] + nnodes > self.max_nodes:
            raise RateLimited(
                f"training nodes quota: tenant {tenant!r} has {used['nodes']} node(s) in queued and running jobs; "
                f"this job's {nnodes} would pass LLMP_TENANT_MAX_TRAINING_NODES={self.max_nodes}",
                retry_after=NODES_RETRY_AFTER)
        if float(used["node_hours"]) >= self.node_hours_per_day:
            raise RateLimited(
                f"training node-hours quota: tenant {tenant!r} ran {float(used['node_hours']):.1f} node-hours in the "
                f"last 24 hours, LLMP_TENANT_NODE_HOURS_PER_DAY={self.node_hours_per_day:g}",
                retry_after=HOURS_RETRY_AFTER)
