"""Packaged media (pipeline/packaged_media.py), `mambast data build` (jobs/data.py) and its style corpus (jobs/style_corpus.py)."""
import argparse
import hashlib
import json
import struct

import numpy as np
import pytest
from PIL import Image

from jobs import data, style_corpus
from jobs.dataset_item import Item
from pipeline import packaged_media as assets
from models.errors import UserError

needs_media = pytest.mark.skipif(
    not (assets.GCOMPRIS_RCC.is_dir() and assets.OPENCV_DATA.is_dir()),
    reason="needs `apt-get install gcompris-qt-data opencv-doc`")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMBAST_CACHE", str(tmp_path_factory.mktemp("asset-cache")))
        yield


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mambast")
    data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@needs_media
def test_gcompris_paintings_are_rebuilt_once():
    paths = assets.gcompris_paintings()
    assert len(paths) == 22 and paths == sorted(paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert 290 <= min(image.size) and max(image.size) <= 760, (path.name, image.size)
    titles = [assets.asset_info(p)["title"] for p in paths]
    assert any("Great Wave" in t for t in titles) and any("Composition VIII" in t for t in titles)
    assert all(assets.asset_info(p)["licence"].startswith("GPL-3.0") for p in paths)

    mtime = paths[0].stat().st_mtime_ns
    assert assets.gcompris_paintings() == paths and paths[0].stat().st_mtime_ns == mtime  # served from the cache


@needs_media
def test_gcompris_photos_keep_only_free_licences():
    paths = assets.gcompris_photos()
    assert len(paths) >= 60
    assert {assets.asset_info(p)["licence"] for p in paths} <= {"Public Domain", "CC0-1.0"}
    assert not any("tajMahal" in p.name for p in paths)  # CC-BY-SA 4.0 in the README


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "OPENCV_DATA", tmp_path / "none")
    monkeypatch.setattr(assets, "GCOMPRIS_RCC", tmp_path / "none")
    with pytest.raises(UserError, match="apt-get install opencv-doc"):
        assets.starry_night()
    with pytest.raises(UserError, match="apt-get install gcompris-qt-data"):
        assets.gcompris_paintings(tmp_path / "cache")
    with pytest.raises(UserError, match="chelsea.gif: not a photo"):
        assets.skimage_photo("chelsea.gif")


@needs_media
def test_build_writes_splits_and_manifest_deterministically(tmp_path, capsys):
    assert run_cli(["data", "build", str(tmp_path / "a"), "--size", "40", "--seed", "3"]) == 0
    assert "content" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text(encoding="utf-8"))

    written = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    assert written == [f["path"] for f in manifest["files"]]
    for kind in ("content", "style"):
        for split in ("train", "val"):
            assert manifest["counts"][kind][split] > 0
            assert all(f["path"].startswith(f"{kind}/{split}/") for f in manifest["files"]
                       if f["kind"] == kind and f["split"] == split)
    assert all(f["licence"] and f["source"] for f in manifest["files"])
    assert manifest["counts"]["style"] == {"train": 19, "val": 4}
    assert any(f["path"] == "style/val/opencv_starry_night.png" for f in manifest["files"])
    assert any(f["path"].startswith("content/train/vtest_f") for f in manifest["files"])
    with Image.open(tmp_path / "a" / written[0]) as image:
        assert min(image.size) == 40

    run_cli(["data", "build", str(tmp_path / "b"), "--size", "40", "--seed", "3"])
    again = json.loads((tmp_path / "b" / "manifest.json").read_text(encoding="utf-8"))
    assert again == manifest

    with pytest.raises(UserError, match="already holds a build"):
        run_cli(["data", "build", str(tmp_path / "a"), "--size", "40"])


def fake_items():
    blank = lambda: Image.new("RGB", (8, 8))  # noqa: E731
    photos = [Item(f"p{i:02d}", "content", "photos", blank) for i in range(40)]
    frames = [Item(f"clip_f{i:04d}", "content", "clip_x", blank) for i in range(0, 500, 25)]
    titles = {"great_wave": "Hokusai, The Great Wave", "kandinky": "Wassily Kandinsky, Composition VIII",
              "mona_lisa": "Leonardo, Mona Lisa"}
    styles = [Item(name, "style", "gcompris", blank, {"title": title}) for name, title in titles.items()]
    return photos + frames + styles


def val_names(items):
    return sorted(item.name for item in items if item.split == "val")


