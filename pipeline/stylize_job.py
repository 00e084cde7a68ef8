"""A stylize job: what to read, how to stylize it, where to write it; checked before any frame is stylized.

    StylizeJob ──check_job──► Render (source, selection, parsed style, StylizerConfig, audio plan)
               ──open_render─► + the FrameSink (a hidden temporary file beside the output)

Everything the user can get wrong is checked before any frame is stylized: the input decodes, the selection holds
frames, the style is an image, the output is writable and is not the input. From the moment the sink exists every
failure aborts it, so the output path is either the finished file or untouched. The runners (pipeline/local_runner.py,
pipeline/ray_clip.py) take a Render from here.

Frames keep their source timestamps: the output has the source's frame rate as an exact fraction, its VFR timing
and its audio in sync. A partial selection keeps the audio under the selected frames (the sink trims it);
with `every_nth` each kept frame is shown for the n source frames it stands for, so the clip plays in real time
at 1/n of the frame rate and its audio stays in sync. Only an image-sequence output drops the audio.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

from models.checkpoint import read_model_config
from models.errors import UserError
from models.style_tuning import StyleTuning
from pipeline.chunks import DECODE_BACKEND, Chunk, plan_chunks
from pipeline.settings import Settings
from pipeline.sink import VIDEO_EXTENSIONS, FrameSink
from pipeline.source import FrameSource, open_source
from pipeline.styles import StyleImage, parse_style, style_files
from pipeline.stylizer import StylizerConfig, check_work_fits

RAY_CHUNK_FRAMES = 64  # kept frames per chunk on Ray when the job leaves it to the runner (chunk_frames 0)


@dataclass
class StylizeJob:
    """One stylization: the input, the style, the output, and the frames, settings and device to use.

    `style` is an image path, or anything `pipeline.styles.parse_style` takes (a blend, a schedule).
    """

    input: str
    style: str
    output: str
    settings: Settings = field(default_factory=Settings)
    weights: str | None = None        # None: the bundled weights
    start: int = 0
    end: int | None = None            # exclusive
    every_nth: int = 1
    max_frames: int | None = None
    overwrite: bool = False
    device: str = "auto"

    def __post_init__(self):
        self.input, self.output = os.fspath(self.input), os.fspath(self.output)

@dataclass
class Summary:
    output: str
    frames: int
    seconds: float          # wall time of the whole run
    render_seconds: float   # from the first frame asked for to the output closed: no probing, model or Ray start
    runner: str
    audio: str              # what happened to the audio, in words

    @property
    def fps(self) -> float:
        return self.frames / self.render_seconds if self.render_seconds > 0 else 0.0

    def line(self) -> str:
        return (f"wrote {self.output}: {self.frames} frames at {self.fps:.2f} fps, {self.seconds:.1f} s wall "
                f"({self.runner} runner; audio {self.audio})")


@dataclass
class Render:
    """A checked job: its source, selection, parsed style and settings, and the sink it writes to."""

    job: StylizeJob
    source: FrameSource
    selection: range
    style: object           # StyleImage | StyleBlend | StyleSchedule
    config: StylizerConfig
    audio: str
    sink: FrameSink | None = None
    started: float = field(default_factory=time.perf_counter)
    weights: str | None = None  # what the runners load: the job's weights, or those tuned to its style (`tune`)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.source.info.height, self.source.info.width

    def chunks(self, default_chunk_frames: int) -> list[Chunk]:
        """The selection in chunks of the job's chunk_frames, else `default_chunk_frames`, else one piece."""
        size = self.job.settings.chunk_frames or default_chunk_frames or len(self.selection)
        return plan_chunks(self.selection, (), size, self.config.lead_in)

    def summary(self, runner: str, render_started: float) -> Summary:
        now = time.perf_counter()
        return Summary(self.job.output, self.sink.frames_written, now - self.started, now - render_started,
                       runner, self.audio)


