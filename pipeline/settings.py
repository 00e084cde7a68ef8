"""One settings type for every render: `mambast stylize`, the presets in configs/presets, and batch job files.

    Settings() (the built-in defaults)
      │ read_preset: configs/presets/NAME.yaml, or a YAML file        keys and types checked (`check_values`)
      │ the job file's `settings:` / an item's `settings:` / flags    the same checks
      ▼ Settings(**values)                                            ranges checked (`Settings.check`)
    settings.stylizer_config() ─► ClipStylizer                        the encoding fields go to the FrameSink

A value that is wrong anywhere is one UserError naming where it came from: `jobs.yaml: settings.crf: must be an
integer from 0 to 51, got 80`. Presets may also hold the stylize command's run options (RUN_KEYS), which a batch
job ignores (the farm always runs on Ray, on the job's device).
"""
from __future__ import annotations

import dataclasses
import difflib
import reprlib
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import read_yaml
from models.errors import UserError
from pipeline.shots import DEFAULT_THRESHOLD
from pipeline.sink import ENCODERS, SEQUENCE_FORMATS
from pipeline.stylizer import POST_PLACES, StylizerConfig
from pipeline.temporal import DIS_PRESETS, TemporalConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
RUN_KEYS = {"runner": "auto", "device": "auto"}  # how `mambast stylize` runs; a preset may set them too


@dataclass(frozen=True)
class Settings:
    """How a clip is stylized and encoded. 0 for `chunk_frames` / `encoder_threads`: the runner's choice."""

    working_size: int = 512         # short side the model runs at (0 = the source size)
    style_strength: float = 1.0     # 0 = the content, 1 = full style (models/style_controls.py)
    temporal_strength: float = TemporalConfig.strength  # temporal smoothing, 0 = off
    flow_preset: str = TemporalConfig.flow_preset  # DIS flow for the smoothing
    preserve_color: bool = False    # keep the source's colours, take the style's texture
    seed: int = 0                   # style token permutation: same seed, same frames
    batch_size: int = 4             # frames per model call
    codec: str | None = None        # None: from the output (h264 for video files, png for folders)
    crf: int = 18                   # h264/hevc quality, lower is better
    pix_fmt: str | None = None      # None: the sink picks one that fits the size, alpha and bit depth
    audio: bool = True              # keep the source's audio
    chunk_frames: int = 0           # most kept frames per chunk (0: one piece locally, 64 on Ray, 240 in a batch)
    shot_threshold: float = DEFAULT_THRESHOLD  # a new shot resets the smoothing (and ends a batch chunk)
    encoder_threads: int = 0        # 0: one per core, at most 16 (a batch fixes 2: every worker writes the same bits)
    strict: bool = False            # refuse a damaged input instead of stylizing its decodable frames
    pipelined: bool = True          # the stylizer's stages on threads of their own, overlapped (false: one by one)
    post: str = "auto"              # post-processing on the model's "device" or the "host" (auto: device on CUDA)
    tune_steps: int = 0             # tune the model to the style on the clip's frames first (pipeline/style_tuning.py)

    OPTIONAL = ("codec", "pix_fmt")  # may be None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every value in its range; the first that is not raises a UserError naming it."""
        def whole(value, low):
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        def number(value, low, high):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high

        codecs = (*ENCODERS, *SEQUENCE_FORMATS)
        rules = [
            ("working_size", whole(self.working_size, 0), "must be an integer >= 0 (0 = the source size)"),
            ("style_strength", number(self.style_strength, 0, 1), "must be between 0 and 1"),
            ("temporal_strength", number(self.temporal_strength, 0, 1), "must be between 0 and 1 (0 = off)"),
            ("flow_preset", self.flow_preset in DIS_PRESETS, f"must be one of {', '.join(DIS_PRESETS)}"),
            ("preserve_color", isinstance(self.preserve_color, bool), "must be true or false"),
            ("seed", whole(self.seed, -2**63), "must be an integer"),
            ("batch_size", whole(self.batch_size, 1), "must be an integer >= 1"),
            ("codec", self.codec is None or self.codec in codecs, f"must be one of {', '.join(codecs)}"),
            ("crf", whole(self.crf, 0) and self.crf <= 51, "must be an integer from 0 (best) to 51"),
            ("audio", isinstance(self.audio, bool), "must be true or false"),
            ("chunk_frames", whole(self.chunk_frames, 0), "must be an integer >= 0 (0 = the runner's choice)"),
            ("shot_threshold", number(self.shot_threshold, 1e-9, float("inf")), "must be > 0"),
            ("encoder_threads", whole(self.encoder_threads, 0), "must be an integer >= 0 (0 = one per core)"),
            ("strict", isinstance(self.strict, bool), "must be true or false"),
            ("pipelined", isinstance(self.pipelined, bool), "must be true or false"),
            ("post", self.post in POST_PLACES, f"must be one of {', '.join(POST_PLACES)}"),
            ("tune_steps", whole(self.tune_steps, 0), "must be an integer >= 0 (0 = no tuning)"),
        ]
        for key, ok, problem in rules:
            if not ok:
                raise UserError(f"{key}: {problem}, got {short_repr(getattr(self, key))}")

    @property
    def video_codec(self) -> str:
        return self.codec or "h264"

    def stylizer_config(self) -> StylizerConfig:
        temporal = TemporalConfig(strength=float(self.temporal_strength), flow_preset=self.flow_preset,
                                  shot_threshold=self.shot_threshold)
        return StylizerConfig(working_size=self.working_size, batch_size=self.batch_size, seed=self.seed,
                              temporal=temporal, temporal_enabled=self.temporal_strength > 0,
                              strength=float(self.style_strength), preserve_color=bool(self.preserve_color),
                              pad_batches=True,  # chunked clips are bit-identical to one-piece ones
                              pipelined=self.pipelined, post=self.post)


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(Settings))
KINDS = {name: str if name in Settings.OPTIONAL else type(getattr(Settings, name)) for name in SETTING_NAMES}
KINDS |= {key: str for key in RUN_KEYS}
KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "a mapping"}


