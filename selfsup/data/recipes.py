"""Augmentation recipes: the papers' parameter sets, and the draw of every random choice.

A recipe is a tuple of `View`s (one per output view) plus the normalization. Both backends
(the DALI graph in dali.py and the portable torch/Pillow path in transforms.py) read the same
`View` fields and, for each batch, the same parameter matrix drawn here by `draw_params`:
all randomness is drawn on the host from a generator keyed by (seed, epoch, shard, batch), so
batch i of epoch e is a pure function of those four numbers on every backend.

Per view, per sample, the parameters are (columns of the (B, N_PARAMS) float32 matrix):
  roi      y0, x0, y1, x1: the crop, relative to the source image (0..1), resized to `size`;
           x0 > x1 when mirrored
  flip     1 = mirrored horizontally (already folded into roi)
  bright   brightness factor b            \
  contrast contrast factor c around 128    > one colour twist (DALI's color_twist):
  sat      saturation s (0 = grayscale)   /  out = b*(c*T(s,h)*x + 128*(1-c)), T in YIQ space
  hue      hue rotation in degrees         /
  sigma    Gaussian blur sigma in output pixels, 0 = no blur
  solarize 1 = x -> 255 - x for x >= 128

The papers use torchvision's ColorJitter, which applies its four factors in a random order and
takes contrast around the image mean; here they are one linear twist in a fixed order with the
contrast centre at mid-grey (DALI's definition), and random grayscale is the same twist with
s = 0 (grayscale after jitter: exact, since hue and saturation only move the chroma axes).
On single-channel images only brightness and contrast act; saturation and hue are no-ops.
Crop boxes are continuous (torchvision rounds them to whole pixels).

Normalization (applied to [0, 1] pixels): 3 channels use the ImageNet mean/std; 1 channel uses
their channel average, (0.449,) / (0.226,). Override with mean=/std=.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)
EVAL_CROP = 224 / 256  # ImageFolder eval: resize the shorter side to S*256/224, crop S

# columns of the per-view parameter matrix
ROI, FLIP, BRIGHT, CONTRAST, SAT, HUE, SIGMA, SOLARIZE = slice(0, 4), 4, 5, 6, 7, 8, 9, 10
N_PARAMS = 11
IDENTITY = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], np.float32)


@dataclass(frozen=True)
class View:
    """One output view. Probabilities are per sample; 0 removes the op from the graph."""

    size: int  # output side in pixels (square)
    scale: tuple[float, float] | None = (0.2, 1.0)  # random-resized-crop area; None: fixed crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect-ratio range (log-uniform)
    center_crop: float | None = None  # fixed crop: fraction of the shorter side; None: whole
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # bright, contr, sat, hue
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    # crop+resize interpolation: "linear", or "cubic" (DINO's and MAE's bicubic crops; the
    # fused DALI CPU operator is linear only, so a cubic view runs DALI's stock graph)
    interp: str = "linear"

    @property
    def blur_window(self) -> int:
        """Kernel side: about 10% of the view (SimCLR, BYOL), odd, at least 3."""
        k = int(0.1 * self.size)
        return max(3, k + 1 - k % 2)

    @property
    def has_color(self) -> bool:
        return (self.jitter_p > 0 and any(self.jitter)) or self.gray_p > 0


@dataclass(frozen=True)
class Recipe:
    name: str
    views: tuple[View, ...]
    in_chans: int
    mean: tuple[float, ...]  # per channel, on [0, 1] pixels
    std: tuple[float, ...]
    extra: dict = field(default_factory=dict, compare=False)  # the overrides it was built with

    @property
    def view_sizes(self) -> list[int]:
        return [v.size for v in self.views]

    @property
    def deterministic(self) -> bool:
        return all(v.scale is None for v in self.views)


# ----------------------------------------------------------------------------- the papers
INTERPS = ("linear", "cubic")


def _strong(size, *, scale=(0.2, 1.0), sat=0.4, blur_p=0.5, solarize_p=0.0,
            interp="linear") -> View:
    """MoCo v2 / BYOL / DINO family: crop, flip, jitter p=.8, grey p=.2, blur."""
    return View(size, scale, jitter=(0.4, 0.4, sat, 0.1), jitter_p=0.8, gray_p=0.2,
                blur_p=blur_p, solarize_p=solarize_p, interp=interp)


def _mocov1(s, scale=(0.2, 1.0)):
    # MoCo v1: grayscale p=.2 and ColorJitter(0.4, 0.4, 0.4, 0.4) always, no blur
    v = View(s, scale, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)
    return (v, v)


def _mocov2(s, scale=(0.2, 1.0)):
    # MoCo v2 (and SimSiam): jitter (.4,.4,.4,.1) p=.8, blur p=.5
    v = _strong(s, scale=scale)
    return (v, v)


def _byol(s, scale=(0.08, 1.0)):
    # BYOL (and MoCo v3): jitter (.4,.4,.2,.1) p=.8; view 1 blur p=1, view 2 blur p=.1 +
    # solarize p=.2
    return (_strong(s, scale=scale, sat=0.2, blur_p=1.0),
            _strong(s, scale=scale, sat=0.2, blur_p=0.1, solarize_p=0.2))


def _simclr(s, scale=(0.08, 1.0), strength=1.0):
    # SimCLR (ImageNet): colour distortion of strength s, jitter (.8s,.8s,.8s,.2s) p=.8,
    # grey p=.2, blur p=.5; the same distribution for both views
    v = View(s, scale, jitter=(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength),
             jitter_p=0.8, gray_p=0.2, blur_p=0.5)
    return (v, v)


def _dino(s, global_scale=(0.4, 1.0)):
    # DINO: global 1 blur p=1; global 2 blur p=.1 + solarize p=.2; locals (multi-crop, below)
    # blur p=.5; all crops bicubic, as the official code resizes them
    g1 = _strong(s, scale=global_scale, sat=0.2, blur_p=1.0, interp="cubic")
    g2 = _strong(s, scale=global_scale, sat=0.2, blur_p=0.1, solarize_p=0.2, interp="cubic")
    return (g1, g2)


def _swav(s, global_scale=(0.14, 1.0)):
    # SwAV: SimCLR's colour distortion (strength 1) and blur p=.5 on every crop, the same
    # distribution for all of them; 2 global crops of 0.14-1 (+ locals of 0.05-0.14, below)
    v = View(s, global_scale, jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=0.5)
    return (v, v)


def _mae(s, scale=(0.2, 1.0)):
    # MAE: crop (bicubic, as the official code) + flip only
    return (View(s, scale, interp="cubic"),)


def _eval(s, center_crop=None):
    # deterministic: whole image resized (arrays) or shorter-side centre crop (folders)
    return (View(s, None, center_crop=center_crop, flip_p=0.0),)


RECIPES = {"mocov1": _mocov1, "mocov2": _mocov2, "byol": _byol, "simclr": _simclr,
           "dino": _dino, "swav": _swav, "mae": _mae, "eval": _eval}

# ----------------------------------------------------------------------------- multi-crop
# Multi-crop (Caron et al. 2020): the 2 global views plus n_local small crops, for every
# two-view recipe. The locals' defaults are the papers' where the family uses multi-crop
# (DINO 8 of 0.05-0.4, SwAV 6 of 0.05-0.14) and none elsewhere (an option: n_local=).
MULTICROP_DEFAULTS = {"dino": (8, (0.05, 0.4)), "swav": (6, (0.05, 0.14))}
LOCAL_SCALE = (0.05, 0.4)  # the locals' area range for recipes without a paper default
MULTICROP_KEYS = ("n_local", "local_size", "local_scale")


def local_view(first: View, size: int, scale: tuple[float, float]) -> View:
    """A local crop: the first global view at the local size and crop range, blurred with
    p = .5 if the globals blur at all and never solarized (DINO's and SwAV's locals; BYOL's
    asymmetric 1 / .1 blur pair averages to .5)."""
    return dataclasses.replace(first, size=size, scale=scale, solarize_p=0.0,
                               blur_p=0.5 if first.blur_p > 0 else 0.0)


def with_local_crops(name: str, views: tuple[View, ...], img_size: int, n_local=None,
                     local_size=None, local_scale=None) -> tuple[View, ...]:
    """`views` (2 global) + n_local local crops; None values take the recipe's defaults."""
    n_default, scale_default = MULTICROP_DEFAULTS.get(name, (0, LOCAL_SCALE))
    n_local = n_default if n_local is None else n_local
    if not isinstance(n_local, int) or n_local < 0:
        raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
    size = local_size or dino_local_size(img_size)
    return views + (local_view(views[0], size, local_scale or scale_default),) * n_local


