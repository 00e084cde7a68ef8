"""The render farm's plain parts (no Ray): job files, chunk plans, the chunk worker, the joiner and the manifests.

    jobs.yaml ──load_job──► Job: items (clip × style → output), each with checked Settings
                              │ per item, on any node
                              ▼
                scan_clip ──► ClipPlan (frame count, shot cuts) ──plan_chunks──► ChunkSpans
                              │ per chunk, on any stylizer worker (one per GPU)
                              ▼
                ChunkWorker.render ──► one chunk file (the final codec; starts with a keyframe)
                              │ per item, once all its chunks are in
                              ▼
                join_chunks ──► the output: packets copied, timestamps shifted exactly, the source's audio
                                remuxed once, written under a hidden name and renamed into place

Every step's result is recorded in the item's manifest (JSON in the job's work folder, replaced atomically), so an
interrupted job resumes where it stopped. pipeline/farm_ray.py schedules these steps on a Ray cluster.

Bit-identical results whatever the worker and however often a chunk is retried:

* A chunk starts `lead_in` frames early and drops those outputs (pipeline/stylizer.py): its frames equal those
  of a one-piece run, so which worker renders it, and how often, changes nothing.
* Workers pin their torch/OpenCV thread count (the job's `threads`) and encoders get a fixed thread count
  (`encoder_threads`), so a retry on a machine with another core count computes the same bits. Every worker
  decodes with PyAV (DECODER), and batches a chunk the same way: from its first lead-in frame, `batch_size` at a
  time. (Float results depend on the batch size, a few 1e-6 between batches of 1 and 4 on a CPU, so a farm render
  is exactly reproducible by the farm; it equals a one-piece ClipStylizer run bit for bit only with batch_size 1.)
* Chunks are encoded with the final codec and joined by copying packets. ISO-BMFF (.mov/.mp4) rounds a
  file's start offset to the movie timescale (1/1000 s), so .mov chunks are written with timestamps relative to
  their first frame and shifted at the join in the stream's own time base (an exact integer shift); Matroska
  keeps only millisecond ticks, so FFV1 chunks (.mkv) keep the source's absolute timestamps, rounded the same
  way as a one-piece file. Either way the joined output has the source's timestamps, frame count and fps.

Bad job files fail up front with one line naming the entry: `jobs.yaml: items[2].style: file not found: x.png`.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import torch

from models.checkpoint import BUNDLED_DIR, load_model, read_yaml
from models.errors import UserError
from pipeline.api import resolve_device
from pipeline.sink import ENCODERS, VIDEO_EXTENSIONS, AudioPassthrough, FrameSink
from pipeline.shots import DEFAULT_THRESHOLD, ShotDetector
from pipeline.source import Frame, FrameSource, VideoInfo, open_source
from pipeline.styles import StyleCodes, StyleImage, parse_blend, parse_schedule, parse_style
from pipeline.stylizer import ClipStylizer, StylizerConfig
from pipeline.temporal import DIS_PRESETS, TemporalConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
WORK_FOLDER = ".mambast-batch"           # inside the job's output folder
MANIFEST_VERSION = 1
DEFAULT_OUTPUT = "{clip}_{style}.mp4"
TEMPLATE_FIELDS = ("clip", "style", "n")
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "ipod", ".mov": "mov", ".mkv": "matroska"}
FAULT_ENV = "MAMBAST_FARM_FAULT"         # test hook, see FaultPlan
# One decoder everywhere: `auto` picks decord or PyAV per process (decord may fail to open under load, and the two
# may differ by one level), and decord leaks on long clips (docs/video.md); FFmpeg's decode is bit-exact.
DECODER = "pyav"

JOB_KEYS = ("output_dir", "output", "weights", "device", "threads", "overwrite", "preset", "settings", "clips",
            "styles", "items")
ITEM_KEYS = ("clip", "style", "output", "settings")
STYLE_KEYS = ("style", "name")
PRESET_KEYS_IGNORED = ("runner", "device")  # stylize-only keys of configs/presets (the farm always runs on Ray)


# ----------------------------------------------------------------------------------------------------------
# The job file


@dataclass(frozen=True)
class Settings:
    """How one item is rendered and encoded. Job-wide in `settings:`, overridable per item."""

    working_size: int = 512         # short side the model runs at (0 = the source size)
    style_strength: float = 1.0     # 0 = the content, 1 = full style
    temporal_strength: float = 0.8  # temporal smoothing, 0 = off
    flow_preset: str = TemporalConfig.flow_preset  # DIS flow for the smoothing
    preserve_color: bool = False
    seed: int = 0                   # style token permutation: same seed, same frames
    batch_size: int = 4             # frames per model call
    codec: str | None = None        # h264 | hevc | prores | ffv1; None: h264
    crf: int = 18                   # h264/hevc quality
    pix_fmt: str | None = None      # None: the sink's choice for the size, alpha and bit depth
    audio: bool = True              # remux the source's audio into the output
    chunk_frames: int = 240         # most kept frames per chunk; chunks also end at shot cuts
    shot_threshold: float = DEFAULT_THRESHOLD
    encoder_threads: int = 2        # fixed, so that every worker writes the same bitstream

    OPTIONAL = ("codec", "pix_fmt")

    @classmethod
    def build(cls, values: dict, where: str) -> Settings:
        """Settings from a mapping whose keys and types were checked by `check_settings`; ranges checked here."""
        settings = cls(**values)
        problems = [
            ("working_size", settings.working_size >= 0, "must be >= 0 (0 = the source size)"),
            ("style_strength", 0 <= settings.style_strength <= 1, "must be between 0 and 1"),
            ("temporal_strength", 0 <= settings.temporal_strength <= 1, "must be between 0 and 1 (0 = off)"),
            ("flow_preset", settings.flow_preset in DIS_PRESETS, f"must be one of {', '.join(DIS_PRESETS)}"),
            ("batch_size", settings.batch_size >= 1, "must be >= 1"),
            ("codec", settings.codec is None or settings.codec in ENCODERS, f"must be one of {', '.join(ENCODERS)}"),
            ("crf", 0 <= settings.crf <= 51, "must be between 0 and 51"),
            ("chunk_frames", settings.chunk_frames >= 1, "must be >= 1"),
            ("shot_threshold", settings.shot_threshold > 0, "must be > 0"),
            ("encoder_threads", settings.encoder_threads >= 1, "must be >= 1"),
        ]
        for key, ok, problem in problems:
            if not ok:
                raise UserError(f"{where}.{key}: {problem}, got {getattr(settings, key)!r}")
        return settings

    @property
    def video_codec(self) -> str:
        return self.codec or "h264"

    def stylizer_config(self) -> StylizerConfig:
        temporal = TemporalConfig(strength=self.temporal_strength, flow_preset=self.flow_preset,
                                  shot_threshold=self.shot_threshold)
        return StylizerConfig(working_size=self.working_size, batch_size=self.batch_size, seed=self.seed,
                              temporal=temporal, temporal_enabled=self.temporal_strength > 0,
                              strength=self.style_strength, preserve_color=self.preserve_color)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings))


@dataclass(frozen=True)
class Style:
    """A style as the job gives it: `spec` is a parse_style string with absolute paths."""

    spec: str
    name: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Item:
    """One render: a clip in one style to one output."""

    number: int        # position in the job (0-based); {n} in templates is number + 1
    entry: str         # where it comes from, for messages: "items[2]" or "clips[0]×styles[1]"
    clip: str          # absolute path
    style: Style
    output: str        # absolute path, inside the job's output folder
    settings: Settings


@dataclass(frozen=True)
class Job:
    path: str           # the job file
    output_dir: str     # absolute; every output and the work folder are inside it
    weights: str | None  # None: the bundled weights
    device: str
    threads: int        # torch/OpenCV threads per worker, the same on every worker
    overwrite: bool
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def work_dir(self) -> str:
        return os.path.join(self.output_dir, WORK_FOLDER, Path(self.path).stem)

    def normalised(self) -> dict:
        """Everything that decides the output bits: recorded in the manifest, compared on --resume."""
        return {
            "format": MANIFEST_VERSION,
            "weights": weights_fingerprint(self.weights),
            "device": self.device,
            "threads": self.threads,
            "items": [{"clip": item.clip, "clip_file": file_fingerprint(item.clip), "style": item.style.spec,
                       "style_files": [file_fingerprint(f) for f in item.style.files],
                       "output": os.path.relpath(item.output, self.output_dir),
                       "settings": dataclasses.asdict(item.settings)} for item in self.items],
        }

    def hash(self, normalised: dict | None = None) -> str:
        text = json.dumps(normalised or self.normalised(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_job(path: str | os.PathLike) -> Job:
    """Read and check a job file; every problem is one UserError naming the file and the entry."""
    path = os.path.abspath(os.fspath(path))
    name = os.path.basename(path)
    raw = read_yaml(path)
    base = os.path.dirname(path)

    def fail(where: str, problem: str) -> UserError:
        return UserError(f"{name}: {where}: {problem}" if where else f"{name}: {problem}")

    check_keys(raw, JOB_KEYS, "", fail)
    output_dir = os.path.normpath(os.path.join(base, typed(raw, "output_dir", str, ".", fail)))
    template = typed(raw, "output", str, DEFAULT_OUTPUT, fail)
    weights = typed(raw, "weights", str, None, fail)
    if weights is not None:
        weights = os.path.normpath(os.path.join(base, weights))
        if not os.path.exists(weights):
            raise fail("weights", f"file not found: {raw['weights']}")
    device = typed(raw, "device", str, "auto", fail)
    threads = typed(raw, "threads", int, 1, fail)
    if threads < 1:
        raise fail("threads", f"must be >= 1, got {threads}")
    overwrite = typed(raw, "overwrite", bool, False, fail)

    defaults: dict = {}
    if raw.get("preset") is not None:
        preset_name = typed(raw, "preset", str, None, fail)
        defaults.update(read_preset(preset_name, base, fail))
    defaults.update(check_settings(typed(raw, "settings", dict, {}, fail), "settings", fail))
    job_settings = Settings.build(defaults, f"{name}: settings")

    pairs = []  # (entry, clip path, Style, output template, Settings)
    clips = []
    for i, entry in enumerate(typed(raw, "clips", list, [], fail)):
        found = expand_clips(entry, base, f"clips[{i}]", fail)
        clips += [(f"clips[{i}]" + (f"({os.path.basename(p)})" if len(found) > 1 else ""), p) for p in found]
    styles = [(f"styles[{i}]", read_style(entry, base, f"styles[{i}]", fail))
              for i, entry in enumerate(typed(raw, "styles", list, [], fail))]
    if bool(clips) != bool(styles) and ("clips" in raw or "styles" in raw):
        missing = "styles" if clips else "clips"
        raise fail(missing, f"clips and styles go together (every clip in every style); give {missing} too, "
                            f"or list renders under items")
    for clip_entry, clip in clips:
        for style_entry, style in styles:
            pairs.append((f"{clip_entry}×{style_entry}", clip, style, template, job_settings))
    for i, entry in enumerate(typed(raw, "items", list, [], fail)):
        where = f"items[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, f"must be a mapping with clip and style, got {type(entry).__name__}")
        check_keys(entry, ITEM_KEYS, where, fail)
        for key in ("clip", "style"):
            if entry.get(key) is None:
                raise fail(where, f"needs a {key}")
        clip_paths = expand_clips(typed(entry, "clip", str, None, fail, where), base, f"{where}.clip", fail)
        style = read_style(entry["style"], base, f"{where}.style", fail)
        overrides = check_settings(typed(entry, "settings", dict, {}, fail, where), f"{where}.settings", fail)
        settings = Settings.build({**dataclasses.asdict(job_settings), **overrides}, f"{name}: {where}.settings")
        item_template = typed(entry, "output", str, template, fail, where)
        for clip in clip_paths:
            entry_name = where + (f"({os.path.basename(clip)})" if len(clip_paths) > 1 else "")
            pairs.append((entry_name, clip, style, item_template, settings))
    if not pairs:
        raise fail("items", "the job renders nothing: give clips and styles, or items")

    items, owners = [], {}
    for number, (entry, clip, style, item_template, settings) in enumerate(pairs):
        output = render_output(item_template, clip, style, number, output_dir, f"{entry}.output", fail)
        if output in owners:
            raise fail(f"{entry}.output", f"{os.path.relpath(output, output_dir)} is also the output of "
                                          f"{owners[output]}; put {{clip}}/{{style}}/{{n}} in the name")
        if os.path.realpath(output) == os.path.realpath(clip):
            raise fail(f"{entry}.output", f"{os.path.relpath(output, output_dir)} would overwrite its input clip")
        check_container(output, settings, f"{entry}", fail)
        owners[output] = entry
        items.append(Item(number, entry, clip, style, output, settings))
    return Job(path, output_dir, weights, device, threads, overwrite, tuple(items))


def check_keys(mapping: dict, allowed: tuple[str, ...], where: str, fail, what: str = "key") -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(allowed)})"
            raise fail(where, f"unknown {what} {key!r}{hint}")


def typed(mapping: dict, key: str, kind: type, default, fail, where: str | None = None):
    """mapping[key] checked to be a `kind` (bool is not an int; an int is a float), or the default if absent/null."""
    value = mapping.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "a mapping"}
        raise fail(f"{where}.{key}" if where else key, f"must be {names[kind]}, got {value!r}")
    return value


def check_settings(values: dict, where: str, fail, ignored: tuple[str, ...] = ()) -> dict:
    """Known keys with the right types (a setting's type is its default's; codec and pix_fmt may be null)."""
    values = {key: value for key, value in values.items() if key not in ignored}
    check_keys(values, SETTING_NAMES, where, fail, what="setting")
    checked = {}
    for key, value in values.items():
        if value is None:
            if key not in Settings.OPTIONAL:
                raise fail(f"{where}.{key}", "must not be null")
            checked[key] = None
            continue
        kind = str if key in Settings.OPTIONAL else type(getattr(Settings, key))
        checked[key] = typed(values, key, kind, None, fail, where)
    return checked


def read_preset(name_or_path: str, base: str, fail) -> dict:
    """configs/presets/NAME.yaml, or a YAML path relative to the job file."""
    path = Path(base) / name_or_path
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise fail("preset", f"no such preset or file: {name_or_path} (presets: {have})")
    values = read_yaml(path)
    if values.get("chunk_frames") == 0:
        values.pop("chunk_frames")  # the stylize presets' "runner's choice"
    return check_settings(values, f"preset {name_or_path}", fail, ignored=PRESET_KEYS_IGNORED)


def expand_clips(pattern, base: str, where: str, fail) -> list[str]:
    """A clip path, folder (image sequence) or glob, relative to the job file; globs expand in sorted order."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise fail(where, f"must be a path or a glob, got {pattern!r}")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(pattern)))
    if glob.has_magic(pattern):
        found = sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
        if not found:
            raise fail(where, f"no files match {pattern}")
        return found
    if not os.path.exists(full):
        raise fail(where, f"file not found: {pattern}")
    return [full]


