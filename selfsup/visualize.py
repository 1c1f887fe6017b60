"""Pictures from a trained run.

    python -m selfsup.visualize attention --checkpoint RUN --image PATH --out FILE.png
    python -m selfsup.visualize reconstruction --checkpoint RUN --image PATH --out FILE.png

- attention: the last block's [CLS] self-attention, one map per head, over the image (DINO's
  signature picture: the heads attend to the object without ever seeing a label).
- reconstruction: original | masked | reconstruction for an MAE run (the visible patches are
  pasted back; with norm_pix the predicted patches are un-normalized with the target patch's
  own mean and variance, as the paper's figures do).

The image goes through the run's own evaluation preprocessing (size, channels, normalization).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import build_loader, get_recipe
from .data.datasets import decode_image
from .engine.checkpoint import CheckpointError, load_method

# viridis-like anchors: perceptually ordered dark blue -> green -> yellow
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                 dtype=np.float64)
TILE = 160  # pixels per panel side


def colormap(v: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    x = np.clip(v, 0, 1) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    frac = (x - lo)[..., None]
    return (_CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac).astype(np.uint8)


def preprocess(path: str, cfg) -> torch.Tensor:
    """The run's eval transform on one image file: (1, C, H, W) normalized."""
    img = decode_image(path, "RGB" if cfg.in_chans == 3 else "L")
    loader = build_loader((img[None], np.zeros(1, np.int64)), "eval", 1, img_size=cfg.img_size,
                          in_chans=cfg.in_chans, drop_last=False, device="portable")
    views, _ = next(iter(loader))
    return views[0]


def to_uint8(x: torch.Tensor, cfg) -> np.ndarray:
    """(C, H, W) normalized -> (H, W, 3) uint8, undoing the recipe's mean/std."""
    r = get_recipe("eval", cfg.img_size, cfg.in_chans)
    mean = torch.tensor(r.mean).view(-1, 1, 1)
    std = torch.tensor(r.std).view(-1, 1, 1)
    img = (x.float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    img = img.permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def tile(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a).resize((TILE, TILE), Image.NEAREST)


def grid(panels: list[Image.Image], cols: int) -> Image.Image:
    rows = -(-len(panels) // cols)
    out = Image.new("RGB", (cols * TILE, rows * TILE), "white")
    for i, p in enumerate(panels):
        out.paste(p, ((i % cols) * TILE, (i // cols) * TILE))
    return out


@torch.no_grad()
def attention_picture(vit, x: torch.Tensor, cfg) -> Image.Image:
    attn = vit.get_last_selfattention(x)  # (1, heads, 1 + L, 1 + L)
    gh, gw = x.shape[-2] // vit.patch_size, x.shape[-1] // vit.patch_size
    maps = attn[0, :, 0, 1:].reshape(-1, 1, gh, gw).float()  # cls row, one map per head
    maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest")[:, 0]
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy()
    image = to_uint8(x[0], cfg).astype(np.float64)
    # each head's map blended over the (greyed) image so the object stays readable
    grey = image.mean(axis=2, keepdims=True)
    panels = [tile(image.astype(np.uint8))] + [
        tile((0.35 * grey + 0.65 * colormap(m)).astype(np.uint8)) for m in maps]
    return grid(panels, cols=min(len(panels), 7))


@torch.no_grad()
def reconstruction_picture(method, x: torch.Tensor, cfg, seed: int = 0) -> Image.Image:
    from .kernels import patchify, random_masking, unpatchify

    vit, p = method.backbone, method.backbone.patch_size
    g = torch.Generator(device=x.device).manual_seed(seed)
    ids_keep, ids_restore, mask = random_masking(1, vit.num_patches, method.mask_ratio,
                                                 device=x.device, generator=g)
    pred = method.decoder(vit.forward_features(x, ids_keep=ids_keep), ids_restore).float()
    target = patchify(x.float(), p)  # (1, L, p*p*C)
    if method.norm_pix:  # predictions are in per-patch normalized units
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    m = mask[..., None].float()  # (1, L, 1), 1 = removed
    size = tuple(x.shape[-2:])
    masked = unpatchify(target * (1 - m), p, image_size=size)
    recon = unpatchify(target * (1 - m) + pred * m, p, image_size=size)
    panels = [tile(to_uint8(t[0], cfg)) for t in (x, masked, recon)]
    return grid(panels, cols=3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfsup.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["attention", "reconstruction"])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0, help="reconstruction: the mask's seed")
    args = ap.parse_args(argv)
    try:
        method, cfg, _ = load_method(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    encoder = method.encoder()
    if not hasattr(encoder, "get_last_selfattention"):
        print(f"error: {args.kind} pictures need a ViT; this run is --arch {cfg.arch}",
              file=sys.stderr)
        return 2
    if args.kind == "reconstruction" and not hasattr(method, "decoder"):
        print(f"error: reconstruction needs an MAE run; this run is --method {cfg.method}",
              file=sys.stderr)
        return 2
    x = preprocess(args.image, cfg)
    pic = (attention_picture(encoder, x, cfg) if args.kind == "attention"
           else reconstruction_picture(method, x, cfg, args.seed))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pic.save(args.out)
    print(f"wrote {args.out} ({pic.width}x{pic.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