def test_splits_follow_seed_clip_order_and_style_names():
    items = fake_items()
    data.assign_splits(items, 0.1, 0, ["kandinsky"])  # matches the title, not the misspelt file name
    assert [n for n in val_names(items) if n.startswith("clip")] == ["clip_f0450", "clip_f0475"]  # the clip's tail
    assert [n for n in val_names(items) if not n.startswith(("p", "clip"))] == ["kandinky"]
    assert sum(n.startswith("p") for n in val_names(items)) == 4

    same, other = fake_items(), fake_items()
    data.assign_splits(same, 0.1, 0, ["kandinsky"])
    data.assign_splits(other, 0.1, 1, ["kandinsky"])
    assert val_names(same) == val_names(items) and val_names(other) != val_names(items)


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="starry_nite: matches no painting"):
        data.assign_splits(fake_items(), 0.1, 0, ["starry_nite"])
    with pytest.raises(UserError, match="--size 8"):
        run_cli(["data", "build", str(tmp_path), "--size", "8"])
    with pytest.raises(UserError, match="--val-fraction 1.5"):
        run_cli(["data", "build", str(tmp_path), "--val-fraction", "1.5"])


# ---------------------------------------------------------------------------------------------------------
# The style corpus (--styles corpus), on small fake package trees


def noise(seed, size=(240, 200)):
    """A detailed RGB image (never near-blank)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def figure_on_black(seed, size=(400, 400), box=(100, 120, 320, 330), mode="RGB"):
    """A figure (noise) inside `box`; the rest black, or transparent for mode RGBA."""
    image = Image.new(mode, size)
    image.paste(noise(seed, (box[2] - box[0], box[3] - box[1])).convert(mode), box[:2])
    return image


def save(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def gimp_pattern(pixels: np.ndarray, name=b"fake pattern") -> bytes:
    height, width, depth = pixels.shape
    header = struct.pack(">5I", 24 + len(name) + 1, 1, width, height, depth) + b"GPAT" + name + b"\0"
    return header + pixels.tobytes()


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Tiny stand-ins for the corpus packages, with the module's roots pointed at them."""
    root = tmp_path / "packages"
    wesnoth = root / "wesnoth"
    save(noise(1, (600, 400)), wesnoth / "core/images/story/landscape-hills.jpg")
    save(noise(2), wesnoth / "core/images/maps/wesnoth.png")
    for i in range(3):
        save(figure_on_black(10 + i, mode="RGBA"), wesnoth / f"core/images/portraits/humans/knight-{i}.png")
    for package, campaign in style_corpus.WESNOTH_CAMPAIGNS.items():
        (wesnoth / "campaigns" / campaign / "images").mkdir(parents=True)
    httt = wesnoth / "campaigns/Heir_To_The_Throne/images"
    save(noise(3), httt / "story/httt_story1.jpg")
    save(noise(4), httt / "story/trow-logo.png")  # text: left out
    save(noise(5), httt / "story/l10n/de/httt_story1.png")  # a translated copy: left out
    save(noise(6), wesnoth / "campaigns/Secrets_of_the_Ancients/images/story/room1.jpg")  # a screenshot: left out

    sky = root / "skycultures"
    for culture, licence in [("western", "CC BY-SA 4.0 International Public License + Free Art License"),
                             ("belarusian", "GNU GPL v2.0"), ("al-sufi", "CC BY-ND 4.0 International Public License"),
                             ("maya", "CC BY-NC-SA 4.0 International Public License"), ("netwar", None)]:
        lines = ["\ufeff[info]", f"name = {culture}"] + ([f"license = {licence}"] if licence else [])
        (sky / culture).mkdir(parents=True)
        (sky / culture / "info.ini").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (sky / culture / "constellationsart.fab").write_text(
            "# abbreviation file x y hip ...\nAri aries.png 10 10 9884\nTau taurus.png 5 5 21421\n", encoding="utf-8")
        save(figure_on_black(20), sky / culture / "aries.png")  # one figure in every culture
        save(figure_on_black(21 + len(culture)), sky / culture / "taurus.png")
    save(noise(30), sky / "western" / "book_cover.png")  # not in constellationsart.fab: left out

    krita = root / "krita"
    krita.mkdir()
    (krita / "paper.pat").write_bytes(gimp_pattern(np.asarray(noise(40, (256, 256)))))
    save(noise(41, (20, 20)), krita / "tiny.png")

    themes = root / "hedgewars"
    for theme in ("Nature", "Cave"):
        save(noise(50 + len(theme), (320, 240)), themes / theme / "LandTex.png")
    save(Image.new("RGB", (512, 256), (90, 140, 220)), themes / "Nature" / "Sky.png")  # flat: near-blank

    gnome = root / "gnome"
    save(noise(60), gnome / "adwaita-d.webp")
    save(noise(61), gnome / "grid-l.webp")

    docs = root / "doc"
    (docs / "hedgewars-data").mkdir(parents=True)
    (docs / "hedgewars-data" / "copyright").write_text(
        "Files: *\nCopyright: 2004 A\nLicense: GPL-2\n\n"
        "Files: share/hedgewars/Data/Themes/Olympics/*\n       share/hedgewars/Data/Themes/Cave/*\n"
        "Copyright: 2011 B\nLicense: GFDL-1.3\n", encoding="utf-8")
    (docs / "krita-data").mkdir()
    (docs / "krita-data" / "copyright").write_text("Files: *\nCopyright: 2023 K\nLicense: GPL-and-LGPL\n")

    for name, path in [("WESNOTH_DATA", wesnoth / ""), ("STELLARIUM_SKYCULTURES", sky), ("KRITA_PATTERNS", krita),
                       ("HEDGEWARS_THEMES", themes), ("GNOME_BACKGROUNDS", gnome), ("DEBIAN_DOCS", docs)]:
        monkeypatch.setattr(style_corpus, name, path)
    return root


