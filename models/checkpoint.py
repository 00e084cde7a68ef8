"""Loading and saving Mamba-ST weights.

Our format: a folder (or a `.safetensors` file with a `.yaml` of the same stem beside it) holding
`model.safetensors` (keys `embedding.*`, `mamba.*`, `decode.*`) and `config.yaml` (the `MambaSTConfig`, plus a
free-form `meta` map). The official release is three plain `.pth` state_dicts; `load_official` reads them with
`torch.load(weights_only=True)` only, so a pickle that would run code is refused, not executed.

Every problem is one `UserError` line naming the file: missing, not a checkpoint, missing/unexpected keys,
wrong shapes, non-finite values.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.errors import UserError
from models.mambast import MambaST, MambaSTConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
OFFICIAL_PARTS = ("mamba", "decode", "embedding")  # official file -> our submodule


class _NoAliasSafeLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in this file",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: str | os.PathLike) -> dict:
    """A user's YAML file (preset, job file, training recipe, model config) as a mapping: SafeLoader only, without
    anchors and aliases; a python tag, an alias or a syntax error is a one-line UserError."""
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_NoAliasSafeLoader)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({' '.join(str(e).split())[:120]})") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML ({problem[:120]}{where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def model_config(name_or_path: str | os.PathLike) -> MambaSTConfig:
    """'official', 'small', or a path to a model YAML."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    try:
        return MambaSTConfig.from_dict(read_yaml(path))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Checking a state dict against a model


def check_state_dict(sd: dict, expected: dict[str, torch.Size], source: str) -> None:
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{source}: not a checkpoint (expected a state_dict of tensors)")
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing:
        raise UserError(f"{source}: missing {len(missing)} key(s), e.g. {missing[0]!r} "
                        f"(is this the right file for this model config?)")
    if extra:
        raise UserError(f"{source}: {len(extra)} unexpected key(s), e.g. {extra[0]!r}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise UserError(f"{source}: {k!r} has shape {tuple(sd[k].shape)}, the model expects {tuple(shape)} "
                            f"(a different model config?)")
        if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all():
            raise UserError(f"{source}: {k!r} contains NaN or infinite values")