_KEYFRAME = re.compile(r"^\s*(\d+(?:\.\d+)?s?)\s*:(.*)$")


def read_style(entry, base: str, where: str, fail) -> Style:
    """A style entry: an image path, a blend "a.jpg*0.7+b.jpg*0.3", a schedule "0:a.jpg,5s:b.jpg", or a mapping
    {style: ..., name: ...}. Paths are made absolute (relative to the job file) and every image is loaded once."""
    name = None
    if isinstance(entry, dict):
        check_keys(entry, STYLE_KEYS, where, fail)
        name = typed(entry, "name", str, None, fail, where)
        entry = entry.get("style")
    if not isinstance(entry, str) or not entry.strip():
        raise fail(where, f"must be an image path, a blend or a schedule, got {entry!r}")
    text = entry.strip()
    files: list[str] = []

    def image(path_text: str) -> str:
        path_text = path_text.strip()
        full = os.path.normpath(os.path.join(base, os.path.expanduser(path_text)))
        if not os.path.isfile(full):
            raise fail(where, f"file not found: {path_text}")
        try:
            StyleImage.from_path(full)
        except UserError as error:
            raise fail(where, str(error)) from None
        files.append(full)
        return full

    def grammar(parse, spec: str) -> None:
        try:
            parse(spec)
        except UserError as error:
            raise fail(where, str(error)) from None

    def blend(spec: str) -> str:
        if os.path.isfile(os.path.join(base, spec.strip())) or not ("+" in spec or "*" in spec):
            return image(spec)
        parts = []
        for part in spec.split("+"):
            path_text, star, weight = part.rpartition("*") if "*" in part else (part, "", "")
            if star:
                try:
                    float(weight)
                except ValueError:
                    problem = f"blend weight {weight.strip()!r} of {path_text.strip()} is not a number"
                    raise fail(where, problem) from None
            parts.append(image(path_text) + (f"*{weight.strip()}" if star else ""))
        return "+".join(parts)

    if os.path.isfile(os.path.join(base, text)):
        spec = image(text)
    elif _KEYFRAME.match(text.split(",")[0]):
        keyframes = []
        for part in text.split(","):
            match = _KEYFRAME.match(part)
            if not match or not match.group(2).strip():
                raise fail(where, f"{part.strip()!r} is not FRAME:STYLE (e.g. 0:starry.jpg or 5s:wave.png)")
            keyframes.append(f"{match.group(1)}:{blend(match.group(2))}")
        spec = ",".join(keyframes)
        if not any(match.group(1).endswith("s") for match in map(_KEYFRAME.match, keyframes)):
            grammar(parse_schedule, spec)  # keyframe order (with seconds it needs the clip's fps: checked later)
    else:
        spec = blend(text)
        if len(files) > 1 or "*" in spec:
            grammar(parse_blend, spec)  # weights >= 0, not all 0
    default_name = "+".join(dict.fromkeys(Path(f).stem for f in files))
    return Style(spec, safe_name(name or default_name), tuple(dict.fromkeys(files)))


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "style"


