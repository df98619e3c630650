"""Which lapsed builds a replica offers to take over: only while it has a slot free, never of a tenant
already at its bound there (the builds it accepted count, started or still waiting for a slot)."""

from types import SimpleNamespace

from services.dataset.ingestion import Ingestor, _Running


class Versions:
    """Records the claims asked of it; finds nothing to claim."""

    def __init__(self) -> None:
        self.store = SimpleNamespace()
        self.claims: list[list[str]] = []

    async def claim_expired(self, owner: str, lease_seconds: float, skip_tenants=None):
        self.claims.append(list(skip_tenants or ()))
        return None


def ingestor_building(tmp_path, builds: list[str], slots: int, per_tenant: int) -> tuple[Ingestor, Versions]:
    versions = Versions()
    ingestor = Ingestor(versions, tmp_path, 1000, build_slots=slots, tenant_build_slots=per_tenant)
    for version_id, tenant in enumerate(builds):
        ingestor._running[version_id] = _Running(tenant, 0)
    return ingestor, versions


async def test_a_replica_building_takes_over_for_the_tenants_under_their_bound(tmp_path):
    ingestor, versions = ingestor_building(tmp_path, ["a", "a", "a"], slots=2, per_tenant=1)
    assert ingestor.free_slots() == (1, ["a"])  # a's three builds hold one slot; the other is free, not for a
    assert await ingestor.resume_one() is None
    assert versions.claims == [["a"]]


async def test_a_replica_with_every_slot_held_claims_nothing(tmp_path):
    ingestor, versions = ingestor_building(tmp_path, ["a", "b", "b"], slots=2, per_tenant=1)
    assert ingestor.free_slots() == (0, ["a", "b"])
    assert await ingestor.resume_one() is None
    assert versions.claims == []


async def test_an_idle_replica_claims_for_anyone(tmp_path):
    ingestor, versions = ingestor_building(tmp_path, [], slots=1, per_tenant=1)
    await ingestor.resume_one()
    assert versions.claims == [[]]
