"""`mambast train RECIPE [--resume]`: train a Mamba-ST variant from folders of content and style images.

The recipe (configs/train/*.yaml) names the model variant, the data (a folder with content/{train,val} and
style/{train,val}, as `mambast data build` makes it; nested folders are fine), the perceptual network for the
losses and the loss weights. Losses are the paper's (docs/mamba-st.md §3; models/losses.py):

    L = w_c·L_c + w_s·L_s + w_id1·L_id1 + w_id2·L_id2  [+ w_t·L_t] [+ w_shift·L_shift]

With `teacher: magenta` a share of every batch comes from distillation pairs instead (jobs/teacher_pairs.py: a
content region, any image as its style, and the teacher's output, precomputed once into DATA/teacher/), and
those items add w_t·L_t, the distance to the teacher's output (models/losses.py). The paper's losses still apply
to every item. With `weight_shift` > 0 the first item's content is also stylized as two overlapping windows
(`shift_window` px, the second moved by 1-7 px: never a whole patch) whose outputs must agree where they overlap
(L_shift, models/losses.py): strokes that follow the picture and not the patch grid, so moving video does not
flicker.

A run folder holds `checkpoint.pt` (model, optimiser, step, RNG states; rewritten atomically), `recipe.yaml`
(the resolved recipe; `--resume` refuses a changed one), `samples/` (content | style | output grids of
held-out pairs), `losses.png`, `log.jsonl`, and at the end `final/` in our weights format.
`mambast export-weights RUN -o DIR` writes fp16 safetensors for shipping.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.checkpoint import check_state_dict, load_model, model_config, read_yaml, save_model, torch_load_safe
from models.errors import UserError
from jobs.teacher_pairs import build_pairs, load_pairs
from models.losses import (content_loss, distillation_loss, identity_losses, regional_distillation_loss,
                           shift_consistency_loss, weighted_style_loss)
from models.mambast import MambaST, init_weights, style_permutations
from models.perceptual import load_perceptual
from pipeline.images import contact_sheet, load_image, save_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class Recipe:
    model: str = "small"                 # configs/model/<name>.yaml or a path
    data: str = "data/train"             # content/{train,val}, style/{train,val}
    out: str = "runs/small"
    steps: int = 2000
    batch_size: int = 4
    crop: int = 128                      # training crop (the model is resolution-free: no positional tables)
    scale_range: tuple[float, float] = (1.0, 2.0)  # short side resized to crop × U(range) before cropping
    style_hue_jitter: float = 0.0        # share of style crops with hues turned at random (rotate_hues); off in
                                         # the shipped chain: measured, models/weights/MODEL_CARD.md
    style_balance: str = "image"         # 'image': every style image alike; 'group': every source group alike
                                         # (DATA/manifest.json's source_group), each image a share of its group's
    style_group_weights: dict[str, float] = field(default_factory=dict)  # with 'group': a group's share × this
    lr: float = 5e-4
    lr_min: float = 5e-5                 # cosine decay to this
    warmup: int = 100
    weight_content: float = 7.0
    weight_style: float = 10.0
    weight_identity_pixel: float = 70.0
    weight_identity_feature: float = 1.0
    style_tap_weights: list[float] = field(default_factory=list)  # per perceptual tap; empty = all 1
    perceptual: str = "mobilenet_v2"
    perceptual_weights: str | None = None  # only for 'vgg'
    perceptual_smooth: bool = False
    perceptual_temperature: float = 1.0
    second_style_net: str | None = None  # a second perceptual net that adds one more style loss (e.g. 'vgg19')
    weight_second_style: float = 0.0
    second_style_tap_weights: list[float] = field(default_factory=list)  # per tap of that net; empty = all 1
    teacher: str | None = None           # 'magenta' adds distillation (models/teacher.py); None = off
    teacher_pairs: int = 2000            # distillation pairs precomputed into DATA/teacher (jobs/teacher_pairs.py)
    teacher_photo_share: float = 0.15    # share of those pairs whose style is another content photo
    teacher_share: float = 0.5           # share of each batch drawn from the distillation pairs
    weight_teacher: float = 0.0          # w_t
    teacher_keep: float = 1.0            # share of the pairs trained on: those where the teacher carried the style
                                         # best (teacher_style_ratios); 1 = all
    teacher_loss: str = "aligned"        # 'aligned': the teacher's pixels and features; 'regional': its channel
                                         # statistics per cell of a grid (models/losses.py)
    teacher_regions: int = 4             # with 'regional': the grid is this many cells a side, on every tap
    weight_shift: float = 0.0            # w_shift: shift consistency (L_shift); 0 = off, no extra forward pass
    shift_window: int = 184              # side of the two windows it compares (px; fits in the crop)
    init: str = "mamba"                  # 'mamba' or 'official' (xavier everywhere, as the paper's code)
    init_from: str | None = None         # weights folder (e.g. an earlier run's final/) to start from instead
    grow_lr_scale: float = 10.0          # lr multiplier of the MSTD blocks that init_from's weights lack (a deeper
                                         # MSTD grown from a shallower one: those blocks start fresh)
    seed: int = 777
    threads: int = 0                     # torch CPU threads; 0 = torch's default
    sample_every: int = 100
    checkpoint_every: int = 50
    val_pairs: int = 4

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> "Recipe":
        raw = {**read_yaml(path), **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            recipe = cls(**raw)
        except TypeError as e:
            raise UserError(f"{path}: {e}") from None
        for name in ("style_hue_jitter", "teacher_photo_share", "teacher_share", "teacher_keep"):
            value = getattr(recipe, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UserError(f"{path}: {name} must be in [0, 1], got {value!r}")
        for name in ("steps", "batch_size", "crop", "teacher_pairs"):
            if not isinstance(getattr(recipe, name), int) or getattr(recipe, name) <= 0:
                raise UserError(f"{path}: {name} must be a positive integer, got {getattr(recipe, name)!r}")
        if isinstance(recipe.weight_shift, bool) or not isinstance(recipe.weight_shift, (int, float)) \
                or recipe.weight_shift < 0:
            raise UserError(f"{path}: weight_shift must be a number >= 0, got {recipe.weight_shift!r}")
        if recipe.weight_shift:
            largest = recipe.crop - (model_config(recipe.model).patch_size - 1)  # moved by up to patch - 1 px
            if not (isinstance(recipe.shift_window, int) and 0 < recipe.shift_window <= largest):
                raise UserError(f"{path}: shift_window must be a positive integer of at most crop - (patch - 1) = "
                                f"{largest} (the moved window must fit in the crop), got {recipe.shift_window!r}")
        if isinstance(recipe.grow_lr_scale, bool) or not isinstance(recipe.grow_lr_scale, (int, float)) \
                or recipe.grow_lr_scale <= 0:
            raise UserError(f"{path}: grow_lr_scale must be a number > 0, got {recipe.grow_lr_scale!r}")
        if recipe.teacher_loss not in ("aligned", "regional"):
            raise UserError(f"{path}: teacher_loss must be 'aligned' or 'regional', got {recipe.teacher_loss!r}")
        if isinstance(recipe.teacher_regions, bool) or not isinstance(recipe.teacher_regions, int) \
                or recipe.teacher_regions <= 0:
            raise UserError(f"{path}: teacher_regions must be a positive integer, got {recipe.teacher_regions!r}")
        if recipe.teacher_keep <= 0:
            raise UserError(f"{path}: teacher_keep must be in (0, 1], got {recipe.teacher_keep!r}")
        if recipe.style_balance not in ("image", "group"):
            raise UserError(f"{path}: style_balance must be 'image' or 'group', got {recipe.style_balance!r}")
        if not isinstance(recipe.style_group_weights, dict) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0
                for w in recipe.style_group_weights.values()):
            raise UserError(f"{path}: style_group_weights must map source groups to weights >= 0, "
                            f"got {recipe.style_group_weights!r}")
        if recipe.style_group_weights and recipe.style_balance != "group":
            raise UserError(f"{path}: style_group_weights needs style_balance: group")
        recipe.scale_range = tuple(recipe.scale_range)
        return recipe


# ----------------------------------------------------------------------------------------------------------
# Data


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# RGB -> YIQ (NTSC): Y is the luma, (I, Q) the chroma plane whose angle is the hue.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rotate_hues(img: torch.Tensor, angle: float) -> torch.Tensor:
    """(3, H, W) in [0,1] with every hue turned by `angle` radians: the chroma plane of YIQ rotated, luma kept.

    Nineteen training paintings are nineteen palettes; a held-out painting's palette is new. Turning the hues of
    some style crops shows the model paintings whose brushwork it knows in colours it has not seen.
    """
    c, s = math.cos(angle), math.sin(angle)
    turn = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = _YIQ_TO_RGB @ turn @ _RGB_TO_YIQ
    return torch.einsum("ij,jhw->ihw", m, img).clamp(0, 1)


class ImagePool:
    """Every image of a folder in memory (uint8, short side capped), sampled as random resized crops."""

    def __init__(self, folder: Path, max_short: int):
        files = image_files(folder)
        if not files:
            raise UserError(f"{folder}: no images found (build the training set with `mambast data build DIR`)")
        self.images = []
        for f in files:
            img = torch.from_numpy(load_image(f)).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
            h, w = img.shape[1:]
            if min(h, w) > max_short:
                s = max_short / min(h, w)
                img = F.interpolate(img[None].float(), size=(max(1, round(h * s)), max(1, round(w * s))),
                                    mode="bilinear", antialias=True, align_corners=False)[0].round().clamp(0, 255).byte()
            self.images.append(img)
        self.files = files
        self.draw_weights: torch.Tensor | None = None  # None: every image alike (see balance_by_group)

    def __len__(self):
        return len(self.images)

    def draw(self, g: torch.Generator) -> int:
        if self.draw_weights is None:
            return int(torch.randint(len(self.images), (1,), generator=g))
        return int(torch.multinomial(self.draw_weights, 1, generator=g))

    def sample(self, n: int, crop: int, scale_range, g: torch.Generator, hue_jitter: float = 0.0) -> torch.Tensor:
        """n random crops (n, 3, crop, crop) in [0,1]: random image, random scale, random position, random flip;
        with `hue_jitter` > 0, that share of them with hues turned by a uniform random angle (`rotate_hues`)."""
        out = []
        for _ in range(n):
            img = random_crop(self.images[self.draw(g)], crop, scale_range, g)
            if hue_jitter > 0:  # no draws otherwise: recipes without it repeat bit for bit
                turn, angle = torch.rand(2, generator=g).tolist()
                if turn < hue_jitter:
                    img = rotate_hues(img, 2 * math.pi * angle)
            out.append(img)
        return torch.stack(out) if out else torch.empty(0, 3, crop, crop)


def random_crop(img: torch.Tensor, crop: int, scale_range, g: torch.Generator) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, crop, crop) in [0,1]: short side resized to crop·U(scale_range), random position,
    random horizontal flip. C may stack several aligned images (e.g. a content and its teacher output)."""
    img = img.float() / 255
    lo, hi = scale_range
    short = crop * (lo + (hi - lo) * float(torch.rand(1, generator=g)))
    h, w = img.shape[1:]
    s = short / min(h, w)
    size = (max(crop, round(h * s)), max(crop, round(w * s)))
    img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    y = int(torch.randint(size[0] - crop + 1, (1,), generator=g))
    x = int(torch.randint(size[1] - crop + 1, (1,), generator=g))
    img = img[:, y:y + crop, x:x + crop]
    if float(torch.rand(1, generator=g)) < 0.5:
        img = img.flip(-1)
    return img