def dino_local_size(img_size: int) -> int:
    """96/224 of the global size, rounded to a multiple of 8, at least 8 (32 -> 16, 224 -> 96)."""
    return max(8, 8 * round(img_size * 96 / 224 / 8))


def get_recipe(name: str, img_size: int, in_chans: int = 3, **overrides) -> Recipe:
    """The recipe `name` at `img_size` px for `in_chans` channels.

    Overrides (None values are ignored): mean=, std= (tuples of length in_chans); blur=False
    drops the Gaussian blur from every view (SimCLR's CIFAR-10 recipe: at 32 px and below a
    blur erases the detail that tells the classes apart); interp="linear" | "cubic" sets every
    view's crop interpolation; and the recipe's own keywords: scale= for
    mocov1/mocov2/byol/simclr/mae; strength= for simclr; n_local=, local_size=, global_scale=,
    local_scale= for every two-view recipe (multi-crop, see with_local_crops), global_scale=
    for dino/swav; center_crop= for eval.
    """
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8, got {img_size!r}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    mean = tuple(overrides.pop("mean", IMAGENET_MEAN if in_chans == 3 else GREY_MEAN))
    std = tuple(overrides.pop("std", IMAGENET_STD if in_chans == 3 else GREY_STD))
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise ValueError(f"mean/std must have {in_chans} entries (std > 0), got {mean}, {std}")
    blur = overrides.pop("blur", True)
    if not isinstance(blur, bool):
        raise ValueError(f"blur must be True or False, got {blur!r}")
    interp = overrides.pop("interp", None)
    if interp is not None and interp not in INTERPS:
        raise ValueError(f"interp must be one of {INTERPS}, got {interp!r}")
    build = RECIPES[name]
    allowed = list(inspect.signature(build).parameters)[1:]
    two_view = name not in ("mae", "eval")
    if two_view:
        allowed += list(MULTICROP_KEYS)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"recipe {name!r} does not take {unknown}; it takes {list(allowed)} "
                         "and mean=, std=")
    local = {k: overrides[k] for k in MULTICROP_KEYS if k in overrides}
    views = build(img_size, **{k: v for k, v in overrides.items() if k not in local})
    if two_view:
        views = with_local_crops(name, views, img_size, **local)
    if not blur:
        views = tuple(dataclasses.replace(v, blur_p=0.0) for v in views)
        overrides["blur"] = False
    if interp is not None:
        views = tuple(dataclasses.replace(v, interp=interp) for v in views)
        overrides["interp"] = interp
    for v in views:
        _check_view(v)
    return Recipe(name, views, in_chans, mean, std, dict(overrides))


