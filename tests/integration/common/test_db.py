import pytest

from services.common import errors
from services.common.db import Database

pytestmark = pytest.mark.integration


async def test_migrations_apply_once_in_order(database_url, tmp_path):
    (tmp_path / "001_create.sql").write_text("CREATE TABLE widgets (id int PRIMARY KEY, name text)")
    (tmp_path / "002_seed.sql").write_text("INSERT INTO widgets VALUES (1, 'a')")
    db = await Database.connect(database_url, component="widgets-a", migrations_dir=tmp_path)
    try:
        assert await db.migrate("widgets-a", tmp_path) == []  # already applied: nothing runs twice
        async with db.pool.connection() as conn:
            rows = await (await conn.execute("SELECT id, name FROM widgets")).fetchall()
        assert rows == [{"id": 1, "name": "a"}]
        (tmp_path / "003_more.sql").write_text("INSERT INTO widgets VALUES (2, 'b')")
        assert await db.migrate("widgets-a", tmp_path) == ["003_more.sql"]
    finally:
        async with db.pool.connection() as conn:
            await conn.execute("DROP TABLE widgets")
        await db.close()


async def test_an_edited_migration_is_refused(database_url, tmp_path):
    (tmp_path / "001_create.sql").write_text("CREATE TABLE gadgets (id int)")
    db = await Database.connect(database_url, component="gadgets", migrations_dir=tmp_path)
    try:
        (tmp_path / "001_create.sql").write_text("CREATE TABLE gadgets (id bigint)")
        with pytest.raises(errors.Internal, match="changed after it was applied"):
            await db.migrate("gadgets", tmp_path)
    finally:
        await db.close()


async def test_a_failing_migration_leaves_no_trace(database_url, tmp_path):
    (tmp_path / "001_bad.sql").write_text("CREATE TABLE half_done (id int); SELECT no_such_function();")
    with pytest.raises(Exception, match="no_such_function"):
        await Database.connect(database_url, component="bad", migrations_dir=tmp_path)
    db = await Database.connect(database_url, component="probe")
    try:
        async with db.pool.connection() as conn:
            table = await (await conn.execute("SELECT to_regclass('half_done') AS t")).fetchone()
            recorded = await (await conn.execute(
                "SELECT count(*) AS n FROM llmp_schema_migrations WHERE component = 'bad'")).fetchone()
        assert table["t"] is None and recorded["n"] == 0
    finally:
        await db.close()


async def test_transaction_rolls_back_on_error(database_url):
    db = await Database.connect(database_url, component="tx")
    try:
        async with db.pool.connection() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS tx_probe (id int)")
        with pytest.raises(RuntimeError):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO tx_probe VALUES (1)")
                raise RuntimeError("boom")
        async with db.pool.connection() as conn:
            count = await (await conn.execute("SELECT count(*) AS n FROM tx_probe")).fetchone()
        assert count["n"] == 0
        await db.check()
    finally:
        await db.close()


async def test_unreachable_database_is_unavailable():
    with pytest.raises(errors.Unavailable, match="PostgreSQL unreachable"):
        await Database.connect("postgresql://postgres@127.0.0.1:1/none", component="x", timeout=2)
