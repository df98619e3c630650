"""`llmp up | down | status`: the argparse wiring (registered by cli.main) over the lifecycle."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from cli.stack.errors import StackError
from cli.stack.lifecycle import down, status, up
from cli.stack.table import BY_NAME


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    # `kill` of `llmp up` cleans up like Ctrl-C; SIGINT is set explicitly because a process started in
    # the background of a non-interactive shell (CI) inherits it ignored, and Python then never raises
    # KeyboardInterrupt.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    began = time.monotonic()
    try:
        state = up(os.environ, only, args.timeout)
    except StackError as error:
        print(f"llmp up failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmp up interrupted: stopped what it had started", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stack healthy in {time.monotonic() - began:.1f}s; state in {state.env['LLMP_STATE_DIR']}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    down(os.environ)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = status(os.environ)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("the stack is not running (no stack.json)")
    else:
        print(format_table(rows))
    return 0 if rows and all(r["healthy"] for r in rows) else 1


def format_table(rows: list[dict]) -> str:
    header = ("COMPONENT", "MODE", "PID", "PORTS", "HEALTHY", "LOG")
    table = [header] + [(r["name"], r["mode"], str(r["pid"] or "-"), ",".join(map(str, r["ports"])) or "-",
                         "yes" if r["healthy"] else "NO", r["log"] or r["detail"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in table)


def register(commands: argparse._SubParsersAction) -> None:
    names = ", ".join(BY_NAME)
    parser = commands.add_parser("up", help="start the local stack and wait until it is healthy")
    parser.add_argument("--only", metavar="A,B", help=f"start these components and what they need ({names})")
    parser.add_argument("--timeout", type=float, help="seconds to wait for each component (LLMP_UP_TIMEOUT)")
    parser.set_defaults(func=cmd_up)
    parser = commands.add_parser("down", help="stop what `llmp up` started")
    parser.set_defaults(func=cmd_down)
    parser = commands.add_parser("status", help="show the local stack (exit 1 unless all healthy)")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.set_defaults(func=cmd_status)