def _check_view(v: View) -> None:
    if v.size < 1:
        raise ValueError(f"view size must be >= 1, got {v.size}")
    for nm, rng in (("scale", v.scale), ("ratio", v.ratio)):
        if rng is not None and not 0 < rng[0] <= rng[1]:
            raise ValueError(f"{nm} must be (lo, hi) with 0 < lo <= hi, got {rng}")
    if v.scale is not None and v.scale[1] > 1:
        raise ValueError(f"scale must be within (0, 1], got {v.scale}")
    if v.interp not in INTERPS:
        raise ValueError(f"interp must be one of {INTERPS}, got {v.interp!r}")


# ----------------------------------------------------------------------------- the draw
def batch_rng(seed: int, epoch: int, shard: int, batch: int) -> np.random.Generator:
    """The generator of batch `batch` of `epoch` on `shard`: nothing else feeds it."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, shard, batch, 0x5E1F]))


def _crop_boxes(view: View, rng: np.random.Generator, hw: np.ndarray) -> np.ndarray:
    """(B, 4) relative boxes y0, x0, y1, x1 for source sizes hw (B, 2)."""
    h_src, w_src = hw[:, 0].astype(np.float64), hw[:, 1].astype(np.float64)
    n = len(hw)
    if view.scale is None:  # fixed: whole image, or a centred square of the shorter side
        if view.center_crop is None:
            return np.tile(np.array([0, 0, 1, 1], np.float64), (n, 1))
        side = view.center_crop * np.minimum(h_src, w_src)
        h, w = side, side
        y0, x0 = (h_src - h) / 2, (w_src - w) / 2
    else:
        # torchvision's RandomResizedCrop: 10 tries of (area, log-ratio), first that fits,
        # else a centre crop with the aspect clamped to the ratio range
        tries = 10
        area = h_src[:, None] * w_src[:, None] * rng.uniform(*view.scale, (n, tries))
        logr = rng.uniform(math.log(view.ratio[0]), math.log(view.ratio[1]), (n, tries))
        tw, th = np.sqrt(area * np.exp(logr)), np.sqrt(area / np.exp(logr))
        fits = (tw <= w_src[:, None]) & (th <= h_src[:, None])
        first = np.argmax(fits, axis=1)
        ok = fits[np.arange(n), first]
        in_ratio = w_src / h_src
        fw = np.where(in_ratio < view.ratio[0], w_src,
                      np.where(in_ratio > view.ratio[1], h_src * view.ratio[1], w_src))
        fh = np.where(in_ratio < view.ratio[0], w_src / view.ratio[0],
                      np.where(in_ratio > view.ratio[1], h_src, h_src))
        w = np.where(ok, tw[np.arange(n), first], fw)
        h = np.where(ok, th[np.arange(n), first], fh)
        u = rng.random((n, 2))
        y0 = np.where(ok, u[:, 0] * (h_src - h), (h_src - h) / 2)
        x0 = np.where(ok, u[:, 1] * (w_src - w), (w_src - w) / 2)
    return np.stack([y0 / h_src, x0 / w_src, (y0 + h) / h_src, (x0 + w) / w_src], axis=1)


def draw_params(view: View, rng: np.random.Generator, hw: np.ndarray) -> np.ndarray:
    """(B, N_PARAMS) float32: every random choice of `view` for B samples of sizes hw (B, 2).

    The same number of values is drawn whatever the outcome, so one view's coin flips never
    shift another's.
    """
    n = len(hw)
    p = np.tile(IDENTITY, (n, 1))
    p[:, ROI] = _crop_boxes(view, rng, np.asarray(hw))
    if view.scale is None:
        return p
    u = rng.random((n, 5))  # flip, jitter, grey, blur, solarize coins
    p[:, FLIP] = u[:, 0] < view.flip_p
    flip = p[:, FLIP] > 0  # a mirrored crop is a box with x0 > x1 (DALI's resize flips it)
    p[flip, 1], p[flip, 3] = p[flip, 3].copy(), p[flip, 1].copy()
    bj, cj, sj, hj = view.jitter
    f = rng.uniform(-1, 1, (n, 4)) * np.array([bj, cj, sj, hj])
    jit = u[:, 1] < view.jitter_p
    p[:, BRIGHT] = np.where(jit, 1 + f[:, 0], 1)
    p[:, CONTRAST] = np.where(jit, 1 + f[:, 1], 1)
    p[:, SAT] = np.where(jit, 1 + f[:, 2], 1) * (u[:, 2] >= view.gray_p)
    p[:, HUE] = np.where(jit, f[:, 3] * 360.0, 0)  # fraction of the colour wheel -> degrees
    sigma = rng.uniform(*view.blur_sigma, n)
    p[:, SIGMA] = np.where(u[:, 3] < view.blur_p, sigma, 0)
    p[:, SOLARIZE] = u[:, 4] < view.solarize_p
    return p
