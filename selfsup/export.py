"""Export a run's backbone for use elsewhere.

    python -m selfsup.export --checkpoint RUN --out FILE [--format safetensors|torch]

ViTs are written with timm's VisionTransformer key names (cls_token, pos_embed,
patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm);
ResNets with torchvision's. safetensors when installed (the default then), else torch.save.
`load_exported` reads either format back.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from .engine.checkpoint import CheckpointError, load_method
from .models import export_state_dict


def save_weights(sd: dict[str, torch.Tensor], out: str | Path, fmt: str = "auto") -> str:
    """Write a flat tensor dict; returns the format used."""
    have_st = importlib.util.find_spec("safetensors") is not None
    if fmt == "auto":
        fmt = "safetensors" if have_st else "torch"
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if fmt == "safetensors":
        if not have_st:
            raise RuntimeError("--format safetensors needs `pip install safetensors`")
        from safetensors.torch import save_file

        save_file(sd, str(out))
    else:
        torch.save(sd, out)
    return fmt


def load_exported(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an exported file (safetensors or torch), never executing code."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip or legacy pickle
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors.torch import load_file

    return load_file(str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfsup.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", choices=["auto", "safetensors", "torch"], default="auto")
    args = ap.parse_args(argv)
    try:
        method, cfg, _ = load_method(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sd = export_state_dict(method.encoder())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fmt = save_weights(sd, args.out, args.format)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.out}: {cfg.arch} backbone, {len(sd)} tensors, {n / 1e6:.2f}M values "
          f"({fmt}, {'timm' if cfg.arch.startswith('vit') else 'torchvision'} key names)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
