"""The one Ray actor: a ChunkStylizer (pipeline/chunks.py) on a cluster, and how many of them a cluster holds.

    StylizerActor.ready()                        loads the model once; returns the node id
    StylizerActor.stylize(chunk, frames, ...)    Frames in, the kept Frames out     (stylize --runner ray)
    StylizerActor.render(task)                   a chunk task to a chunk file       (batch)

The model loads in `ready()`, not `__init__`, so that a bad checkpoint comes back to the driver as that call's
UserError instead of as a dead actor.
"""
from __future__ import annotations

import dataclasses

import ray

from models.errors import UserError
from pipeline.batch_worker import ChunkDone, ChunkRenderer, ChunkTask, FaultPlan
from pipeline.chunks import Chunk, ChunkStylizer
from pipeline.source import Frame
from pipeline.stylizer import STAGE_THREADS, StylizerConfig


class StylizerActor:
    def __init__(self, weights: str | None, device: str, threads: int | None, fault: FaultPlan | None = None):
        self.args = weights, device, threads
        self.fault = fault
        self.renderer: ChunkRenderer | None = None

    def ready(self) -> str:
        if self.renderer is None:
            self.renderer = ChunkRenderer(ChunkStylizer.load(*self.args), self.fault)
        return ray.get_runtime_context().get_node_id()

    def stylize(self, chunk: Chunk, frames: list[Frame], style, frame_shape: tuple[int, int],
                config: StylizerConfig) -> list[Frame]:
        return list(self.renderer.stylizer.stylize(chunk, frames, style, frame_shape, config))

    def render(self, task: ChunkTask) -> ChunkDone:
        return dataclasses.replace(self.renderer.render(task), node=self.ready()[:8])


def stylizer_pool(device: str, workers: int | None, threads: int | None = None, most: int | None = None,
                  resources: dict | None = None) -> tuple[int, dict, str, int | None]:
    """(actor count, the resources each asks Ray for, its torch device, its torch threads) for this cluster
    (`resources`: what it holds, default `ray.cluster_resources()`).

    One actor per GPU, asking for a CPU per stage thread of its pipelined stylizer (STAGE_THREADS: decoding,
    resizing, flow and post-processing keep the host busy beside the GPU); without GPUs one per `threads` CPUs
    (None: one per 2 CPUs, each with the CPUs there are per actor), whose torch threads and stages share them.
    `workers` overrides the count, `most` caps it (an actor without work only loads a model). Resources may be
    fractional: every actor must be schedulable, or the work sent to it would wait forever.
    """
    resources = ray.cluster_resources() if resources is None else resources
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if device.startswith("cuda") and not gpus:
        raise UserError(f"device: {device} asked for, but the cluster has no GPUs")
    if gpus and device != "cpu":
        count = workers or gpus
        count = min(count, most or count)
        return count, {"num_gpus": min(1.0, gpus / count), "num_cpus": min(float(STAGE_THREADS), cpus / count)}, \
            device, threads
    count = workers or max(1, cpus // (threads or 2))
    count = min(count, most or count)
    threads = threads or max(1, cpus // count)
    return count, {"num_cpus": min(float(threads), cpus / count)}, "cpu" if device == "auto" else device, threads
