"""`mambast batch JOBFILE`: render a YAML job file (clips × styles, or listed items) on a Ray cluster.

    mambast batch configs/jobs/example.yaml                          # a local Ray on this machine
    mambast batch jobs.yaml --address 10.0.0.5:6379 --workers 8      # join a running cluster (shared storage)
    mambast batch jobs.yaml --resume                                 # after a crash: only what is missing
    mambast batch jobs.yaml --check                                  # validate and list the items; render nothing

The job file is checked completely before anything starts (one line naming the entry on any problem). Each item
is split into chunks at shot cuts, the chunks are rendered on the cluster's stylizer actors, and each output is
joined from its chunks by stream copy. A summary table ends the run; the exit status is 1 if any item failed.
See docs/render-farm.md.
"""
from __future__ import annotations

import os

from pipeline.batch_job import load_job
from pipeline.batch_report import summary_table


def register(sub) -> None:
    p = sub.add_parser("batch", help="render a YAML job file of clips × styles on a Ray cluster (resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("jobfile", help="YAML job file (see configs/jobs/example.yaml)")
    p.add_argument("--address", help="join this Ray cluster (host:port, or 'auto'); default: start a local one")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the outputs and chunks already written")
    p.add_argument("--workers", type=int, help="stylizer actors (default: one per GPU, else one per `threads` CPUs)")
    p.add_argument("--check", action="store_true", help="validate the job file and list its items; render nothing")
    p.set_defaults(func=run_batch)


def run_batch(args) -> int:
    job = load_job(args.jobfile)
    if args.check:
        base = os.path.dirname(job.path)
        for item in job.items:
            print(f"{item.number + 1:>4}  {item.entry}: {os.path.relpath(item.clip, base)} × {item.style.name} -> "
                  f"{os.path.relpath(item.output, base)}")
        print(f"{job.name}: {len(job.items)} item(s), outputs in {job.output_dir}")
        return 0
    from pipeline.ray_batch import run_job  # imports Ray: only when rendering

    reports = run_job(job, address=args.address, workers=args.workers, resume=args.resume)
    print(summary_table(reports, job.output_dir))
    return 1 if any(r.status == "failed" for r in reports) else 0