def test_licence_filter_keeps_gpl_by_sa_and_free_art_only(fake_packages):
    free = ["GNU GPL v2.0", "CC BY-SA 3.0 Unported", "CC BY-SA 4.0 International Public License + Free Art License",
            "GNU GPL v2.0 + Free Art License"]
    not_free = ["CC BY-ND 4.0 International Public License", "CC BY-NC-SA 4.0 International Public License",
                "CC BY-NC-ND 4.0 International Public license", "CC BY-NC 4.0", "", "Proprietary"]
    assert all(style_corpus.licence_is_free(text) for text in free)
    assert not any(style_corpus.licence_is_free(text) for text in not_free)

    cultures = style_corpus.stellarium_cultures()
    assert sorted(cultures["kept"]) == ["belarusian", "western"]
    assert cultures["skipped"] == {"al-sufi": "CC BY-ND 4.0 International Public License",
                                   "maya": "CC BY-NC-SA 4.0 International Public License",
                                   "netwar": "(none in info.ini)"}
    items = style_corpus.stellarium_items()
    assert sorted(item.name for item in items) == ["stellarium_belarusian_aries", "stellarium_belarusian_taurus",
                                                   "stellarium_western_aries", "stellarium_western_taurus"]
    assert {item.info["licence"] for item in items} == {"GNU GPL v2.0", cultures["kept"]["western"]}


def test_gimp_pattern_pixels_are_read_exactly(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "a.pat").write_bytes(gimp_pattern(rgb))
    image = style_corpus.read_gimp_pattern(tmp_path / "a.pat")
    assert image.mode == "RGB" and image.size == (3, 2)
    assert np.array_equal(np.asarray(image), rgb)

    grey = np.array([[0, 128], [255, 7]], dtype=np.uint8)[..., None]
    (tmp_path / "g.pat").write_bytes(gimp_pattern(grey, name=b"grey"))
    assert np.array_equal(np.asarray(style_corpus.read_gimp_pattern(tmp_path / "g.pat")), grey[..., 0])

    (tmp_path / "bad.pat").write_bytes(b"\0" * 40)
    with pytest.raises(UserError, match="bad.pat: not a GIMP pattern"):
        style_corpus.read_gimp_pattern(tmp_path / "bad.pat")
    (tmp_path / "short.pat").write_bytes(gimp_pattern(rgb)[:-5])
    with pytest.raises(UserError, match="short.pat: truncated"):
        style_corpus.read_gimp_pattern(tmp_path / "short.pat")


def test_crop_to_art_cuts_the_black_border():
    image = figure_on_black(0, size=(300, 200), box=(100, 50, 200, 130))  # art 100 × 80
    cropped = style_corpus.crop_to_art(image, margin=0.05)
    assert cropped.size == (100 + 2 * 5, 80 + 2 * 4)
    assert np.array_equal(np.asarray(cropped)[4:-4, 5:-5], np.asarray(image)[50:130, 100:200])
    transparent = style_corpus.flatten_on_black(figure_on_black(0, mode="RGBA"))
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (0, 0, 0)
    assert style_corpus.crop_to_art(Image.new("RGB", (50, 40))).size == (50, 40)  # no art: unchanged


