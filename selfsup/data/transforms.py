"""Portable augmentation: the recipes of recipes.py in batched torch, plus Pillow for files.

Used where DALI is absent (macOS, ARM) or when asked for (device="portable"). It reads the
same per-sample parameter matrix as the DALI graph (recipes.draw_params), so both backends
compute the same augmentations; they differ only by interpolation details and by DALI
rounding to uint8 between its ops (this path stays in float32 until the normalization):

  crop+resize  arrays: one batched `grid_sample` (bilinear, pixel centres, clamped borders),
               which equals DALI's linear resize when upsampling; it does not antialias when
               a crop is shrunk (DALI does). Files: Pillow's bilinear `resize(box=...)`, which
               antialiases like DALI. Views with interp="cubic" (DINO, MAE): arrays use
               separable resampling matrices with Keys' cubic (a = -0.5, as Pillow's BICUBIC
               and DALI's INTERP_CUBIC), stretched when a crop is shrunk (antialiased) and
               edge pixels repeated (within ~0.2 levels of DALI on average); files Pillow's
               BICUBIC.
  flip         a box with x0 > x1: a mirrored sampling grid (arrays), a Pillow transpose
               (files)
  colour       DALI's color_twist matrix: b*c * YIQ->RGB * hue(h) * sat(s) * RGB->YIQ, offset
               128*(1-c)*b, clamped to [0, 255]; one channel: brightness/contrast only
  blur         separable Gaussian, window `View.blur_window`, reflect-101 borders (as DALI)
  solarize     x -> 255 - x where x >= 128
  normalize    (x / 255 - mean) / std, grey replicated to 3 channels when asked (DALI's
               uint8 CPU batches: the same in numpy, off torch's thread pool)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .recipes import BRIGHT, CONTRAST, HUE, ROI, SAT, SIGMA, SOLARIZE, View

# DALI's colour-space constants (color_twist), so that both backends twist identically
RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321],
                        [0.211, -0.523, 0.311]], dtype=torch.float64)
YIQ2RGB = torch.tensor([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]],
                       dtype=torch.float64)


def keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel; a = -0.5 is Pillow's and DALI's bicubic."""
    t = t.abs()
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def cubic_weights(lo: torch.Tensor, hi: torch.Tensor, n_src: int, size: int) -> torch.Tensor:
    """(B, size, n_src) float64 resampling matrices for boxes [lo, hi] (relative, hi < lo
    mirrors) of a side of n_src pixels: Keys' cubic at each output pixel centre, stretched by
    the shrink factor (antialiasing, as DALI and Pillow), taps beyond an edge read the edge."""
    lo, hi = lo.double() * n_src, hi.double() * n_src
    span = hi - lo
    centre = lo[:, None] + (torch.arange(size, dtype=torch.float64) + 0.5) / size * span[:, None]
    stretch = (span.abs() / size).clamp(min=1.0)[:, None, None]
    reach = math.ceil(2 * float(stretch.max())) + 1
    taps = torch.floor(centre - 0.5)[..., None] + torch.arange(-reach, reach + 1,
                                                                dtype=torch.float64)
    w = keys_cubic((taps + 0.5 - centre[..., None]) / stretch)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros(*centre.shape, n_src, dtype=torch.float64)
    return out.scatter_add_(-1, taps.clamp(0, n_src - 1).long(), w)