def check_job(job: StylizeJob, announce: bool = True) -> Render:
    """Open the source and the style and check the settings; creates nothing.

    A damaged input (pipeline/video_probe.py) is refused with `settings.strict`, else read as far as it decodes
    with one warning on stderr (`announce`) that the output's metadata records too; a file with several video
    streams gets one line naming the one read."""
    started = time.perf_counter()
    source = open_source(job.input, backend=DECODE_BACKEND, strict=job.settings.strict)
    if announce:
        info = source.info
        if getattr(info, "note", None):
            notice("info", info.note)
        if getattr(info, "damage", None):
            notice("warning", f"{os.path.basename(info.path)}: {info.damage}; stylizing the {info.num_frames} "
                              f"frames that decode (--strict refuses damaged files)")
    selection = source.select(job.start, job.end, job.every_nth, job.max_frames)
    if len(selection) == 0:
        raise UserError(f"{job.input}: the selection (start={job.start}, end={job.end}, max_frames={job.max_frames}) "
                        f"holds no frames")
    config = job.settings.stylizer_config()
    check_work_fits(read_model_config(job.weights), (source.info.height, source.info.width), config.working_size,
                    config.batch_size, where=job.input)
    style = parse_style(job.style, fps=source.info.fps)
    return Render(job, source, selection, style, config, audio_plan(job, source), started=started,
                  weights=job.weights)


def tune(render: Render, announce: bool = True) -> None:
    """With `tune_steps` > 0, point `render.weights` at the job's weights tuned to its style on frames spread over
    the selection (pipeline/style_tuning.py: cached on disk, so a rerun or a retry reads the same file). A blend or
    a schedule is several styles: it keeps the weights as given, with a notice."""
    steps = render.job.settings.tune_steps
    if steps == 0:
        return
    if not isinstance(render.style, StyleImage):
        if announce:
            notice("info", f"tuning is for one style image; {render.style.name} is several: stylizing untuned")
        return
    from pipeline.api import resolve_device
    from pipeline.style_tuning import tuned_weights, tuning_frames

    frames = tuning_frames(render.source, render.selection, render.config.working_size)
    tuning = StyleTuning(steps=steps, seed=render.job.settings.seed)
    render.weights = str(tuned_weights(render.job.weights, render.style.image, frames, tuning,
                                       device=resolve_device(render.job.device), name=render.style.name,
                                       show_progress=announce))


def open_render(job: StylizeJob, runner: str) -> Render:
    """`check_job`, open the sink (a hidden temporary file), then `tune`: from the sink on, failures must
    `sink.abort()`."""
    render = check_job(job)
    audio_from = job.input if render.audio == "kept" else None
    settings = job.settings
    render.sink = FrameSink(job.output, like=render.source.info, codec=settings.codec, crf=settings.crf,
                            pix_fmt=settings.pix_fmt, audio_from=audio_from, metadata=job_metadata(render, runner),
                            overwrite=job.overwrite, threads=settings.encoder_threads,
                            protect=style_files(render.style),
                            end_pts=selection_end_pts(render.source, render.selection))
    try:
        tune(render)  # after the sink: a bad output path is refused before the minute of tuning, not after it
    except BaseException:
        render.sink.abort()
        raise
    return render


def notice(kind: str, text: str) -> None:
    """One line on stderr for the user ("mambast: warning: ..."), beside the progress bar."""
    print(f"mambast: {kind}: {text}", file=sys.stderr, flush=True)


def selection_end_pts(source: FrameSource, selection: range) -> int:
    """Where the selection's last frame stops being shown: with every_nth > 1 it stands for the n source frames
    from it (as far as the selection and the clip go), so video and audio end where those frames end."""
    info = source.info
    last = min(selection[-1] + selection.step, selection.stop, info.num_frames) - 1
    return info.frame_end_pts(max(last, selection[-1]))


def audio_plan(job: StylizeJob, source: FrameSource) -> str:
    """'kept', or why the output has no audio."""
    if not source.info.has_audio:
        return "none (the source has none)"
    if not job.settings.audio:
        return "off (--no-audio)"
    if not job.output.lower().endswith(VIDEO_EXTENSIONS):
        return "dropped (an image sequence has no audio track)"
    return "kept"


def job_metadata(render: Render, runner: str) -> dict:
    """The settings stored in the output (the container's comment tag, or metadata.json beside frames)."""
    job = asdict(render.job)
    job |= job.pop("settings")  # one flat mapping: the job's fields and its settings
    job["weights"] = job["weights"] or "bundled"
    record = {"job": job, "runner": runner, "stylizer": asdict(render.config),
              "frames": {"selected": len(render.selection), "first": render.selection[0],
                         "last": render.selection[-1], "every_nth": render.selection.step}}
    if damage := getattr(render.source.info, "damage", None):
        record["source_damage"] = {"problem": damage, "frames_read": render.source.info.num_frames}
    if note := getattr(render.source.info, "note", None):
        record["source_stream"] = note
    return {"mambast": record}