def _expected(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def torch_load_safe(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; any failure becomes one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights only load failed" in str(e).lower() or "unsupported" in str(e).lower():
            raise UserError(f"{path}: refused: the file holds Python objects beyond tensors, which could run code "
                            f"when loaded ({first[:120]})") from None
        raise UserError(f"{path}: not a PyTorch checkpoint ({first[:120]})") from None
    except Exception as e:  # legacy-format parsing fails with anything from struct.error to EOFError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(f"{path}: not a PyTorch checkpoint ({detail})") from None


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints


def load_official(mamba: str, decoder: str, embedding: str, cfg: MambaSTConfig | None = None) -> MambaST:
    """Build the official-width model and strict-load the three official `.pth` files."""
    model = MambaST(cfg or model_config("official"))
    files = {"mamba": mamba, "decode": decoder, "embedding": embedding}
    for part in OFFICIAL_PARTS:
        module = getattr(model, part)
        sd = torch_load_safe(files[part])
        check_state_dict(sd, _expected(module), str(files[part]))
        module.load_state_dict(sd, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Our format


def save_model(model: MambaST, path: str | os.PathLike, meta: dict | None = None, half: bool = False) -> Path:
    """Write `path/model.safetensors` + `path/config.yaml` atomically (temporary names, then rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    doc = {"model": model.cfg.to_dict(), "meta": meta or {}}
    for name, write in (("model.safetensors", lambda p: save_file(sd, p)),
                        ("config.yaml", lambda p: Path(p).write_text(yaml.safe_dump(doc, sort_keys=False)))):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be shared
            os.replace(tmp, path / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def available_memory() -> int:
    """Bytes this process may still allocate: the least of the memory the kernel reports available, the cgroup's
    limit less its usage, and MAMBAST_MEMORY_GB when set (for tests and for sharing a machine)."""
    limits = []
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2**60:
                limits.append(int(limit) - int(usage))
        except (OSError, ValueError):
            continue
    if os.environ.get("MAMBAST_MEMORY_GB"):
        try:
            limits.append(int(float(os.environ["MAMBAST_MEMORY_GB"]) * 2**30))
        except ValueError:
            raise UserError(f"MAMBAST_MEMORY_GB: must be a number of gigabytes, got "
                            f"{os.environ['MAMBAST_MEMORY_GB'][:40]!r}") from None
    return max(0, min(limits)) if limits else 2**62


def estimated_parameters(cfg: MambaSTConfig) -> int:
    """About how many parameters a config's model has (never more than ~2x too few), from its widths alone: the
    size is checked before anything is allocated (a `d_model: 30000` would need hundreds of GB)."""
    d, di, ds, dt = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
    layer = 3 * d * di + di * (3 * ds + dt + 6)
    layers = 2 * cfg.n_encoder_layers + 2 * cfg.n_decoder_layers
    channels = (d, *cfg.decoder_channels, 3)
    decoder = sum(9 * a * b for a, b in zip(channels, channels[1:]))
    return layers * layer + decoder + 3 * d * cfg.patch_size ** 2


def _check_model_size(cfg: MambaSTConfig, config: Path, weights: Path, sd: dict | None) -> None:
    """Refuse, before the model is built, a config whose model would not fit in memory or does not match the
    weights file (far more parameters than the file holds)."""
    needed = estimated_parameters(cfg) * 4
    if needed > available_memory():
        raise UserError(f"{config}: this model config (d_model {cfg.d_model}, d_state {cfg.d_state}) needs about "
                        f"{needed / 2**30:.1f} GB for its weights alone; {available_memory() / 2**30:.1f} GB is "
                        f"available")
    if sd is not None:
        held = sum(t.numel() for t in sd.values())
        if needed / 4 > 4 * held + 10**6:
            raise UserError(f"{config}: this model config (d_model {cfg.d_model}) makes about "
                            f"{needed / 4 / 1e6:.0f} M parameters, but {weights.name} holds {held / 1e6:.1f} M: "
                            f"the config does not match the weights")


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / "model.safetensors", path / "config.yaml"
    return path, path.with_suffix(".yaml")


def read_model_config(path: str | os.PathLike | None = None, **overrides) -> MambaSTConfig:
    """The model config stored with weights in our format (default: the bundled ones), without loading them."""
    path = Path(path) if path is not None else BUNDLED_DIR
    _, config = _locate(path)
    doc = read_yaml(config)
    try:
        return MambaSTConfig.from_dict({**(doc.get("model") or {}), **overrides})
    except (TypeError, ValueError) as e:
        raise UserError(f"{config}: {str(e)[:200]}") from None


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               **overrides) -> MambaST:
    """Load our format (default: the bundled weights). `overrides` set config fields (e.g. scan_backend)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise UserError(f"weights: expected a checkpoint folder or file path, got {type(path).__name__}")
    path = Path(path) if path is not None else BUNDLED_DIR
    weights, config = _locate(path)
    if not weights.exists():
        raise UserError(f"{weights}: file not found" + (" (bundled weights missing: reinstall the package)"
                                                        if path == BUNDLED_DIR else ""))
    if weights.suffix == ".pth":
        raise UserError(f"{weights}: an official .pth file; convert it first: "
                        f"mambast convert-official --mamba M --decoder D --embedding E -o DIR")
    cfg = read_model_config(path, **overrides)
    doc = read_yaml(config)
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights}: not a safetensors checkpoint ({str(e).splitlines()[0][:120]})") from None
    _check_model_size(cfg, config, weights, sd)
    model = MambaST(cfg)
    check_state_dict(sd, _expected(model), str(weights))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.meta = doc.get("meta", {})
    return model.eval().to(device)
