"""Style and content distances of stylized images, the baselines they are read against, and the per-pair loop
behind `mambast eval quality` (jobs/eval_quality.py; the definitions are in its docstring).

`meanstd_per_tap` is the one style distance (Σ over a tap's channels of the squared differences of the channel
means and stds); `Distances` reads it per tap, normalised by the content image's own, and
`temporal_metrics.style_distances` sums it over the taps for each frame of a video.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from models.losses import gram, mean_std, normalise
from models.perceptual import load_perceptual
from models.style_tuning import StyleTuning, tune_to_style
from pipeline.api import Stylizer
from pipeline.stylizer import image_to_tensor, to_working_size, working_shape

SIZE = 256
BLUR_SIGMA = 3.0
SHEET_STYLES_TWO_ROWS = 8


def square(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resize the short side to `size` and centre-crop a square (the paper's test transform)."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    image = cv2.resize(image, (max(size, round(w * s)), max(size, round(h * s))), interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return image[y:y + size, x:x + size]


def short_side(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resized so that its short side is `size`, its aspect kept."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def colour_transfer(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer: match per-channel mean and std in Lab."""
    c = cv2.cvtColor(content, cv2.COLOR_RGB2LAB).astype(np.float32)
    s = cv2.cvtColor(style, cv2.COLOR_RGB2LAB).astype(np.float32)
    cm, cs = c.reshape(-1, 3).mean(0), c.reshape(-1, 3).std(0) + 1e-6
    sm, ss = s.reshape(-1, 3).mean(0), s.reshape(-1, 3).std(0)
    out = (c - cm) / cs * ss + sm
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def blurred(content: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(content, (0, 0), BLUR_SIGMA, borderType=cv2.BORDER_REFLECT)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def meanstd_per_tap(feats_x: list[torch.Tensor], feats_s: list[torch.Tensor]) -> torch.Tensor:
    """(B, taps): per image and tap, ‖μ(φ(X)) − μ(φ(S))‖² + ‖σ(φ(X)) − σ(φ(S))‖² (means over the channels)."""
    per_tap = []
    for a, s in zip(feats_x, feats_s):
        (ma, sa), (ms, ss) = mean_std(a), mean_std(s)
        per_tap.append(((ma - ms) ** 2).mean(dim=(1, 2, 3)) + ((sa - ss) ** 2).mean(dim=(1, 2, 3)))
    return torch.stack(per_tap, 1)


class Distances:
    """Style and content distances on one perceptual network."""

    def __init__(self, net):
        self.net = net

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(x)

    @torch.no_grad()
    def per_tap(self, x: torch.Tensor, fs: list[torch.Tensor], fc: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Distances of images x to the style and content whose features are fs and fc."""
        fx = self.net.features(x)
        grams = torch.stack([((gram(a) - gram(s)) ** 2).mean(dim=(1, 2)) for a, s in zip(fx, fs)], 1)
        content_d = sum(((normalise(fx[i]) - normalise(fc[i])) ** 2).mean(dim=(1, 2, 3)) for i in self.net.content_taps)
        return {"meanstd": meanstd_per_tap(fx, fs), "gram": grams, "content": content_d}


def evaluate_quality(model, contents: list[np.ndarray], styles: list[np.ndarray], net_name: str,
                     working_size: int = SIZE, seed: int = 0, teacher=None, sources: list[str] | None = None,
                     tuning: StyleTuning | None = None, progress=None):
    """Per-pair distances for each method; returns (rows, sample images for the sheet).

    `teacher` (models/teacher.py) adds its row; `sources` names each style's source group for the breakdown.
    `tuning` adds the row "model_tuned": the model tuned to each style on the contents at the working size (as
    `mambast stylize` tunes it on the clip's frames; models/style_tuning.py). `progress(style_index)` after each style."""
    sources = sources or ["all"] * len(styles)
    dist = Distances(load_perceptual(net_name))
    tuning_net = load_perceptual(tuning.perceptual) if tuning is not None and tuning.steps > 0 else None
    work = working_shape(*contents[0].shape[:2], working_size) if contents else (SIZE, SIZE)
    frames_at_work = [image_to_tensor(to_working_size(c, work))[0] for c in contents]
    stylizers = {"model": Stylizer(model, working_size=working_size, temporal=False, seed=seed)}
    if working_size not in (0, SIZE):
        stylizers["model_at_256"] = Stylizer(model, working_size=SIZE, temporal=False, seed=seed)
    c_t = to_tensor(contents)
    fc = dist.features(c_t)
    rows, sheet = [], []
    for ci, content in enumerate(contents):
        stylizers["model"].set_style(content)
        d = dist.per_tap(to_tensor([stylizers["model"].stylize(content)]), fc, [f[ci:ci + 1] for f in fc])
        rows.append({"method": "model_identity", "style": None, "content": ci, "content_distance": float(d["content"][0])})
    for si, style in enumerate(styles):
        outputs = {}
        for name, stylizer in stylizers.items():
            stylizer.set_style(style)
            outputs[name] = stylizer.stylize(list(contents))
        if tuning_net is not None:
            tuned = tune_to_style(model, to_tensor([style]), frames_at_work, tuning, net=tuning_net)
            outputs["model_tuned"] = Stylizer(tuned, style, working_size=working_size, temporal=False,
                                              seed=seed).stylize(list(contents))
        transferred = [colour_transfer(c, style) for c in contents]
        if teacher is not None:
            outputs["teacher"] = [teacher.stylize_image(c, style) for c in contents]
        methods = {name: to_tensor(out) for name, out in outputs.items()} | {
            "content": c_t,
            "colour_transfer": to_tensor(transferred),
            "blur_sigma3": to_tensor([blurred(c) for c in contents]),
        }
        s_t = to_tensor([style])
        fs = dist.features(s_t.expand(len(contents), -1, -1, -1))
        base = dist.per_tap(c_t, fs, fc)  # the content image's own distance per tap: the normaliser
        for name, x in methods.items():
            d = dist.per_tap(x, fs, fc)
            for ci in range(len(contents)):
                rows.append({"method": name, "style": si, "content": ci, "source": sources[si],
                             "style_meanstd": float((d["meanstd"][ci] / base["meanstd"][ci].clamp_min(1e-12)).mean()),
                             "style_gram": float((d["gram"][ci] / base["gram"][ci].clamp_min(1e-12)).mean()),
                             "content_distance": float(d["content"][ci])})
        # sheet rows: two contents per style for a few styles; one per style, taken in turn, for many
        shown = range(min(2, len(contents))) if len(styles) <= SHEET_STYLES_TWO_ROWS else [si % len(contents)]
        for ci in shown:
            extra = [outputs[name][ci] for name in ("teacher", "model_tuned") if name in outputs]
            sheet.append([contents[ci], style, transferred[ci], *extra, outputs["model"][ci]])
        if progress is not None:
            progress(si)
    return rows, sheet


def _means(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4)
            for k in ("style_meanstd", "style_gram", "content_distance") if k in rows[0]}


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        summary[method] = _means([r for r in rows if r["method"] == method])
    summary["by_source"] = {
        source: {method: _means([r for r in rows if r["method"] == method and r.get("source") == source])
                 for method in dict.fromkeys(r["method"] for r in rows if r.get("source") == source)}
        for source in sorted({r["source"] for r in rows if "source" in r})}
    m, ct, blur = summary["model"], summary["colour_transfer"], summary["blur_sigma3"]
    summary["checks"] = {
        "style_halved": m["style_meanstd"] <= 0.5,
        "beats_colour_transfer": m["style_meanstd"] < ct["style_meanstd"] and m["style_gram"] < ct["style_gram"],
        "content_kept": m["content_distance"] < blur["content_distance"],
    }
    if tuned := summary.get("model_tuned"):
        summary["checks"] |= {"tuned_style_0.38": tuned["style_meanstd"] <= 0.38,
                              "tuned_content_kept": tuned["content_distance"] < blur["content_distance"]}
    return summary