def crop_resize(x: torch.Tensor, p: torch.Tensor, size: int, interp: str = "linear"
                ) -> torch.Tensor:
    """x (B, C, H, W) float, p (B, N_PARAMS) -> (B, C, size, size): crop p[:, ROI].

    A box with x0 > x1 samples right to left: that is the mirror. interp "cubic": the
    separable cubic_weights matrices (the cubic's overshoot clamped to [0, 255], as a uint8
    resize would)."""
    y0, x0, y1, x1 = p[:, ROI].double().unbind(1)
    if interp == "cubic":
        wy, wx = cubic_weights(y0, y1, x.shape[2], size), cubic_weights(x0, x1, x.shape[3], size)
        out = torch.einsum("bsh,bchw,btw->bcst", wy.to(x.dtype), x, wx.to(x.dtype))
        return out.clamp_(0, 255)
    base = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres
    gx = 2 * (x0[:, None] + base * (x1 - x0)[:, None]) - 1  # grid_sample's [-1, 1] = edges
    gy = 2 * (y0[:, None] + base * (y1 - y0)[:, None]) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def crop_resize_pil(img, p: np.ndarray, size: int, interp: str = "linear") -> np.ndarray:
    """A Pillow image and one parameter row -> uint8 (size, size[, C]), cropped and flipped."""
    from PIL import Image

    w, h = img.size
    y0, x0, y1, x1 = (float(v) for v in p[ROI])
    box = (min(x0, x1) * w, y0 * h, max(x0, x1) * w, y1 * h)
    resample = Image.BICUBIC if interp == "cubic" else Image.BILINEAR
    out = img.resize((size, size), resample, box=box, reducing_gap=None)
    if x0 > x1:  # the mirrored box
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def twist_matrices(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 3) matrices and (B,) offsets of DALI's color_twist for parameter rows p."""
    b, c, s = p[:, BRIGHT].double(), p[:, CONTRAST].double(), p[:, SAT].double()
    h = torch.deg2rad(p[:, HUE].double())
    n = len(p)
    hue_sat = torch.zeros(n, 3, 3, dtype=torch.float64)  # rotate and scale the I, Q axes
    hue_sat[:, 0, 0] = 1
    hue_sat[:, 1, 1] = hue_sat[:, 2, 2] = torch.cos(h) * s
    hue_sat[:, 1, 2] = torch.sin(h) * s
    hue_sat[:, 2, 1] = -torch.sin(h) * s
    m = (b * c)[:, None, None] * (YIQ2RGB @ hue_sat @ RGB2YIQ)
    return m, 128.0 * (1 - c) * b


