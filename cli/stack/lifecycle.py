"""`up`, `down` and `status` over the component table: each level of components in parallel, `up` in
dependency order and `down` in reverse; `up` stops what it spawned when it fails or is interrupted."""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from cli import servers
from cli.stack.component import Launch, Started
from cli.stack.errors import StackError
from cli.stack.settings import base_env, child_env
from cli.stack.state import Record, StackState, StateDir
from cli.stack.table import BY_NAME, INFRA, component_of, healthy, missing_modules, select, start_levels
from services.common import config
from services.common.errors import InvalidArgument


def state_dir(environ: Mapping[str, str]) -> StateDir:
    return StateDir(Path(base_env(environ)["LLMP_STATE_DIR"]))


def up(environ: Mapping[str, str], only: Iterable[str] | None = None, timeout: float | None = None,
       out=None) -> StackState:
    """Start what is selected and not yet running; return once everything recorded is healthy."""
    out = out or sys.stdout
    fresh = base_env(environ)
    dirs = StateDir(Path(fresh["LLMP_STATE_DIR"]))
    names = select(only)
    missing = missing_modules(names)
    if missing:
        lines = "\n".join(f"  {name}: python module {module} does not exist yet" for name, module in missing.items())
        raise StackError(f"cannot start the stack:\n{lines}\n(start a subset with --only, e.g. --only "
                         f"{','.join(INFRA)})")
    with dirs.lock():
        state = dirs.load()
        if state is not None and not any(r.alive() and r.owned for r in state.records.values()):
            state = None  # nothing of it runs any more: start afresh with today's settings
        if state is None:
            state = StackState(env=fresh)
        env = state.env
        try:  # fail on bad settings before starting anything
            config.Settings.from_env(child_env(env))
        except InvalidArgument as error:
            raise StackError(str(error)) from error
        launch = Launch(dirs, env, timeout or float(env.get("LLMP_UP_TIMEOUT", "120")))
        try:
            for level in start_levels(names):
                todo = [n for n in level if not (n in state.records and healthy(state.records[n], env))]
                # Still running but not ready (a dependency was down, and was just restarted): it recovers
                # by itself. Restarting it would collide with its own port; forgetting it would orphan it.
                recovering = [n for n in todo if state.records.get(n) is not None
                              and state.records[n].owned and state.records[n].alive()]
                todo = [n for n in todo if n not in recovering]
                for name in recovering:
                    _await_recovery(launch, state.records[name])
                for name in todo:
                    state.records.pop(name, None)
                if not todo:
                    continue
                results = _start_level(launch, todo)
                for name in todo:
                    record, updates = results[name]
                    state.records[name] = record
                    env.update(updates)
                    out.write(f"  {name:<10} {describe(record)} ({record.startup_s:.1f}s)\n")
                    out.flush()
                dirs.save(state)
        except BaseException:
            launch.cancel.set()
            stop_records(launch.spawned)
            for name in launch.spawned:
                state.records.pop(name, None)
            if any(record.owned for record in state.records.values()):
                dirs.save(state)  # what an earlier `up` started still runs
            else:
                dirs.clear()
            raise
    return state


def _await_recovery(launch: Launch, record: Record) -> None:
    """Wait until a component `up` left running is healthy again; StackError when it does not recover."""
    log = Path(record.log) if record.log else None
    try:
        servers.wait_until(lambda: healthy(record, launch.env), launch.timeout, None, log,
                           f"{record.name} (running, not ready)", launch.cancel)
    except TimeoutError as error:
        raise StackError(f"{record.name} runs (pid {record.pid}) but did not become ready: {error}") from error


def _start_level(launch: Launch, names: list[str]) -> dict[str, Started]:
    """Start `names` in parallel; raise StackError for the first that failed (after all finished)."""
    results: dict[str, Started] = {}
    failures: dict[str, BaseException] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(names))
    futures = {pool.submit(launch.start, BY_NAME[name]): name for name in names}
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except Exception as error:  # reported below, with the component's log
                failures[futures[future]] = error
                launch.cancel.set()  # the others stop waiting; the caller stops what was spawned
    except BaseException:
        launch.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        # The first real failure, not the components cancelled because of it.
        name, error = next(((n, e) for n, e in failures.items() if not isinstance(e, InterruptedError)),
                           next(iter(failures.items())))
        raise StackError(f"{name} did not come up: {error}") from error
    return results


def stop_records(records: Mapping[str, Record]) -> None:
    """Stop `records` in reverse dependency order, each level in parallel."""
    names = [name for name in BY_NAME if name in records]
    for level in reversed(start_levels(names)):
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(level)) as pool:
            list(pool.map(lambda n: component_of(records[n]).stop(records[n]), level))


def down(environ: Mapping[str, str], out=None) -> list[str]:
    """Stop what `up` recorded; return the names stopped."""
    out = out or sys.stdout
    dirs = state_dir(environ)
    with dirs.lock():
        state = dirs.load()
        if state is None:
            out.write(f"nothing to stop: no stack recorded in {dirs.root}\n")
            return []
        stop_records(state.records)
        dirs.clear()
    stopped = [name for name in BY_NAME if name in state.records]
    for name in stopped:
        record = state.records[name]
        verb = "stopped" if record.owned else "left as it was"
        out.write(f"  {name:<10} {verb} ({describe(record)})\n")
    return stopped


def status(environ: Mapping[str, str]) -> list[dict]:
    """One row per recorded component: its mode, pid, ports, health and log."""
    dirs = state_dir(environ)
    state = dirs.load()
    if state is None:
        return []
    names = [n for n in BY_NAME if n in state.records]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        health = dict(zip(names, pool.map(lambda n: healthy(state.records[n], state.env), names), strict=True))
    return [{"name": n, "mode": state.records[n].mode, "pid": state.records[n].pid,
             "ports": state.records[n].ports, "healthy": health[n], "log": state.records[n].log,
             "detail": state.records[n].detail} for n in names]


def describe(record: Record) -> str:
    """One line about a record: `pid 123 port 5432` or `external: postgresql://…`."""
    ports = f" port {','.join(map(str, record.ports))}" if record.ports else ""
    if record.mode == "process":
        return f"pid {record.pid}{ports}"
    return f"{record.mode}: {record.detail}{ports}"