def render_output(template: str, clip: str, style: Style, number: int, output_dir: str, where: str, fail) -> str:
    clip_name = safe_name(Path(clip.rstrip(os.sep)).stem)
    try:
        rendered = template.format(clip=clip_name, style=style.name, n=number + 1)
    except KeyError as error:
        fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        raise fail(where, f"unknown field {{{error.args[0]}}} in {template!r} (fields: {fields})") from None
    except (IndexError, ValueError) as error:
        raise fail(where, f"bad template {template!r} ({error})") from None
    relative = os.path.normpath(rendered)
    if os.path.isabs(rendered) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise fail(where, f"{rendered} escapes the job's output folder {output_dir}")
    output = os.path.join(output_dir, relative)
    real_dir = os.path.realpath(output_dir)
    if not os.path.realpath(output).startswith(real_dir + os.sep):
        raise fail(where, f"{rendered} escapes the job's output folder {output_dir} (through a link)")
    if os.path.splitext(output)[1].lower() not in VIDEO_EXTENSIONS:
        raise fail(where, f"{rendered}: batch outputs are video files ({', '.join(VIDEO_EXTENSIONS)})")
    return output


def check_container(output: str, settings: Settings, where: str, fail) -> None:
    extension = os.path.splitext(output)[1].lower()
    codec = settings.video_codec
    if codec not in container_codecs(extension):
        fits = [e for e in CONTAINER_FORMATS if codec in container_codecs(e)]
        raise fail(f"{where}.settings.codec", f"{codec} cannot be stored in {extension}; use {' or '.join(fits)}")