def settings_from(values: dict, where: str, base: Settings | None = None) -> Settings:
    """`base` (default: the built-in defaults) with `values` from a YAML mapping or flags, every one checked;
    errors are prefixed with `where` (e.g. "jobs.yaml: items[2].settings")."""
    checked = check_values(values, where)
    try:
        return dataclasses.replace(base or Settings(), **checked)
    except UserError as error:
        raise UserError(f"{where}.{error}") from None


def check_values(values: dict, where: str, run_keys: bool = False) -> dict:
    """Known keys with the right types (a setting's type is its default's; an int is a number; codec and pix_fmt
    may be null). RUN_KEYS are known only with `run_keys`."""
    if problem := unknown_key(values, SETTING_NAMES + (tuple(RUN_KEYS) if run_keys else ()), "setting"):
        raise UserError(f"{where}: {problem}")
    checked = {}
    for key, value in values.items():
        if value is None and key in Settings.OPTIONAL:
            checked[key] = None
            continue
        checked[key] = typed(value, KINDS[key], f"{where}.{key}")
    return checked


def unknown_key(mapping: dict, known: tuple[str, ...], what: str = "key") -> str | None:
    """None when every key of `mapping` is one of `known`, else the problem in words (with the closest key)."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            return f"unknown {what} {short_repr(key)}{hint}"
    return None


def typed(value, kind: type, where: str):
    """`value` checked to be a `kind` (bool is not an int; an int is a float, returned as one)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: must be {KIND_NAMES[kind]}, got {short_repr(value)}")
    return value


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(value) -> str:
    """repr() of a user's value, cut to a few dozen characters: a message never grows with what the file holds."""
    return _SHORT.repr(value)


def read_preset(name_or_path: str, base: str | Path = ".") -> dict:
    """A preset's checked values, settings and RUN_KEYS: a YAML path (relative to `base`), else
    configs/presets/NAME.yaml."""
    path = Path(base) / name_or_path
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"no such preset or file: {name_or_path} (presets: {', '.join(preset_names())})")
    return check_values(read_yaml(path), str(path), run_keys=True)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