def test_corpus_sources_record_licence_package_and_path(fake_packages):
    items = style_corpus.corpus_items()
    by_name = {item.name: item for item in items}
    assert "wesnoth_story_httt_story_httt_story1" in by_name
    assert not any("logo" in name or "room1" in name or "l10n" in item.info["source"] for name, item in by_name.items())
    assert by_name["hedgewars_cave_landtex"].info["licence"] == "GFDL-1.3"
    assert by_name["hedgewars_nature_landtex"].info["licence"] == "GPL-2"
    assert by_name["krita_paper"].info["licence"] == "GPL-and-LGPL"
    assert by_name["gnome_adwaita_d"].info["licence"].startswith("CC-BY-SA-3.0")
    for item in items:
        assert item.kind == "style" and item.info["licence"] and item.info["source_package"] in item.info["source"]
        assert item.info["source_path"] in item.info["source"]

    kept, dropped = style_corpus.select_usable(items, seed=0)
    reasons = {}
    for d in dropped:
        reasons.setdefault(d["source"].rsplit("/", 1)[1], []).append(d["reason"])
    assert reasons["tiny.png"][0].startswith("short side 20 px")
    assert reasons["Sky.png"][0].startswith("near-blank")
    assert any(r.startswith("duplicate of") for r in reasons["aries.png"])  # the same figure in two cultures
    assert {item.group for item in kept} == {"wesnoth_story", "wesnoth_portrait", "stellarium", "krita",
                                            "hedgewars", "gnome"}
    portraits = [item for item in kept if item.group == "wesnoth_portrait"]
    assert len(portraits) <= style_corpus.GROUP_CAPS["wesnoth_portrait"] * len(kept)
    assert all(item.load().size == (220 + 2 * 11, 210 + 2 * 10) for item in portraits)  # cropped to the figure


def test_missing_corpus_packages_are_one_line_naming_them(monkeypatch, tmp_path):
    monkeypatch.setattr(style_corpus, "WESNOTH_DATA", tmp_path / "none")
    monkeypatch.setattr(style_corpus, "KRITA_PATTERNS", tmp_path / "none")
    with pytest.raises(UserError) as error:
        data.build_training_set(tmp_path / "out", size=32, styles="corpus")
    message = str(error.value)
    assert "\n" not in message and "apt-get install wesnoth-1.16-data wesnoth-1.16-did" in message
    assert "krita-data" in message and "wesnoth-1.16-utbs" in message and "stellarium-data" not in message
    assert not (tmp_path / "out").exists()


def corpus_like_items():
    """The classic set (22 stand-in paintings, 3 of them named by the default --val-styles, plus Starry Night)
    and two corpus groups of 20 families, with traps for the split: "story_00_enlarged" is story_00 at twice the
    size under another family, and "sky_00_other_culture" is sky_00 a few grey levels brighter."""
    def image(seed):
        return lambda: noise(seed)

    def enlarged():
        return noise(300).resize((480, 400))

    def brighter():
        return Image.fromarray(np.clip(np.asarray(noise(400)).astype(int) + 3, 0, 255).astype(np.uint8))

    classic = [Item(f"gcompris_p{i:02d}", "style", "gcompris", image(i)) for i in range(19)]
    titles = {"gcompris_GreatWave": "Hokusai, The Great Wave", "gcompris_compo8": "Kandinsky, Composition VIII",
              "gcompris_joconde": "Leonardo da Vinci, Mona Lisa"}
    classic += [Item(name, "style", "gcompris", image(100 + i), {"title": title})
                for i, (name, title) in enumerate(titles.items())]
    classic.append(Item("opencv_starry_night", "style", "opencv", image(200), {"title": "The Starry Night"}))
    corpus = [Item(f"story_{i:02d}", "style", "wesnoth_story", image(300 + i), family=f"story:{i}")
              for i in range(19)]
    corpus.append(Item("story_00_enlarged", "style", "wesnoth_story", enlarged, family="story:enlarged"))
    corpus += [Item(f"sky_{i:02d}", "style", "stellarium", image(400 + i), family=f"sky:{i}") for i in range(20)]
    corpus.append(Item("sky_00_other_culture", "style", "stellarium", brighter, family="sky:0"))
    for item in classic + corpus:
        item.info["source"] = item.name
    return classic, corpus


