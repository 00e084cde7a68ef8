"""Strict loading of official-format checkpoints built from the keys file, our format, and bad files."""
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from jobs.cli import main
from models.checkpoint import load_model, load_official, save_model
from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig

KEYS_FILE = Path(__file__).resolve().parents[2] / "shared" / "official-mambast-keys.json"
OFFICIAL_FILES = {"mamba": "mamba_iter_N.pth", "decoder": "decoder_iter_N.pth", "embedding": "embedding_iter_N.pth"}


def official_keys() -> dict:
    if KEYS_FILE.exists():
        return json.loads(KEYS_FILE.read_text())["files"]
    # Outside the dev checkout: the same key list, from our official-width model's modules.
    model = MambaST(MambaSTConfig())
    return {OFFICIAL_FILES[p]: {k: list(v.shape) for k, v in getattr(model, m).state_dict().items()}
            for p, m in (("mamba", "mamba"), ("decoder", "decode"), ("embedding", "embedding"))}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """The three official .pth files with random tensors of the listed shapes (plain state_dicts)."""
    d = tmp_path_factory.mktemp("official")
    g = torch.Generator().manual_seed(0)
    paths = {}
    for part, fname in OFFICIAL_FILES.items():
        sd = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in official_keys()[fname].items()}
        paths[part] = d / fname.replace("N", "160000")
        torch.save(sd, paths[part])
    return paths


def test_keys_file_matches_our_module_names():
    model = MambaST(MambaSTConfig())
    for part, module in (("mamba", model.mamba), ("decoder", model.decode), ("embedding", model.embedding)):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == official_keys()[OFFICIAL_FILES[part]]


def test_strict_load_and_forward(official_files):
    model = load_official(official_files["mamba"], official_files["decoder"], official_files["embedding"])
    sd = torch.load(official_files["mamba"], weights_only=True)
    assert torch.equal(model.mamba.decoder.layers[1].self_attention.style_proj_weight,
                       sd["decoder.layers.1.self_attention.style_proj_weight"])
    code = model.encode_style(torch.rand(1, 3, 40, 40), model.token_grid(24, 40), seed=0)
    out = model.stylize(torch.rand(1, 3, 24, 40), code)
    assert out.shape == (1, 3, 24, 40) and torch.isfinite(out).all()


def test_convert_official_round_trip(official_files, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert-official", "--mamba", str(official_files["mamba"]), "--decoder",
                 str(official_files["decoder"]), "--embedding", str(official_files["embedding"]), "-o", str(out)]) == 0
    a = load_official(official_files["mamba"], official_files["decoder"], official_files["embedding"])
    b = load_model(out)
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_save_and_load_our_format(tmp_path):
    model = MambaST(MambaSTConfig(d_model=32, d_state=4, decoder_channels=[8, 8, 8]))
    save_model(model, tmp_path / "m", meta={"note": "x"})
    loaded = load_model(tmp_path / "m", scan_backend="ref")
    assert loaded.cfg.scan_backend == "ref" and loaded.meta == {"note": "x"}
    assert not list((tmp_path / "m").glob("*.tmp"))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mambast-pwned",))


def _official_with(official_files, tmp_path, mutate):
    sd = torch.load(official_files["mamba"], weights_only=True)
    bad = tmp_path / "mamba_bad.pth"
    mutate(sd, bad)
    return bad


@pytest.mark.parametrize("case, message", [
    ("missing_key", "missing 1 key"),
    ("extra_key", "unexpected key"),
    ("wrong_shape", "has shape"),
    ("nan", "NaN"),
    ("not_checkpoint", "not a PyTorch checkpoint"),
    ("runs_code", "refused"),
    ("not_a_dict", "not a checkpoint"),
    ("missing_file", "file not found"),
])
def test_bad_official_checkpoints_give_one_clear_error(official_files, tmp_path, case, message):
    def mutate(sd, path):
        if case == "missing_key":
            sd.pop("decoder.norm.weight")
        elif case == "extra_key":
            sd["decoder.layers.9.extra"] = torch.zeros(1)
        elif case == "wrong_shape":
            sd["decoder.norm.weight"] = torch.zeros(256)
        elif case == "nan":
            sd["decoder.norm.weight"][0] = float("nan")
        if case == "not_checkpoint":
            path.write_bytes(b"this is not a checkpoint at all\n" * 10)
        elif case == "runs_code":
            with open(path, "wb") as f:
                pickle.dump({"x": RunsCode()}, f)
        elif case == "not_a_dict":
            torch.save([1, 2, 3], path)
        elif case != "missing_file":
            torch.save(sd, path)

    bad = _official_with(official_files, tmp_path, mutate)
    if os.path.exists("/tmp/mambast-pwned"):
        os.unlink("/tmp/mambast-pwned")
    with pytest.raises(UserError, match=message) as err:
        load_official(bad, official_files["decoder"], official_files["embedding"])
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists("/tmp/mambast-pwned")


def test_cli_reports_bad_checkpoint_in_one_line(official_files, tmp_path, capsys):
    bad = tmp_path / "junk.pth"
    bad.write_text("junk")
    out = tmp_path / "out"
    code = main(["convert-official", "--mamba", str(bad), "--decoder", str(official_files["decoder"]),
                 "--embedding", str(official_files["embedding"]), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "junk.pth" in err
    assert not out.exists()


def test_bad_safetensors(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    (d / "config.yaml").write_text("model: {d_model: 32}\n")
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        load_model(d)
    (d / "config.yaml").write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_model(d)
