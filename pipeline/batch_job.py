"""Batch job files: clips × styles (or listed items), each render with its checked Settings and output path.

    jobs.yaml ──load_job──► Job: items (clip × style → output), each with Settings (pipeline/settings.py):
                            the defaults ← `preset:` ← `settings:` ← the item's own `settings:`

Bad job files fail up front with one line naming the entry: `jobs.yaml: items[2].style: file not found: x.png`.
Paths are relative to the job file; every output stays inside `output_dir`. `Job.normalised()` is everything that
decides the output bits (recorded in the work folder, compared on --resume: pipeline/batch_manifest.py).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import av

from models.checkpoint import BUNDLED_DIR
from models.errors import UserError
from pipeline.settings import RUN_KEYS, Settings, read_preset, read_yaml, settings_from, short_repr, typed, unknown_key
from pipeline.sink import ENCODERS, VIDEO_EXTENSIONS
from pipeline.styles import StyleImage, parse_blend, parse_schedule

WORK_FOLDER = ".mambast-batch"           # inside the job's output folder
MANIFEST_VERSION = 1
DEFAULT_OUTPUT = "{clip}_{style}.mp4"
TEMPLATE_FIELDS = ("clip", "style", "n")
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "ipod", ".mov": "mov", ".mkv": "matroska"}
BATCH_CHUNK_FRAMES = 240                 # the farm's choice for chunk_frames 0
BATCH_ENCODER_THREADS = 2                # the farm's choice for encoder_threads 0: every worker, the same bitstream

JOB_KEYS = ("output_dir", "output", "weights", "device", "threads", "overwrite", "preset", "settings", "clips",
            "styles", "items")
ITEM_KEYS = ("clip", "style", "output", "settings")
STYLE_KEYS = ("style", "name")


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

    if problem := unknown_key(raw, JOB_KEYS):
        raise fail("", problem)
    output_dir = os.path.normpath(os.path.join(base, typed_field(raw, "output_dir", str, ".", fail)))
    template = typed_field(raw, "output", str, DEFAULT_OUTPUT, fail)
    weights = typed_field(raw, "weights", str, None, fail)
    if weights is not None:
        weights = os.path.normpath(os.path.join(base, weights))
        if not os.path.exists(weights):
            raise fail("weights", f"file not found: {raw['weights']}")
    device = typed_field(raw, "device", str, "auto", fail)
    threads = typed_field(raw, "threads", int, 1, fail)
    if threads < 1:
        raise fail("threads", f"must be >= 1, got {threads}")
    overwrite = typed_field(raw, "overwrite", bool, False, fail)

    preset = Settings()
    if raw.get("preset") is not None:
        preset_name = typed_field(raw, "preset", str, None, fail)
        try:
            values = read_preset(preset_name, base)
        except UserError as error:
            raise fail("preset", str(error)) from None
        # a preset's run options and tuning are the stylize command's (the default preset tunes)
        preset = settings_from({k: v for k, v in values.items() if k not in (*RUN_KEYS, "tune_steps")},
                               f"{name}: preset")
    job_settings = settings_from(typed_field(raw, "settings", dict, {}, fail), f"{name}: settings", base=preset)

    pairs = []  # (entry, clip path, Style, output template, Settings)
    clips = []
    for i, entry in enumerate(typed_field(raw, "clips", list, [], fail)):
        found = expand_clips(entry, base, f"clips[{i}]", fail)
        clips += [(f"clips[{i}]" + (f"({os.path.basename(p)})" if len(found) > 1 else ""), p) for p in found]
    checked: dict = {}  # every style image is decoded once, however many items name it
    styles = [(f"styles[{i}]", read_style(entry, base, f"styles[{i}]", fail, checked))
              for i, entry in enumerate(typed_field(raw, "styles", list, [], fail))]
    if bool(clips) != bool(styles) and ("clips" in raw or "styles" in raw):
        missing = "styles" if clips else "clips"
        raise fail(missing, f"clips and styles go together (every clip in every style); give {missing} too, "
                            f"or list renders under items")
    for clip_entry, clip in clips:
        for style_entry, style in styles:
            pairs.append((f"{clip_entry}×{style_entry}", clip, style, template, job_settings))
    for i, entry in enumerate(typed_field(raw, "items", list, [], fail)):
        where = f"items[{i}]"
        if not isinstance(entry, dict):
            raise fail(where, f"must be a mapping with clip and style, got {type(entry).__name__}")
        if problem := unknown_key(entry, ITEM_KEYS):
            raise fail(where, problem)
        for key in ("clip", "style"):
            if entry.get(key) is None:
                raise fail(where, f"needs a {key}")
        clip_paths = expand_clips(typed_field(entry, "clip", str, None, fail, where), base, f"{where}.clip", fail)
        style = read_style(entry["style"], base, f"{where}.style", fail, checked)
        settings = settings_from(typed_field(entry, "settings", dict, {}, fail, where), f"{name}: {where}.settings",
                                 base=job_settings)
        item_template = typed_field(entry, "output", str, template, fail, where)
        for clip in clip_paths:
            entry_name = where + (f"({os.path.basename(clip)})" if len(clip_paths) > 1 else "")
            pairs.append((entry_name, clip, style, item_template, settings))
    if not pairs:
        raise fail("items", "the job renders nothing: give clips and styles, or items")

    items, owners = [], {}
    for number, (entry, clip, style, item_template, settings) in enumerate(pairs):
        if settings.tune_steps:
            raise fail(f"{entry}.settings.tune_steps", "a batch job does not tune; tune once per style with "
                                                      "`mambast tune` and give the result as the job's weights")
        output = render_output(item_template, clip, style, number, output_dir, f"{entry}.output", fail)
        if output in owners:
            raise fail(f"{entry}.output", f"{os.path.relpath(output, output_dir)} is also the output of "
                                          f"{owners[output]}; put {{clip}}/{{style}}/{{n}} in the name")
        if os.path.realpath(output) == os.path.realpath(clip):
            raise fail(f"{entry}.output", f"{os.path.relpath(output, output_dir)} would overwrite its input clip")
        check_container(output, settings, f"{entry}", fail)
        owners[output] = entry
        items.append(Item(number, entry, clip, style, output, batch_choices(settings)))
    return Job(path, output_dir, weights, device, threads, overwrite, tuple(items))


def typed_field(mapping: dict, key: str, kind: type, default, fail, where: str | None = None):
    """mapping[key] checked to be a `kind` (pipeline.settings.typed), or the default if absent or null."""
    value = mapping.get(key)
    if value is None:
        return default
    try:
        return typed(value, kind, f"{where}.{key}" if where else key)
    except UserError as error:
        raise fail("", str(error)) from None


def batch_choices(settings: Settings) -> Settings:
    """The farm's values for the settings left to the runner (0): chunk length and encoder threads."""
    return dataclasses.replace(settings, chunk_frames=settings.chunk_frames or BATCH_CHUNK_FRAMES,
                               encoder_threads=settings.encoder_threads or BATCH_ENCODER_THREADS)


