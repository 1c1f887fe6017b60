"""Which method preset a run gets: the papers' ImageNet one, or the small-image one.

`--preset imagenet|small` chooses; without it the training images decide: `small` when they
are at most SMALL_MAX_PX on their longer side (CIFAR, STL at 64, Fashion-MNIST), `imagenet`
otherwise. The built-in datasets are 28 px and decide without reading a file; an image folder
decides from the median size of up to SAMPLE_FILES of its files, read from their headers
(Pillow's lazy open parses the header, never the pixels), so a million-image folder costs the
cached scan the loader does anyway plus 64 header reads. --img-size does not decide: it says
what the images are resized to, not what they are (a 28-px garment at --img-size 224 is
still a 28-px garment).

config.resolve applies defaults < Method.preset(arch) < Method.small_preset(arch) (when
small) < the command line; resolve_method / resolve_cli (config.py) are the one way to do
all of it, used by train.py and by every test that checks what train.py would run.
"""

from __future__ import annotations

import statistics
from pathlib import Path

PRESETS = ("imagenet", "small")
SMALL_MAX_PX = 64  # the longer side at or below which images are "small"
SAMPLE_FILES = 64  # image headers read to size a folder
BUILTIN_PX = {"fashion-mnist": 28, "fashion_mnist": 28, "fmnist": 28,
              "fashion-mnist-sample": 28, "mnist": 28}
# What the small preset changes whatever the method: the images are resized to 32 px (the
# loader's default for arrays of <= 64 px; a folder would otherwise be resized to 224, 50x the
# pixels, and lose the CIFAR stem / patch 4 that build_encoder gives images <= 64 px).
SMALL_COMMON = {"img_size": 32}


def image_px(data: str, *, sample: int = SAMPLE_FILES) -> int | None:
    """The longer side of the training images of --data in pixels: 28 for the built-in sets,
    the median over up to `sample` evenly spaced files of a folder (its train/ split when it
    has one, as the loader reads), or None when it cannot be told (no such folder, no
    readable image): the loader then reports the problem with the data itself."""
    name = str(data)
    if name in BUILTIN_PX:
        return BUILTIN_PX[name]
    root = Path(name)
    if not root.is_dir():
        return None
    from ..data.datasets import IMG_EXTENSIONS, train_folder
    from ..data.scan import scan_images

    folder = train_folder(root)
    files = scan_images(folder, IMG_EXTENSIONS)
    if not files:
        return None
    step = max(1, len(files) // sample)
    sides = [s for f in files[::step][:sample] if (s := _longer_side(folder / f)) is not None]
    return int(statistics.median_low(sides)) if sides else None


def _longer_side(path: Path) -> int | None:
    """max(width, height) from the file's header; None when Pillow cannot read it (the
    loader's corrupt-file policy deals with such files, not the preset choice)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # lazy: parses the header only
            return max(im.size)
    except Exception:  # noqa: BLE001 - Pillow raises many types on garbage
        return None


def check_preset(name) -> None:
    if name is not None and name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")


def choose(cli: dict, px: int | None) -> tuple[str, str]:
    """(preset, why) for the flags given and the images' size in pixels (None: unknown)."""
    given = cli.get("preset")
    check_preset(given)
    if given is not None:
        return given, f"--preset {given}"
    if px is None:
        return "imagenet", "image size unknown; --preset small for images <= 64 px"
    if px <= SMALL_MAX_PX:
        return "small", f"images {px} px <= {SMALL_MAX_PX}; --preset imagenet to override"
    return "imagenet", f"images {px} px > {SMALL_MAX_PX}; --preset small to override"


def describe(cfg) -> str:
    """The start-of-run line: `preset: small (images 28 px <= 64; --preset imagenet to
    override)`."""
    why = cfg.extra.get("preset_why")
    if cfg.preset is None:
        return "preset: none (the config was built without a method preset)"
    return f"preset: {cfg.preset}" + (f" ({why})" if why else "")