_CONTAINER_CODECS: dict[str, set[str]] = {}


def container_codecs(extension: str) -> set[str]:
    """The codecs FFmpeg's muxer for `extension` accepts (asked once per extension)."""
    if extension not in _CONTAINER_CODECS:
        with av.open(os.devnull, "w", format=CONTAINER_FORMATS[extension]) as container:
            _CONTAINER_CODECS[extension] = set(container.supported_codecs)
    return _CONTAINER_CODECS[extension]


def file_fingerprint(path: str) -> list:
    """[path, size, mtime_ns] of a file, or of every file in a folder (an image sequence, a weights folder)."""
    if os.path.isdir(path):
        return [path] + [file_fingerprint(os.path.join(path, n)) for n in sorted(os.listdir(path))
                         if os.path.isfile(os.path.join(path, n))]
    stat = os.stat(path)
    return [path, stat.st_size, stat.st_mtime_ns]


def weights_fingerprint(weights: str | None) -> list:
    return file_fingerprint(weights or str(BUNDLED_DIR))


def describe_change(old, new, where: str = "") -> str | None:
    """The first difference between two normalised jobs, in words (None when equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{where}.{key} was {'added' if key in new else 'removed'}".lstrip(".")
            found = describe_change(old[key], new[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and where.endswith(("_file", "_files", "weights")):
        if old == new:
            return None
        what = old[0] if old and isinstance(old[0], str) else where.lstrip(".")
        return f"{what} was modified since"
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{where.lstrip('.')}: {len(old)} entries before, {len(new)} now"
        for i, (a, b) in enumerate(zip(old, new)):
            found = describe_change(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{where.lstrip('.')}: {old!r} before, {new!r} now"


# ----------------------------------------------------------------------------------------------------------
# Planning: shots, then chunks


@dataclass(frozen=True)
class ClipPlan:
    frames: int
    cuts: tuple[int, ...]   # frames that start a new shot (frame 0 is not listed)


def scan_clip(path: str, shot_threshold: float = DEFAULT_THRESHOLD) -> ClipPlan:
    """Count the clip's frames and find its shot cuts (one decode pass, one frame in memory at a time)."""
    source = open_source(path, backend=DECODER)
    cuts = ShotDetector(shot_threshold).find_cuts(frame.image for frame in source.frames())
    return ClipPlan(source.info.num_frames, tuple(cuts))