def split_corpus(seed):
    classic, corpus = corpus_like_items()
    kept, _ = style_corpus.select_usable(corpus, seed)
    items = classic + kept
    data.assign_splits(items, 0.1, seed, data.DEFAULT_VAL_STYLES, style_val_fraction=0.1)
    return items


def test_capped_groups_keep_their_share_of_the_set():
    _, corpus = corpus_like_items()  # wesnoth_story and stellarium images, as the screening keeps them
    portraits = [Item(f"portrait_{i:02d}", "style", "wesnoth_portrait", lambda: None) for i in range(30)]
    kept, capped = style_corpus._cap_groups(corpus + portraits, seed=0)
    assert len(kept) + len(capped) == len(corpus) + len(portraits)
    for group, share in style_corpus.GROUP_CAPS.items():
        n = sum(item.group == group for item in kept)
        assert share * len(kept) - 1 <= n <= share * len(kept)  # binding caps, each at its share
    stories = sum(item.group == "wesnoth_story" for item in corpus)
    assert sum(item.group == "wesnoth_story" for item in kept) == stories  # the uncapped group is whole
    again, _ = style_corpus._cap_groups(corpus + portraits, seed=0)
    assert [item.name for item in again] == [item.name for item in kept]
    stories_only = [item for item in corpus if item.group == "wesnoth_story"]
    few, none = style_corpus._cap_groups(stories_only + portraits[:3], seed=0)
    assert len(few) == stories + 3 and not none  # a cap that does not bind drops nothing


def test_corpus_split_is_seeded_holds_out_the_classics_and_never_splits_a_picture(monkeypatch):
    monkeypatch.setattr(style_corpus, "GROUP_CAPS", {"wesnoth_portrait": 0.25})  # this test is about the split
    items = split_corpus(seed=0)
    val = sorted(item.name for item in items if item.split == "val")
    assert val == sorted(item.name for item in split_corpus(seed=0) if item.split == "val")
    assert val != sorted(item.name for item in split_corpus(seed=1) if item.split == "val")
    assert {"opencv_starry_night", "gcompris_GreatWave", "gcompris_compo8", "gcompris_joconde"} <= set(val)
    assert sum(item.split == "val" for item in items if item.group == "gcompris") == 3  # only the named ones
    for group in ("wesnoth_story", "stellarium"):
        assert 2 <= sum(item.split == "val" for item in items if item.group == group) <= 5

    def fingerprints(split):
        for item in items:
            if item.split == split:
                image = item.load()
                yield hashlib.sha256(image.tobytes()).hexdigest(), style_corpus.difference_hash(image)

    train, held_out = list(fingerprints("train")), list(fingerprints("val"))
    assert not {sha for sha, _ in train} & {sha for sha, _ in held_out}
    assert min(bin(a ^ b).count("1") for _, a in train for _, b in held_out) > style_corpus.NEAR_IDENTICAL_BITS
    by_name = {item.name: item for item in items}
    assert by_name["story_00_enlarged"].family == by_name["story_00"].family  # joined by the perceptual hash
    assert by_name["story_00_enlarged"].split == by_name["story_00"].split
    assert by_name["sky_00_other_culture"].split == by_name["sky_00"].split


@pytest.mark.slow
@needs_media
@pytest.mark.skipif(not all(p.is_dir() for p in style_corpus.required_packages().values()),
                    reason="needs the corpus packages (see `mambast data build --styles corpus`)")
def test_real_corpus_build(tmp_path):
    manifest = data.build_training_set(tmp_path, size=64, styles="corpus")
    style = [f for f in manifest["files"] if f["kind"] == "style"]
    assert len(style) >= 300 and manifest["counts"]["style"]["val"] >= 40
    assert len({f["source_group"] for f in style if f["split"] == "val"}) >= 4
    train = {f["perceptual_hash"] for f in style if f["split"] == "train" and "perceptual_hash" in f}
    assert not train & {f["perceptual_hash"] for f in style if f["split"] == "val" and "perceptual_hash" in f}
    for f in manifest["files"]:
        assert hashlib.sha256((tmp_path / f["path"]).read_bytes()).hexdigest() == f["sha256"]
