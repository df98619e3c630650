"""Run one registration in its own process, so a test can SIGKILL it at any point.

Usage: register_child.py TENANT MODEL SOURCE_PREFIX (LLMP_* settings from the environment).
Prints "registered <version>" when it finishes.
"""

import asyncio
import sys
from pathlib import Path

from services.common.config import Settings
from services.common.db import Database
from services.common.identity import Caller
from services.common.s3 import ObjectStore
from services.registry import registration

# Not services.registry.server: it imports the exporters (torch), which would dwarf the registration.
MIGRATIONS = Path(registration.__file__).with_name("migrations")


async def main(tenant: str, model: str, source_prefix: str) -> None:
    settings = Settings.from_env()
    db = await Database.connect(settings.database_url, component="registry", migrations_dir=MIGRATIONS)
    try:
        _, version = await registration.register(
            db, ObjectStore(settings.s3), Caller(tenant, "key-child", "developer"),
            registration.Registration(model_name=model, source_prefix=source_prefix), heartbeat_seconds=0.2)
        sys.stdout.write(f"registered {version}\n")
    finally:
        await db.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