@dataclass(frozen=True)
class ChunkSpan:
    """Frames [start, end) are kept; the `lead_in` frames before start warm the stylizer up and are dropped."""

    index: int
    start: int
    end: int
    lead_in: int

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def first(self) -> int:
        return self.start - self.lead_in


def plan_chunks(plan: ClipPlan, chunk_frames: int, lead_in: int) -> tuple[ChunkSpan, ...]:
    """Split a clip at shot cuts into chunks of at most `chunk_frames` kept frames.

    Shots longer than `chunk_frames` are cut into near-equal pieces, then consecutive pieces share a chunk while
    they fit (no tiny chunks for short shots). So every chunk ends at a shot cut or, inside a long shot, at an
    even split point.

    >>> [(c.start, c.end, c.lead_in) for c in plan_chunks(ClipPlan(100, (30, 40)), 25, 8)]  # shots 0-30-40-100
    [(0, 15, 0), (15, 40, 8), (40, 60, 8), (60, 80, 8), (80, 100, 8)]
    """
    if chunk_frames < 1 or lead_in < 0:
        raise ValueError(f"chunk_frames must be >= 1 and lead_in >= 0, got {chunk_frames} and {lead_in}")
    bounds = [0, *sorted(c for c in set(plan.cuts) if 0 < c < plan.frames), plan.frames]
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        count = -(-(end - start) // chunk_frames)
        edges = [start + round(k * (end - start) / count) for k in range(count + 1)]
        pieces.extend(zip(edges, edges[1:]))
    spans: list[tuple[int, int]] = []
    for start, end in pieces:
        if spans and end - spans[-1][0] <= chunk_frames:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return tuple(ChunkSpan(i, start, end, min(lead_in, start)) for i, (start, end) in enumerate(spans))


# ----------------------------------------------------------------------------------------------------------
# Chunks: the task, the worker, the files


def chunk_format(codec: str) -> tuple[str, bool]:
    """(extension of the chunk files, whether their timestamps start at 0) for a codec; see the module docstring."""
    if codec == "ffv1":
        return ".mkv", False
    return ".mov", True


@dataclass(frozen=True)
class ChunkTask:
    item: int
    clip: str
    style: str               # a parse_style spec
    settings: Settings
    span: ChunkSpan
    path: str                # the chunk file to write
    attempt: int = 1


@dataclass(frozen=True)
class ChunkDone:
    item: int
    index: int
    path: str
    frames: int
    bytes: int
    seconds: float
    attempt: int
    worker: str              # host:pid that rendered it
    node: str = ""           # the Ray node, filled in by farm_ray


@dataclass(frozen=True)
class FaultPlan:
    """Test hook (MAMBAST_FARM_FAULT), read by the driver and handed to every worker. ';'-separated:

    * `exit:ITEM:CHUNK`: the worker process exits (os._exit) halfway through that chunk, on its first attempt only;
    * `slow:SECONDS`: sleep that long after each kept frame (gives tests time to kill things mid-job).
    """

    exit_at: tuple[int, int] | None = None
    slow: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        plan = cls()
        for part in filter(None, (p.strip() for p in (text or "").split(";"))):
            kind, _, rest = part.partition(":")
            try:
                if kind == "exit":
                    item, chunk = rest.split(":")
                    plan = dataclasses.replace(plan, exit_at=(int(item), int(chunk)))
                elif kind == "slow":
                    plan = dataclasses.replace(plan, slow=float(rest))
                else:
                    raise ValueError
            except ValueError:
                raise UserError(f"{FAULT_ENV}: {part!r} is not exit:ITEM:CHUNK or slow:SECONDS") from None
        return plan

    @classmethod
    def from_env(cls) -> FaultPlan:
        return cls.parse(os.environ.get(FAULT_ENV))


def pin_threads(threads: int) -> None:
    """The same thread count on every worker: CPU float reductions then add up in the same order everywhere."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already set once in this process; it does not change results
    cv2.setNumThreads(threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


class ChunkWorker:
    """One model, rendering chunks of any item: decode → stylize (lead-in dropped) → encode one chunk file.

    Keeps small caches across chunks: the last sources opened (a probe demuxes the whole clip), parsed styles,
    and the style codes per seed.
    """

    SOURCES_KEPT = 2
    STYLES_KEPT = 8

    def __init__(self, weights: str | None, device: str = "cpu", threads: int = 1, fault: FaultPlan | None = None):
        pin_threads(threads)
        self.model = load_model(weights, device=resolve_device(device))
        self.fault = fault or FaultPlan()
        self._sources: OrderedDict[str, FrameSource] = OrderedDict()
        self._styles: OrderedDict[tuple[str, Fraction], object] = OrderedDict()
        self._codes: dict[int, StyleCodes] = {}

    def render(self, task: ChunkTask) -> ChunkDone:
        started = time.perf_counter()
        source = self._source(task.clip)
        info, span, settings = source.info, task.span, task.settings
        config = settings.stylizer_config()
        if span.lead_in < min(config.lead_in, span.start):
            raise ValueError(f"chunk {span.index}: lead-in {span.lead_in} is shorter than the stylizer's "
                             f"{config.lead_in}")
        stylizer = ClipStylizer(self.model, self._style(task.style, info.fps), (info.height, info.width), config,
                                codes=self._codes_for(config.seed), start_frame=span.first)
        timing, shift = chunk_timing(info, span, relative=chunk_format(settings.video_codec)[1])
        sink = FrameSink(task.path, like=timing, codec=settings.video_codec, crf=settings.crf,
                         pix_fmt=settings.pix_fmt, overwrite=True,
                         codec_options={"threads": str(settings.encoder_threads)})
        try:
            batch: list[Frame] = []
            for frame in source.frames(span.first, span.end):
                batch.append(frame)
                if len(batch) == config.batch_size or frame.index == span.end - 1:
                    images = stylizer([f.image for f in batch], [f.index for f in batch])
                    for f, image in zip(batch, images):
                        if f.index >= span.start:
                            sink.write(Frame(f.index, f.pts - shift, image, f.alpha))
                            self._fault_hook(task, sink.frames_written)
                    batch = []
            sink.close()
        except BaseException:
            sink.abort()
            raise
        frames = count_video_packets(task.path)
        if frames != span.frames:
            raise RuntimeError(f"{task.path}: holds {frames} frames, the chunk has {span.frames}")
        return ChunkDone(task.item, span.index, task.path, frames, os.path.getsize(task.path),
                         time.perf_counter() - started, task.attempt, f"{socket.gethostname()}:{os.getpid()}")

    def _fault_hook(self, task: ChunkTask, written: int) -> None:
        if self.fault.slow:
            time.sleep(self.fault.slow)
        if (self.fault.exit_at == (task.item, task.span.index) and task.attempt == 1
                and written == max(1, task.span.frames // 2)):
            os._exit(70)  # a crash mid-chunk: the partial chunk file stays behind under its temporary name

    def _source(self, path: str) -> FrameSource:
        return _least_recently_used(self._sources, path, lambda: open_source(path, backend=DECODER),
                                    self.SOURCES_KEPT)

    def _style(self, spec: str, fps: Fraction):
        return _least_recently_used(self._styles, (spec, fps), lambda: parse_style(spec, fps=fps), self.STYLES_KEPT)

    def _codes_for(self, seed: int) -> StyleCodes:
        if seed not in self._codes:
            self._codes[seed] = StyleCodes(self.model, seed=seed)
        return self._codes[seed]


def _least_recently_used(cache: OrderedDict, key, make, kept: int):
    """`cache[key]`, made with `make()` when missing; keeps the `kept` most recently used entries."""
    if key not in cache:
        cache[key] = make()
        while len(cache) > kept:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def chunk_timing(info: VideoInfo, span: ChunkSpan, relative: bool) -> tuple[VideoInfo, int]:
    """The VideoInfo a chunk's sink copies (its frames' timestamps and durations), and the shift applied to pts."""
    shift = info.pts[span.start] if relative else 0
    pts = [p - shift for p in info.pts[span.start:span.end]]
    end_pts = info.frame_end_pts(span.end - 1) - shift
    return dataclasses.replace(info, pts=pts, end_pts=end_pts, num_frames=span.frames,
                               duration_s=float((end_pts - pts[0]) * info.time_base)), shift


def count_video_packets(path: str) -> int:
    """Frames in a file's video stream, counted packet by packet (no decoding)."""
    with av.open(path) as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)


