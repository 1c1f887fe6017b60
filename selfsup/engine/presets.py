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

Under the small preset, cap_warmups (called by the trainer once the schedule's length in steps
is known) caps each warm-up the command line did not give to 10% of the schedule.
"""

from __future__ import annotations

import statistics
from pathlib import Path

PRESETS = ("imagenet", "small")
SMALL_MAX_PX = 64  # the longer side at or below which images are "small"
SAMPLE_FILES = 64  # image headers read to size a folder
BUILTIN_PX = {"fashion-mnist": 28, "fashion_mnist": 28, "fmnist": 28,
              "fashion-mnist-sample": 28, "mnist": 28}
# What the small preset changes whatever the method, all of it about the images' size and the
# backbone, none of it about one dataset (small_common below).
SMALL_DEFAULT_PX = 32  # the training size when the images' own size is not known
CPU_RESNETS = ("resnet_tiny",)  # the ResNets sized for a CPU (selfsup.models.resnet)


def small_common(arch: str | None, px: int | None) -> dict:
    """The small preset's method-independent part for --arch `arch` on images of `px` pixels.

    - img_size: the images' own size (28 for Fashion-MNIST, 32 for CIFAR, 64 for STL at 64),
      SMALL_DEFAULT_PX when it is not known. Upsampling 28 to 32 px adds 31% of the pixels
      and no detail; a folder would otherwise be resized to 224, 50x the pixels, and lose the
      CIFAR stem / patch 4 that build_encoder gives images <= 64 px.
    - For the CPU ResNet (resnet_tiny): its ImageNet stem (7x7/2 conv + 3x3/2 max-pool), not
      the CIFAR stem that ResNet-18/50 get below 64 px as in the papers' CIFAR recipes. On
      28-px images the CIFAR stem runs layer1 at 28x28 instead of 7x7: 8.2x the CPU time per
      image (fwd+bwd at batch 128 on one Zen 4 core in bf16: 493 against 4035 img/s), so a
      10-minute run sees ~1 epoch instead of ~10, and short runs are bound by their steps
      (docs/presets.md has the measurement). --cifar-stem gives it back.
    - NHWC (channels_last) for every ResNet: oneDNN's and cuDNN's fast convolution layout,
      the same numbers.
    """
    out = {"img_size": px if px and px <= SMALL_MAX_PX else SMALL_DEFAULT_PX}
    if arch and not arch.startswith("vit"):
        out["channels_last"] = True
    if arch in CPU_RESNETS:
        out["cifar_stem"] = False
    return out


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


# ----------------------------------------------------------------------------- warm-up caps
# The small preset keeps the ImageNet preset's warm-ups, which are sized in epochs for runs of
# 100-1000 epochs (the papers warm up over 1-5% of a run). A Fashion-MNIST run of 5000 steps is
# ~11 epochs at batch 128, so 10 warm-up epochs would be almost all of it. Under the small
# preset, each warm-up the command line did not give is capped to WARMUP_CAP of the schedule.
# The ImageNet presets are left alone: at their own length they are the papers' (MoCo v3 ViT
# warms up 40 of 300 epochs, DINOv2 80 of 500, DINO's teacher 30 of 100, all above the cap), and
# the recorded quality rows ran on them.
WARMUP_CAP = 0.1  # the largest share of the schedule a preset's warm-up may take
# field -> what the printed line calls it. Each is a stretch at the start of the run measured
# in epochs whose length is about stability, not about the schedule's end state:
CAPPED = {
    "warmup_epochs": "warm-up",  # linear lr warm-up (every method)
    # DINO / iBOT / DINOv2: the teacher temperature rises 0.04 -> 0.07; reached sooner, same end
    "warmup_teacher_temp_epochs": "teacher-temperature warm-up",
    # DINO / iBOT / DINOv2 / SwAV: the head's last layer gets no gradient meanwhile, so a
    # freeze over 10% of a short run is learning lost
    "freeze_last_layer_epochs": "last-layer freeze",
    # SwAV: no queue in the codes before it; the small preset's 50 epochs (solo-learn, of
    # 1000) would mean a queue never used in a run of 11
    "queue_start_epochs": "queue start",
}


def cap_warmups(cfg) -> list[str]:
    """Cap, in place, the preset-given warm-ups of a small-preset config to WARMUP_CAP of its
    schedule (cfg.extra's steps_per_epoch and schedule_steps, set by the trainer before the
    method is built); returns one line per cap for the run to print, and records each in
    cfg.extra["warmup_caps"] (field -> [preset value, capped value], both in epochs). A flag
    the command line gave (cfg.extra["cli_keys"]) is never changed, and nothing changes under
    the ImageNet preset or for a config built without one."""
    if cfg.preset != "small":
        return []
    given = set(cfg.extra.get("cli_keys", ()))
    schedule = cfg.extra["schedule_steps"] / cfg.extra["steps_per_epoch"]  # in epochs
    cap = WARMUP_CAP * schedule
    lines, caps = [], {}
    for name, what in CAPPED.items():
        value = getattr(cfg, name)
        if name in given or value is None or value <= cap:
            continue
        setattr(cfg, name, cap)
        caps[name] = [value, cap]
        lines.append(f"{what}: {value:g} epochs of the preset capped to {cap:.3g} "
                     f"({WARMUP_CAP:.0%} of {schedule:.3g} epochs); give "
                     f"--{name.replace('_', '-')} to override")
    if caps:
        cfg.extra["warmup_caps"] = caps
    return lines


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
