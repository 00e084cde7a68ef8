"""`mambast convert-official`: the three official .pth files -> our safetensors + config folder."""
from __future__ import annotations

from pathlib import Path

from models.checkpoint import load_official, model_config, save_model
from models.errors import UserError


def register(sub):
    p = sub.add_parser("convert-official", help="convert the official Mamba-ST checkpoints to our format")
    p.add_argument("--mamba", required=True, help="mamba_iter_N.pth")
    p.add_argument("--decoder", required=True, help="decoder_iter_N.pth")
    p.add_argument("--embedding", required=True, help="embedding_iter_N.pth")
    p.add_argument("--config", default="official", help="model config name or YAML (default: official)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.output)
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise UserError(f"{out}: already holds a model (use --overwrite)")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: output folder's parent does not exist")
    model = load_official(args.mamba, args.decoder, args.embedding, model_config(args.config))
    meta = {"source": "official Mamba-ST checkpoints",
            "files": [Path(f).name for f in (args.mamba, args.decoder, args.embedding)]}
    save_model(model, out, meta=meta)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}/model.safetensors ({n:,} parameters) and {out}/config.yaml")
    return 0