# ----------------------------------------------------------------------------------------------------------
# Joining


def join_chunks(chunks: list[tuple[str, int]], output: str, clip: str, codec: str, audio: bool,
                expected_frames: int, metadata: dict | None = None) -> int:
    """Copy the chunks' packets, in order, into `output`, with the clip's audio remuxed once; returns the frames.

    `chunks` holds (chunk file, clip index of its first kept frame). Written under a hidden name beside `output`
    and renamed onto it only when complete.
    """
    info = open_source(clip, backend=DECODER).info
    relative = chunk_format(codec)[1]
    extension = os.path.splitext(output)[1].lower()
    folder, name = os.path.split(output)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.join{extension}")
    passthrough = AudioPassthrough(clip) if audio and info.has_audio else None
    container = av.open(temp, "w", options={"avoid_negative_ts": "disabled"})
    try:
        with av.open(chunks[0][0]) as first:
            template = first.streams.video[0]
            stream = container.add_stream_from_template(template)
            extradata = template.codec_context.extradata
        stream.codec_context.framerate = info.fps
        if codec == "hevc" and extension in (".mp4", ".m4v", ".mov"):
            stream.codec_tag = "hvc1"  # as the sink tags it: Apple players refuse hev1
        if info.rotation:
            stream.set_display_rotation(info.rotation)
        if metadata:
            container.metadata["comment"] = json.dumps(metadata, sort_keys=True, default=str)
        if passthrough:
            passthrough.add_streams_to(container, mp4=extension in (".mp4", ".m4v"))
        written = 0
        for path, start in chunks:
            shift = info.pts[start] if relative else 0
            written += _copy_chunk(path, shift, info.time_base, extradata, stream, container, passthrough)
        if written != expected_frames:
            raise RuntimeError(f"{output}: joined {written} frames, expected {expected_frames}")
        if passthrough:
            passthrough.finish(None)
        container.close()
        os.replace(temp, output)
    except BaseException:
        if passthrough:
            passthrough.close()
        try:
            container.close()
        except av.FFmpegError:
            pass
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return written


