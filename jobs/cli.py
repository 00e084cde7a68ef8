"""The `mambast` command: one subcommand per job module.

Each job module exposes `register(subparsers)`, which adds its subcommand(s) and sets `func` on them.
`main()` turns any `UserError` (models/errors.py) (and other expected failures) into one line on stderr and exit status 2,
so users see "mambast: error: <file>: <problem>" instead of a traceback.
"""
from __future__ import annotations

import os

# The environment the user started us with, before the line below: what a benchmark's child processes get, so that
# an older revision runs as it ran for its users (jobs/bench_gpu.py --baseline).
LAUNCH_ENVIRONMENT = dict(os.environ)
# torch's OpenMP threads wait for work passively instead of spinning. libgomp reads this once, when torch loads it,
# hence before any import that may load torch. Spinning pays on a machine with nothing else to do; a stylize job
# runs decode, flow, post-processing and x264 threads beside the model's, which spinning threads starve (1080p on
# the 2-core box, `mambast bench gpu`: steadier and on average faster, serial and pipelined alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from models.errors import UserError  # noqa: E402

# Job modules, in the order their subcommands appear in --help.
JOB_MODULES = [
    "jobs.demo",
    "jobs.stylize",
    "jobs.batch",
    "jobs.tune",
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