def group_draw_weights(groups: list[str], group_weights: dict[str, float]) -> torch.Tensor:
    """Draw weights for items of the given source groups: each group's share ∝ its weight (1 unless named),
    split evenly among its items. A weight for a group with no items is a typo in the recipe: refused."""
    unknown = sorted(set(group_weights) - set(groups))
    if unknown:
        raise UserError(f"recipe: style_group_weights names {', '.join(unknown)}; the data's groups are "
                        f"{', '.join(sorted(set(groups)))}")
    counts = {name: groups.count(name) for name in set(groups)}
    weights = torch.tensor([group_weights.get(name, 1.0) / counts[name] for name in groups], dtype=torch.float64)
    if weights.sum() <= 0:
        raise UserError("recipe: style_group_weights leaves no style to draw")
    return weights / weights.sum()


def style_groups(data: Path, files: list[Path]) -> list[str]:
    """The source group of each style file, from DATA/manifest.json (`mambast data build` writes it)."""
    manifest = data / "manifest.json"
    if not manifest.exists():
        raise UserError(f"{manifest}: missing; style_balance: group needs the source groups it lists")
    group_of = {r["path"]: r["source_group"] for r in json.loads(manifest.read_text())["files"]}
    missing = [f.relative_to(data).as_posix() for f in files if f.relative_to(data).as_posix() not in group_of]
    if missing:
        raise UserError(f"{manifest}: lists no source group for {missing[0]} ({len(missing)} file(s)); rebuild the data")
    return [group_of[f.relative_to(data).as_posix()] for f in files]