def color_twist(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) in [0, 255] -> twisted and clamped; C == 1: brightness/contrast only."""
    m, off = twist_matrices(p)
    off = off.to(x.dtype)[:, None, None, None]
    if x.shape[1] == 1:
        bc = (p[:, BRIGHT] * p[:, CONTRAST]).to(x.dtype)[:, None, None, None]
        return (x * bc + off).clamp_(0, 255)
    return (torch.einsum("bij,bjhw->bihw", m.to(x.dtype), x) + off).clamp_(0, 255)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, window: int) -> torch.Tensor:
    """Blur the samples with sigma > 0 (separable, normalized, reflect-101 borders)."""
    sel = torch.nonzero(sigma > 0).flatten()
    if len(sel) == 0:
        return x
    xs = x[sel]
    n, c, h, w = xs.shape
    r = torch.arange(window, dtype=torch.float64) - window // 2
    k = torch.exp(-r[None] ** 2 / (2 * sigma[sel].double()[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x.dtype).repeat_interleave(c, 0)  # (n*C, window)
    pad = window // 2
    # one grouped conv over all (sample, channel) planes; each plane has its own kernel
    xs = F.pad(xs.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    xs = F.conv2d(xs, k.view(n * c, 1, 1, window), groups=n * c)
    xs = F.conv2d(xs, k.view(n * c, 1, window, 1), groups=n * c)
    out = x.clone()
    out[sel] = xs.view(n, c, h, w)
    return out


def solarize(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    on = (flag > 0).view(-1, 1, 1, 1) & (x >= 128)
    return torch.where(on, 255 - x, x)


def normalize(x: torch.Tensor, mean, std, out_chans: int) -> torch.Tensor:
    """[0, 255] (B, C, H, W), any dtype -> float32 normalized (B, out_chans, H, W).

    Grey is replicated to out_chans. Both backends end here: the portable path with float32,
    DALI with uint8 HWC permuted to CHW, which on the CPU takes the numpy pass below (the
    same floats as this one; tested exactly)."""
    b, c, h, w = x.shape
    if x.dtype == torch.uint8 and x.device.type == "cpu":
        return _normalize_uint8_cpu(x, mean, std, out_chans)
    out = torch.empty(b, out_chans, h, w, dtype=torch.float32, device=x.device)
    for k in range(out_chans):  # x * scale + shift per channel, written into the output
        shift = torch.tensor(-mean[k] / std[k], device=x.device)
        torch.add(shift, x[:, k % c], alpha=1 / (255 * std[k]), out=out[:, k])
    return out


def norm_constants(mean, std, out_chans: int) -> tuple[list[float], list[float]]:
    """The float32 scale 1 / (255 std) and shift -mean / std per output channel, as exact
    Python floats: what normalize() multiplies and adds (also handed to DALI's fused view)."""
    scale = [float(np.float32(1 / (255 * std[k]))) for k in range(out_chans)]
    shift = [float(np.float32(-mean[k] / std[k])) for k in range(out_chans)]
    return scale, shift


def _normalize_uint8_cpu(x: torch.Tensor, mean, std, out_chans: int) -> torch.Tensor:
    """normalize() for DALI's CPU output, in numpy on the calling thread.

    The DALI loader normalizes while DALI's worker threads run on the same cores; torch's
    OpenMP pool then waits at every parallel region for a core (measured on 2 cores: 1.4 ms
    per channel of a 256 x 32 x 32 batch instead of 0.07 ms, which halved the loader's
    throughput). numpy runs on this thread only. It computes in float64 and rounds once, as
    torch's fused multiply-add does, so the floats are torch's own (checked on all 256 levels
    of the default means: runs that use DALI stay bit-reproducible across this change)."""
    b, c, h, w = x.shape
    xs = x.numpy()
    out = np.empty((b, out_chans, h, w), np.float32)
    t = np.empty((b, h, w), np.float64)  # one buffer: allocation cost as much as the math
    for k, (scale, shift) in enumerate(zip(*norm_constants(mean, std, out_chans),
                                           strict=True)):
        np.multiply(xs[:, k % c], scale, out=t)  # exact: 8 x 24 bits < 53
        t += shift
        out[:, k] = t  # the one rounding to float32
    return torch.from_numpy(out)


def finish_view(x: torch.Tensor, p: torch.Tensor, view: View, mean, std,
                out_chans: int) -> torch.Tensor:
    """The pixel ops after the crop, in DALI's order: colour, blur, solarize, normalize."""
    if view.has_color:
        x = color_twist(x, p)
    if view.blur_p > 0:
        x = gaussian_blur(x, p[:, SIGMA], view.blur_window)
    if view.solarize_p > 0:
        x = solarize(x, p[:, SOLARIZE])
    return normalize(x, mean, std, out_chans)


def augment_arrays(images: np.ndarray, params: list[np.ndarray], views, mean, std,
                   out_chans: int) -> list[torch.Tensor]:
    """uint8 (B, H, W, C) and one (B, N_PARAMS) matrix per view -> normalized views."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    out = []
    for view, p in zip(views, params, strict=True):
        pt = torch.from_numpy(p)
        out.append(finish_view(crop_resize(x, pt, view.size, view.interp), pt, view, mean, std,
                               out_chans))
    return out


def augment_crops(crops: list[list[np.ndarray]], params: list[np.ndarray], views, mean, std,
                  out_chans: int) -> list[torch.Tensor]:
    """crops[v][b]: uint8 (S, S[, C]) from crop_resize_pil -> normalized views."""
    out = []
    for view, p, cv in zip(views, params, crops, strict=True):
        x = torch.from_numpy(np.stack([c if c.ndim == 3 else c[..., None] for c in cv]))
        x = x.permute(0, 3, 1, 2).float()
        out.append(finish_view(x, torch.from_numpy(p), view, mean, std, out_chans))
    return out