def expand_clips(pattern, base: str, where: str, fail) -> list[str]:
    """A clip path, folder (image sequence) or glob, relative to the job file; globs expand in sorted order."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise fail(where, f"must be a path or a glob, got {short_repr(pattern)}")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(pattern)))
    if glob.has_magic(pattern) and not os.path.exists(full):  # a file that exists is that file: "take [1].mp4"
        found = sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
        if not found:
            raise fail(where, f"no files match {pattern}")
        return found
    if not os.path.exists(full):
        raise fail(where, f"file not found: {pattern}")
    return [full]


_KEYFRAME = re.compile(r"^\s*(\d+(?:\.\d+)?s?)\s*:(.*)$")


def read_style(entry, base: str, where: str, fail, checked: dict | None = None) -> Style:
    """A style entry: an image path, a blend "a.jpg*0.7+b.jpg*0.3", a schedule "0:a.jpg,5s:b.jpg", or a mapping
    {style: ..., name: ...}. Paths are made absolute (relative to the job file) and every image is decoded once
    per `checked` (path -> the problem with it, or None): a job's items share it."""
    checked = {} if checked is None else checked
    name = None
    if isinstance(entry, dict):
        if problem := unknown_key(entry, STYLE_KEYS):
            raise fail(where, problem)
        name = typed_field(entry, "name", str, None, fail, where)
        entry = entry.get("style")
    if not isinstance(entry, str) or not entry.strip():
        raise fail(where, f"must be an image path, a blend or a schedule, got {short_repr(entry)}")
    text = entry.strip()
    files: list[str] = []

    def image(path_text: str) -> str:
        path_text = path_text.strip()
        full = os.path.normpath(os.path.join(base, os.path.expanduser(path_text)))
        if not os.path.isfile(full):
            raise fail(where, f"file not found: {path_text}")
        if full not in checked:
            try:
                StyleImage.from_path(full)
                checked[full] = None
            except UserError as error:
                checked[full] = str(error)
        if checked[full] is not None:
            raise fail(where, checked[full])
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
    if codec not in ENCODERS:
        raise fail(f"{where}.settings.codec", f"batch outputs are video files: one of {', '.join(ENCODERS)}, "
                                              f"got {codec!r}")
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