class TeacherPairPool:
    """Distillation pairs in memory: (content region + teacher output) stacked as one 6-channel uint8 tensor, and
    the style image each was made with. Sampled as aligned random crops of both, plus a random crop of the style."""

    def __init__(self, pairs, style_images: dict[str, torch.Tensor]):
        self.stacked = [torch.from_numpy(np.concatenate([c, t], axis=2)).permute(2, 0, 1).contiguous()
                        for c, t, _ in pairs]
        self.style_files = [s for _, _, s in pairs]
        self.styles = [style_images[s] for s in self.style_files]
        self.draw_weights: torch.Tensor | None = None  # None: every pair alike

    def __len__(self):
        return len(self.stacked)

    def sample(self, n: int, crop: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(content, teacher output, style), each (n, 3, crop, crop) in [0,1]. The 384² pair is shrunk to between
        crop and 384 on its side before cropping, so the crop sees the teacher's strokes at their own scale."""
        contents, targets, styles = [], [], []
        for _ in range(n):
            i = (int(torch.randint(len(self.stacked), (1,), generator=g)) if self.draw_weights is None
                 else int(torch.multinomial(self.draw_weights, 1, generator=g)))
            both = random_crop(self.stacked[i], crop, (1.0, self.stacked[i].shape[-1] / crop), g)
            contents.append(both[:3])
            targets.append(both[3:])
            styles.append(random_crop(self.styles[i], crop, (1.0, 2.0), g))
        return torch.stack(contents), torch.stack(targets), torch.stack(styles)


# ----------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe = r = recipe
        if r.threads:
            torch.set_num_threads(r.threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.out = Path(r.out)
        data = Path(r.data)
        for sub in ("content/train", "style/train"):
            if not (data / sub).is_dir():
                raise UserError(f"{data}: missing {sub}/ (build it with `mambast data build {data}`)")
        max_short = int(math.ceil(r.crop * r.scale_range[1]))
        self.content = ImagePool(data / "content/train", max_short)
        self.style = ImagePool(data / "style/train", max_short)
        self.val_content = ImagePool(data / "content/val", 256) if (data / "content/val").is_dir() else self.content
        self.val_style = ImagePool(data / "style/val", 256) if (data / "style/val").is_dir() else self.style
        self.group_of: dict[str, str] = {}  # style file (relative to DATA) -> source group, with style_balance: group
        if r.style_balance == "group":
            groups = style_groups(data, self.style.files)
            self.group_of = {f.relative_to(data).as_posix(): g for f, g in zip(self.style.files, groups)}
            self.style.draw_weights = group_draw_weights(groups, r.style_group_weights)

        torch.manual_seed(r.seed)  # DropPath draws from the global RNG
        self.model = MambaST(model_config(r.model)).to(self.device)
        init_weights(self.model, r.init, seed=r.seed)
        self.grown_layers: range = range(0)  # MSTD blocks that init_from's weights lack
        if r.init_from:
            self._start_from(Path(r.init_from))
        self.model.train()
        self.net = load_perceptual(r.perceptual, r.perceptual_weights, smooth=r.perceptual_smooth,
                                   temperature=r.perceptual_temperature).to(self.device)
        # An optional second opinion on style from another net's statistics (content and identity stay on the
        # first net). Measured for the bundled weights and not used there: models/weights/MODEL_CARD.md.
        self.second_net = load_perceptual(r.second_style_net).to(self.device) if r.second_style_net else None
        for key, net in (("style_tap_weights", self.net), ("second_style_tap_weights", self.second_net)):
            weights = getattr(r, key)
            if net is not None and weights and len(weights) != len(net.taps):
                raise UserError(f"recipe: {key} has {len(weights)} entries; {type(net).__name__} has "
                                f"{len(net.taps)} taps ({', '.join(net.taps)})")
        self.teacher_pool = self._teacher_pool(data) if r.teacher else None
        grown = tuple(f"mamba.decoder.layers.{i}." for i in self.grown_layers)
        trained = [(n, p) for n, p in self.model.named_parameters() if _trained(n)]
        groups = [{"params": [p for n, p in trained if not n.startswith(grown)], "lr_scale": 1.0}]
        if grown:
            groups.append({"params": [p for n, p in trained if n.startswith(grown)], "lr_scale": r.grow_lr_scale})
        self.opt = torch.optim.Adam(groups, lr=r.lr)
        self.gen = torch.Generator().manual_seed(r.seed)
        self.step = 0
        self.history: list[dict] = []
        self._prepare_run_folder(resume)

    # --- run folder ---------------------------------------------------------------------------------------

    def _prepare_run_folder(self, resume: bool):
        recipe_doc = _recipe_document(self.recipe)
        ckpt = self.out / "checkpoint.pt"
        if ckpt.exists() and not resume:
            raise UserError(f"{self.out}: a run already exists here (use --resume to continue it, or another out)")
        if resume:
            if not ckpt.exists():
                raise UserError(f"{ckpt}: nothing to resume")
            saved = read_yaml(self.out / "recipe.yaml")
            # a key the saved recipe lacks (a run started before the key existed) had its default then
            defaults = _recipe_document(Recipe())
            changed = {k for k in recipe_doc if k not in ("steps", "threads")
                       and saved.get(k, defaults[k]) != recipe_doc[k]}
            if changed:
                raise UserError(f"{self.out}: the recipe changed since this run started ({', '.join(sorted(changed))}); "
                                f"start a new run or restore the recipe")
            self._load_checkpoint(ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "samples").mkdir(exist_ok=True)
        _atomic_write_text(self.out / "recipe.yaml", _yaml(recipe_doc))
        g = torch.Generator().manual_seed(self.recipe.seed + 1)
        n = self.recipe.val_pairs
        self.val_batch = (self.val_content.sample(n, 192, (1.0, 1.0), g), self.val_style.sample(n, 192, (1.0, 1.0), g))

    def _teacher_pool(self, data: Path) -> TeacherPairPool:
        r = self.recipe
        records = build_pairs(data, self.content.files, self.style.files, r.teacher_pairs, teacher=r.teacher,
                              seed=r.seed, photo_share=r.teacher_photo_share, threads=max(1, r.threads))
        style_images = {f.relative_to(data).as_posix(): img
                        for pool in (self.content, self.style) for f, img in zip(pool.files, pool.images)}
        pairs = load_pairs(data, records)
        if r.teacher_keep < 1:
            ratios = teacher_style_ratios(pairs, style_images, self.net, r.style_tap_weights)
            kept = sorted(range(len(pairs)), key=lambda i: (ratios[i], i))[:max(1, round(r.teacher_keep * len(pairs)))]
            pairs = [pairs[i] for i in sorted(kept)]
        pool = TeacherPairPool(pairs, style_images)
        if r.style_balance == "group":  # a photo as the style is a group of its own
            groups = [self.group_of.get(s, "photo") for _, _, s in pairs]
            pool.draw_weights = group_draw_weights(groups, {k: v for k, v in r.style_group_weights.items()
                                                            if k in groups})
        return pool

    def _start_from(self, weights: Path):
        """Load earlier weights. A model with more MSTD blocks than they have grows from them: the extra blocks,
        appended last, keep their fresh init and train at `grow_lr_scale` times the rate.

        Why fresh and not the identity: a fresh block's SS2D output is small beside the residual stream, so the
        block adds about LN(x) to x, which the MSTD's final LayerNorm takes out again: stage 10g grown to 6 blocks
        stylizes within about 0.003 of 10g (mean absolute difference in [0, 1], 256² photos, Starry Night).
        Zeroing the block's output LayerNorm instead (exact identity) opened it far too slowly under Adam: its
        weight was 0.002 after 25 steps at 10x the rate."""
        start = load_model(weights)
        state = start.state_dict()
        have, want = start.cfg.n_decoder_layers, self.model.cfg.n_decoder_layers
        if have > want:
            raise UserError(f"{weights}: has {have} MSTD blocks, model '{self.recipe.model}' {want}: a model can grow "
                            f"from fewer MSTD blocks, not drop some")
        self.grown_layers = range(have, want)
        for i in self.grown_layers:
            block = self.model.mamba.decoder.layers[i]
            state.update({f"mamba.decoder.layers.{i}.{k}": v for k, v in block.state_dict().items()})
        check_state_dict(state, {k: v.shape for k, v in self.model.state_dict().items()},
                         f"{weights}: does not fit model '{self.recipe.model}'")
        self.model.load_state_dict(state)

    def _save_checkpoint(self):
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                 "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "history": json.dumps(self.history)}
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def _load_checkpoint(self, path: Path):
        state = torch_load_safe(path)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = int(state["step"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.history = json.loads(state["history"])

    # --- one step -----------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        r = self.recipe
        if step < r.warmup:
            return r.lr * (step + 1) / r.warmup
        t = (step - r.warmup) / max(1, r.steps - r.warmup)
        return r.lr_min + 0.5 * (r.lr - r.lr_min) * (1 + math.cos(math.pi * min(1.0, t)))

    def _perms(self, length: int):
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        return style_permutations(self.model.cfg.n_decoder_layers, length, seed)

    def losses(self, content: torch.Tensor, style: torch.Tensor,
               teacher_out: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The recipe's losses on a batch; `teacher_out` holds the teacher's outputs for its first items."""
        r, m, net = self.recipe, self.model, self.net
        L = (content.shape[-2] // 8) * (content.shape[-1] // 8)
        ics = m(content, style, perms=self._perms(L))
        icc = m(content, content, perms=self._perms(L))
        iss = m(style, style, perms=self._perms(L))
        f_c, f_s = net.features(content), net.features(style)
        f_cs, f_cc, f_ss = net.features(ics), net.features(icc), net.features(iss)
        l_c = content_loss(f_cs, f_c, net.content_taps)
        l_s = weighted_style_loss(f_cs, f_s, r.style_tap_weights)
        l_id1, l_id2 = identity_losses(icc, content, iss, style, f_cc, f_c, f_ss, f_s)
        total = (r.weight_content * l_c + r.weight_style * l_s + r.weight_identity_pixel * l_id1
                 + r.weight_identity_feature * l_id2)
        losses = {"content": l_c, "style": l_s, "id_pixel": l_id1, "id_feature": l_id2}
        if self.second_net is not None:
            g_cs, g_s = self.second_net.features(ics), self.second_net.features(style)
            losses["style_second"] = weighted_style_loss(g_cs, g_s, r.second_style_tap_weights)
            total = total + r.weight_second_style * losses["style_second"]
        if teacher_out is not None and len(teacher_out):
            n = len(teacher_out)
            f_out, f_t = [f[:n] for f in f_cs], net.features(teacher_out)
            if r.teacher_loss == "regional":
                losses["teacher"] = regional_distillation_loss(f_out, f_t, r.style_tap_weights, r.teacher_regions)
            else:
                losses["teacher"] = distillation_loss(ics[:n], teacher_out, f_out, f_t)
            total = total + r.weight_teacher * losses["teacher"]
        if r.weight_shift > 0:
            losses["shift"] = self.shift_loss(content[:1], style[:1])
            total = total + r.weight_shift * losses["shift"]
        return {"total": total, **losses}

    def shift_loss(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """L_shift on one content crop: a window and the window moved by (dy, dx), stylized together (one style,
        one set of style permutations, as the frames of a clip) and without DropPath (whose random masks would
        differ between the two)."""
        size, patch = self.recipe.shift_window, self.model.cfg.patch_size
        dy, dx = (1 + torch.randint(patch - 1, (2,), generator=self.gen)).tolist()
        y = int(torch.randint(content.shape[-2] - size - dy + 1, (1,), generator=self.gen))
        x = int(torch.randint(content.shape[-1] - size - dx + 1, (1,), generator=self.gen))
        windows = torch.cat([content[..., y:y + size, x:x + size],
                             content[..., y + dy:y + dy + size, x + dx:x + dx + size]])
        self.model.eval()
        try:
            perms = self._perms(math.ceil(size / patch) ** 2)
            out = self.model(windows, style.expand(2, -1, -1, -1), perms=perms)
        finally:
            self.model.train()
        return shift_consistency_loss(out[:1], out[1:], dy, dx)

    def train_step(self) -> dict[str, float]:
        r = self.recipe
        n_teacher = round(r.batch_size * r.teacher_share) if self.teacher_pool else 0
        n_plain = r.batch_size - n_teacher
        content = self.content.sample(n_plain, r.crop, r.scale_range, self.gen)
        style = self.style.sample(n_plain, r.crop, r.scale_range, self.gen, r.style_hue_jitter)
        teacher_out = None
        if n_teacher:
            t_content, teacher_out, t_style = self.teacher_pool.sample(n_teacher, r.crop, self.gen)
            content, style = torch.cat([t_content, content]), torch.cat([t_style, style])
            teacher_out = teacher_out.to(self.device)
        content, style = content.to(self.device), style.to(self.device)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)  # absent in runs from before it
        losses = self.losses(content, style, teacher_out)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    # --- outputs a person looks at ------------------------------------------------------------------------

    @torch.no_grad()
    def write_samples(self):
        self.model.eval()
        content, style = self.val_batch
        out = self.model(content.to(self.device), style.to(self.device), seed=0).clamp(0, 1).cpu()
        self.model.train()
        to_np = lambda t: (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows = [[to_np(content[i]), to_np(style[i]), to_np(out[i])] for i in range(len(content))]
        sheet = contact_sheet(rows, labels=[["content", "style", f"step {self.step}"]] * len(rows), cell=192)
        save_png(self.out / "samples" / f"step_{self.step:06d}.png", sheet)
        save_png(self.out / "samples" / "latest.png", sheet)

    def write_loss_plot(self):
        if self.history:
            write_loss_plot([(self.out.name, self.history)], self.out / "losses.png")

    # --- the loop -----------------------------------------------------------------------------------------

    def run(self) -> Path:
        r = self.recipe
        start = time.time()
        with tqdm(total=r.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                  disable=bool(os.environ.get("MAMBAST_QUIET"))) as bar, \
                open(self.out / "log.jsonl", "a") as log:
            while self.step < r.steps:
                values = self.train_step()
                values.update(step=self.step, lr=self.lr_at(self.step - 1), time=time.time() - start)
                self.history.append(values)
                log.write(json.dumps(values) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{values['total']:.3g}", style=f"{values['style']:.3g}",
                                content=f"{values['content']:.3g}")
                if self.step % r.checkpoint_every == 0 or self.step == r.steps:
                    self._save_checkpoint()
                if self.step % r.sample_every == 0 or self.step == r.steps:
                    self.write_samples()
                    self.write_loss_plot()
        save_model(self.model, self.out / "final", meta={"recipe": _jsonable(asdict(r)), "steps": self.step})
        return self.out / "final"


@torch.no_grad()
def teacher_style_ratios(pairs, style_images: dict[str, torch.Tensor], net, tap_weights: list[float],
                         size: int = 256) -> list[float]:
    """How well the teacher carried each pair's style, on the training net: the style loss of its output over
    the content region's (lower is better; 1 = no closer to the style than the photo was). Images at `size`."""
    def features(img: torch.Tensor) -> list[torch.Tensor]:
        h, w = img.shape[1:]
        s = size / min(h, w)
        x = F.interpolate(img[None].float() / 255, size=(max(size, round(h * s)), max(size, round(w * s))),
                          mode="bilinear", antialias=True, align_corners=False)
        return net.features(x.to(device))
    device = next(net.parameters()).device
    as_chw = lambda a: torch.tensor(a).permute(2, 0, 1)  # noqa: E731 (a copy: decoded arrays may be read-only)
    style_feats: dict[str, list[torch.Tensor]] = {}
    ratios = []
    for content, target, style in tqdm(pairs, desc="teacher pairs: rating", unit="pair",
                                       disable=bool(os.environ.get("MAMBAST_QUIET"))):
        if style not in style_feats:
            style_feats[style] = features(style_images[style])
        f_s = style_feats[style]
        ratios.append(float(weighted_style_loss(features(as_chw(target)), f_s, tap_weights)
                            / weighted_style_loss(features(as_chw(content)), f_s, tap_weights).clamp_min(1e-12)))
    return ratios


# "style_second" / "teacher" only in runs whose recipe names a second style net / a teacher
LOSS_KEYS = ("total", "content", "style", "id_pixel", "id_feature", "style_second", "teacher")


def write_loss_plot(runs: list[tuple[str, list[dict]]], path: Path, window: int = 25) -> None:
    """Moving averages of the losses of one run, or of chained runs (stages) laid end to end on one step axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.8))
    offset = 0
    labelled: set[str] = set()
    for name, history in runs:
        steps = np.array([h["step"] for h in history]) + offset
        for colour, key in enumerate(LOSS_KEYS):
            if not history or key not in history[0]:
                continue
            vals = np.array([h[key] for h in history])
            k = min(window, len(vals))
            ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), color=f"C{colour}",
                    label=None if key in labelled else key)
            labelled.add(key)
        if len(runs) > 1:
            ax.axvline(offset, color="grey", lw=0.8, ls=":")
            ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        offset = int(steps[-1]) if len(steps) else offset
    ax.set_yscale("log")
    ax.set_xlabel("step" if len(runs) == 1 else "step (stages chained)")
    ax.set_title("training losses (moving average)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _recipe_document(recipe: Recipe) -> dict:
    """The recipe as recipe.yaml holds it (plain YAML types)."""
    doc = asdict(recipe)
    doc["scale_range"] = list(recipe.scale_range)
    return doc


def _trained(name: str) -> bool:
    """Parameters the official model never uses get no updates (they stay as loaded, for strict loading)."""
    return not ("skip_scale2" in name or "new_ps" in name or ("encoder" in name and "in_style_proj" in name))


def _jsonable(d):
    return json.loads(json.dumps(d, default=list))


def _yaml(d) -> str:
    import yaml
    return yaml.safe_dump(_jsonable(d), sort_keys=False)


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# CLI


def register(sub):
    p = sub.add_parser("train", help="train a model variant from a recipe (configs/train/*.yaml)")
    p.add_argument("recipe", help="training recipe YAML")
    p.add_argument("--resume", action="store_true", help="continue the run in the recipe's out folder")
    p.add_argument("--steps", type=int, help="override the recipe's total steps")
    p.add_argument("--out", help="override the recipe's run folder")
    p.add_argument("--data", help="override the recipe's data folder")
    p.set_defaults(func=run_train)

    pl = sub.add_parser("plot-losses", help="one loss plot PNG of runs chained as stages (e.g. small, small_stage2)")
    pl.add_argument("runs", nargs="+", help="run folders, in training order")
    pl.add_argument("-o", "--output", required=True, help="PNG path")
    pl.set_defaults(func=run_plot_losses)

    e = sub.add_parser("export-weights", help="write a run's model as fp16 safetensors + config for shipping")
    e.add_argument("run", help="run folder (with checkpoint.pt) or weights folder")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--card", help="model card markdown to copy beside the weights")
    e.set_defaults(func=run_export)


def run_train(args) -> int:
    recipe = Recipe.load(args.recipe, steps=args.steps, out=args.out, data=args.data)
    final = Trainer(recipe, resume=args.resume).run()
    print(f"trained {recipe.steps} steps; weights in {final}, samples in {Path(recipe.out) / 'samples'}")
    return 0


def run_plot_losses(args) -> int:
    runs = []
    for run in map(Path, args.runs):
        log = run / "log.jsonl"
        if not log.is_file():
            raise UserError(f"{run}: no log.jsonl (not a training run folder)")
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        by_step = {row["step"]: row for row in rows}  # a resumed run re-logs the steps after its last checkpoint
        runs.append((run.name, [by_step[k] for k in sorted(by_step)]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_loss_plot(runs, Path(args.output))
    print(f"wrote {args.output} ({sum(len(h) for _, h in runs)} steps, {len(runs)} run(s))")
    return 0


def run_export(args) -> int:
    run = Path(args.run)
    if (run / "checkpoint.pt").exists():
        recipe = read_yaml(run / "recipe.yaml")
        state = torch_load_safe(run / "checkpoint.pt")
        model = MambaST(model_config(recipe.get("model", "small")))
        model.load_state_dict(state["model"])
        meta = {"recipe": recipe, "steps": int(state["step"])}
    else:
        model = load_model(run)
        meta = getattr(model, "meta", {})
    out = save_model(model, args.output, meta=meta, half=True)
    if args.card:
        (out / "MODEL_CARD.md").write_text(Path(args.card).read_text())
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {out}/model.safetensors ({size:.1f} MiB, fp16)")
    return 0
