"""The `mambast` command: one subcommand per job module.

Each job module exposes `register(subparsers)`, which adds its subcommand(s) and sets `func` on them.
`main()` turns any `UserError` (models/errors.py) (and other expected failures) into one line on stderr and exit status 2,
so users see "mambast: error: <file>: <problem>" instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from models.errors import UserError

# Job modules, in the order their subcommands appear in --help.
JOB_MODULES = [
    "jobs.demo",
    "jobs.stylize",
    "jobs.batch",
    "jobs.live",
    "jobs.controls_sheet",
    "jobs.train",
    "jobs.data",
    "jobs.evaluate",
    "jobs.bench",
    "jobs.convert",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambast", description="Mamba-ST video style transfer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in JOB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # job not written yet
                continue
            raise
        module.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it cleans up as on Ctrl-C (outputs aborted, temporaries gone)."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    if in_main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"mambast: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("mambast: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("mambast: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # raised by the OS: name the file and the problem in one line
        if os.environ.get("MAMBAST_DEBUG"):
            raise
        where = e.filename if e.filename is not None else type(e).__name__
        problem = " ".join(str(e.strerror or e).split())
        print(f"mambast: error: {where}: {problem}", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure: one line unless debugging
        if os.environ.get("MAMBAST_DEBUG"):
            raise
        detail = " ".join(str(e).split())  # one line, whatever the library put in its message
        print(f"mambast: error: {type(e).__name__}: {detail} (set MAMBAST_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
