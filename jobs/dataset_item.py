"""`Item`: one image of a `mambast data build` set before it is written (jobs/data.py, jobs/style_corpus.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image


@dataclass
class Item:
    """One image of the set, before it is written."""

    name: str  # file stem, unique within its kind
    kind: str  # "content" or "style"
    group: str  # splits are drawn per group: a photo source, one clip, or a style source ("gcompris", "krita")
    load: Callable[[], Image.Image]
    info: dict = field(default_factory=dict)  # source, licence and, where known, title/credit/url
    family: str = ""  # styles of one family (near-identical images) land on one side of the split; "": alone
    split: str = "train"
