"""Packaged media (jobs/assets.py) and `mambast data build` (jobs/data.py)."""
import argparse
import json

import pytest
from PIL import Image

from jobs import assets, data
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
    photos = [data.Item(f"p{i:02d}", "content", "photos", blank) for i in range(40)]
    frames = [data.Item(f"clip_f{i:04d}", "content", "clip_x", blank) for i in range(0, 500, 25)]
    titles = {"great_wave": "Hokusai, The Great Wave", "kandinky": "Wassily Kandinsky, Composition VIII",
              "mona_lisa": "Leonardo, Mona Lisa"}
    styles = [data.Item(name, "style", "paintings", blank, {"title": title}) for name, title in titles.items()]
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
