"""The local stack: `llmp up | down | status`.

`up` starts every component as a local process, in dependency order (each level in parallel), and
returns once all are healthy; `down` stops exactly what `up` recorded; `status` shows it. What `up`
started, and the settings it resolved, live in `<LLMP_STATE_DIR>/stack.json`, so `down`, `status` and
the other `llmp` commands agree on one stack:

    <state>/stack.json         what runs: per component its mode, pid, ports, log; the resolved LLMP_* env
    <state>/pids/<name>.pid    one per process we started
    <state>/logs/<name>.log    each component's output
    <state>/postgres/data      the embedded PostgreSQL (when LLMP_DATABASE_URL is not reachable)
    <state>/s3/                SeaweedFS data
    <state>/broker/            the SQLite Celery broker (when LLMP_BROKER_URL is not reachable)
    <state>/triton-models/     Triton's model repository (unless LLMP_TRITON_MODEL_REPOSITORY)
    <state>/admin.key          the bootstrap admin key (when LLMP_ADMIN_KEY is unset)

One module per component kind holds its start, health check and stop (`postgres`, `s3`, `broker`,
`triton`, `services`, `worker`, `gateway`), each a `component.Component`; `table` lists them in order;
`lifecycle` runs `up`/`down`/`status` over that table; `commands` is the argparse wiring.
"""

from cli.stack.commands import register
from cli.stack.errors import StackError
from cli.stack.lifecycle import down, status, up
from cli.stack.state import Record, StackState, StateDir
from cli.stack.table import BY_NAME, COMPONENTS

__all__ = ["BY_NAME", "COMPONENTS", "Record", "StackError", "StackState", "StateDir", "down", "register", "status",
           "up"]