def _copy_chunk(path: str, shift: int, clip_time_base: Fraction, extradata, stream, container, passthrough) -> int:
    count = 0
    with av.open(path) as chunk:
        source = chunk.streams.video[0]
        if source.codec_context.extradata != extradata:
            raise RuntimeError(f"{path}: encoded with other codec parameters than the first chunk "
                               f"(different FFmpeg/x264 builds on the workers?)")
        ticks = shift * clip_time_base / source.time_base
        if ticks.denominator != 1:
            raise RuntimeError(f"{path}: time base {source.time_base} cannot express the shift {shift} exactly")
        for packet in chunk.demux(source):
            if not packet.size:
                continue
            if count == 0 and not packet.is_keyframe:
                raise RuntimeError(f"{path}: does not start with a keyframe; it cannot be joined by stream copy")
            packet.pts += int(ticks)
            if packet.dts is not None:
                packet.dts += int(ticks)
            if passthrough:
                passthrough.copy_until((packet.dts if packet.dts is not None else packet.pts) * source.time_base)
            packet.stream = stream
            container.mux(packet)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------------------
# Manifests: what is done, recorded atomically


def write_json_atomic(path: str, data: dict) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it over `path`."""
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as file:
        json.dump(data, file, indent=1, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable manifest ({error}); delete the job's work folder to start over") from None


class ItemManifest:
    """One item's progress: its chunk plan and the chunks written, in `<work>/items/NNNN/manifest.json`."""

    def __init__(self, folder: str, item: Item, job_hash: str):
        self.folder = folder
        self.path = os.path.join(folder, "manifest.json")
        self.item = item
        data = read_json(self.path)
        if data is None or data.get("job_hash") != job_hash:
            data = {"version": MANIFEST_VERSION, "job_hash": job_hash, "item": item.number, "entry": item.entry,
                    "output": item.output, "status": "pending", "plan": None, "chunks": {}}
        if data["status"] == "done" and not os.path.isfile(item.output):
            data.update(status="pending", chunks={})  # the output went missing since: render it again
        self.data = data

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def spans(self) -> tuple[ChunkSpan, ...] | None:
        plan = self.data["plan"]
        return None if plan is None else tuple(ChunkSpan(*span) for span in plan["chunks"])

    @property
    def frames(self) -> int:
        return self.data["plan"]["frames"] if self.data["plan"] else 0

    def chunk_path(self, index: int) -> str:
        return os.path.join(self.folder, f"chunk_{index:05d}{chunk_format(self.item.settings.video_codec)[0]}")

    def set_plan(self, plan: ClipPlan, spans: tuple[ChunkSpan, ...]) -> None:
        self.data["plan"] = {"frames": plan.frames, "cuts": list(plan.cuts),
                             "chunks": [dataclasses.astuple(span) for span in spans]}
        self.save()

    def record_chunk(self, done: ChunkDone) -> None:
        self.data["chunks"][str(done.index)] = {
            "file": os.path.basename(done.path), "frames": done.frames, "bytes": done.bytes,
            "seconds": round(done.seconds, 3), "attempt": done.attempt, "worker": done.worker, "node": done.node}
        self.save()

    def verified_chunks(self) -> set[int]:
        """Chunks recorded as written whose file is still there, of the recorded size and frame count."""
        good = set()
        for index, record in list(self.data["chunks"].items()):
            path = os.path.join(self.folder, record["file"])
            try:
                ok = os.path.getsize(path) == record["bytes"] and count_video_packets(path) == record["frames"]
            except (OSError, av.FFmpegError):
                ok = False
            if ok:
                good.add(int(index))
            else:
                del self.data["chunks"][index]
        return good

    def mark_done(self, frames: int, seconds: float) -> None:
        self.data.update(status="done", frames_written=frames, join_seconds=round(seconds, 3), error=None)
        self.save()
        self.remove_chunks()

    def mark_failed(self, error: str) -> None:
        self.data.update(status="failed", error=error)
        self.save()

    def remove_chunks(self) -> None:
        """Chunk files (and temporaries of crashed attempts) go once the output is joined; the manifest stays."""
        for name in os.listdir(self.folder):
            if name != "manifest.json":
                path = os.path.join(self.folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class WorkFolder:
    """The job's work folder, `<output_dir>/.mambast-batch/<job file name>/`: job.json and one folder per item."""

    def __init__(self, job: Job):
        self.job = job
        self.root = job.work_dir
        self.job_file = os.path.join(self.root, "job.json")
        self.normalised = job.normalised()
        self.hash = job.hash(self.normalised)

    def check(self, resume: bool) -> None:
        """Refuse a stale work folder (without --resume), a changed job (with it) and outputs that exist and are
        not this job's finished work. Writes nothing."""
        job = self.job
        recorded = read_json(self.job_file)
        if recorded is not None and not resume:
            raise UserError(f"{job.name}: a previous run left {self.root}; pass --resume to continue it, "
                            f"or delete that folder to start over")
        if recorded is not None and recorded.get("hash") != self.hash:
            change = describe_change(recorded.get("normalised"), self.normalised) or "its settings differ"
            raise UserError(f"{job.name}: changed since the run being resumed ({change}); undo the change, "
                            f"or delete {self.root} to start over")
        if job.overwrite:
            return
        for item in job.items:
            if os.path.lexists(item.output) and self.manifest(item).status != "done":
                raise UserError(f"{job.name}: {item.entry}: {os.path.relpath(item.output, job.output_dir)} "
                                f"already exists; remove it or set overwrite: true")

    def create(self) -> None:
        """Make the item and output folders and record the job (once, on the first run)."""
        for item in self.job.items:
            os.makedirs(self.item_folder(item), exist_ok=True)
            os.makedirs(os.path.dirname(item.output), exist_ok=True)
        if not os.path.exists(self.job_file):
            write_json_atomic(self.job_file, {"version": MANIFEST_VERSION, "job_file": self.job.path,
                                              "hash": self.hash, "normalised": self.normalised})

    def item_folder(self, item: Item) -> str:
        return os.path.join(self.root, "items", f"{item.number:04d}")

    def manifest(self, item: Item) -> ItemManifest:
        """The item's manifest, read from disk now (items are opened one at a time: memory stays flat)."""
        return ItemManifest(self.item_folder(item), item, self.hash)

    def open(self, resume: bool) -> list[ItemManifest]:
        """`check`, `create`, and every item's manifest (for tools and tests; the farm reads them lazily)."""
        self.check(resume)
        self.create()
        return [self.manifest(item) for item in self.job.items]


# ----------------------------------------------------------------------------------------------------------
# Reporting


@dataclass
class ItemReport:
    item: Item
    status: str = "pending"     # done | failed | skipped (done by an earlier run)
    frames: int = 0
    chunks: int = 0
    resumed_chunks: int = 0     # chunks an earlier run had written
    retries: int = 0            # chunk attempts beyond the first
    started: float | None = None
    seconds: float = 0.0
    error: str = ""
    nodes: set = field(default_factory=set)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def summary_table(reports: list[ItemReport], output_dir: str) -> str:
    """A plain-text table of every item: output, frames, chunks, retries, time, fps, status."""
    header = ("#", "output", "frames", "chunks", "retries", "time", "fps", "status")
    rows = []
    for r in reports:
        chunks = f"{r.chunks}" + (f" ({r.resumed_chunks} resumed)" if r.resumed_chunks else "")
        status = r.status if r.status != "failed" else f"FAILED: {r.error}"
        timing = (f"{r.seconds:.1f}s", f"{r.fps:.2f}") if r.status == "done" else ("-", "-")
        rows.append((str(r.item.number + 1), os.path.relpath(r.item.output, output_dir), str(r.frames), chunks,
                     str(r.retries), *timing, status))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *rows]]
    done = sum(r.status in ("done", "skipped") for r in reports)
    failed = sum(r.status == "failed" for r in reports)
    total_frames = sum(r.frames for r in reports if r.status == "done")
    lines.append(f"{done} of {len(reports)} items done, {failed} failed; {total_frames} frames rendered")
    return "\n".join(lines)
