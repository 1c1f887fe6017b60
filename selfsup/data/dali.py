"""DALI graphs: one builder for every recipe, on CPU (`device_id=None`) or GPU.

Every input comes through one `fn.external_source` whose callback is keyed by the batch index:
the images (uint8 HWC arrays, or the encoded bytes of image files, decoded by
`fn.decoders.image`: "mixed" on GPU, "cpu" otherwise) and, per view, the per-sample
parameters made on the host by recipes.draw_params. The graph uses no DALI random operator,
so its output is a pure function of what the callback returns: deterministic across runs,
thread counts, restarts and rebuilds. Each view is, on uint8 HWC:

    resize(roi = crop box, x0 > x1 mirrors; linear, or cubic for views with interp="cubic")
    -> colour twist -> blur -> solarize
    -> normalize to float32 CHW

Two implementations of that view:

- CPU: one fused operator, `fn.selfsup_view` (csrc/view_op.cc, built and loaded by
  dali_plugin.py), fed the (B, N_PARAMS) parameter matrix as is. DALI's stock CPU operators
  cost ~2.2 us per sample each before any pixel work, ~9 us for a 32-px resize and ~20 ns
  per pixel for color_twist, and a view needs 3-5 of them plus a numpy normalization; the
  fused operator does the view in one pass per sample on DALI's thread pool. It computes what
  the stock graph computes (tests/test_dali_fused.py: against a float64 reference, and
  within one level of the stock graph on grey images; ~2e-5 of the values of whole quality
  runs differ, by one level: bench/fused_parity.py).
- GPU, recipes with a bicubic view (the fused operator is linear only), and CPU where the
  operator cannot be built (no C++ compiler) or SELFSUP_DALI_PLUGIN=0:
  DALI's stock operators, each per-sample argument its own external-source output (slicing
  one matrix in the graph runs an operator per slice and per sample): resize, color_twist
  (RGB) or brightness_contrast (grey), blur (gaussian_blur on GPU; on CPU fn.filter with
  host-made kernels, `_blur_names`), solarize; the loader normalizes the uint8 views
  (transforms.normalize). Optional ops on views of >= 64 px run under DALI conditionals, so
  only the samples whose coin selected them pay; on small views the split/merge costs more
  than the op, so there every sample is blurred, with an identity kernel where the coin said
  no: the same pixels either way.

Speed: bench/bench_data.py, README "Augmentation throughput" and bench/results/cpu/data.md.

A corrupt file makes DALI's decoder fail the whole batch: `DaliRunner` then asks its owner to
find the culprit (loader.py checks the batch's files with Pillow, marks the bad ones and
substitutes them) and rebuilds the pipeline at that batch. Outputs are torch tensors (CPU, or
CUDA on the current stream for GPU pipelines): float32 CHW from the fused operator, uint8 HWC
from the stock graph.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import numpy as np
import torch

from . import dali_plugin, transforms
from .recipes import BRIGHT, CONTRAST, HUE, SAT, SIGMA, SOLARIZE, Recipe, View

SOLARIZE_LUT = [k if k < 128 else 255 - k for k in range(256)]
# Views at least this large run their optional ops (blur, solarize) under DALI conditionals,
# so only the selected samples pay; below it, splitting and merging the batch costs more than
# the op (measured: conditional blur p=.5 on 32-px views ran 25% slower than blurring all).
CONDITIONAL_MIN_SIZE = 64


def available() -> bool:
    """Whether nvidia-dali is installed (it is imported lazily, never at package import)."""
    return importlib.util.find_spec("nvidia") is not None and \
        importlib.util.find_spec("nvidia.dali") is not None


def _blur_names(view: View, gpu: bool) -> list[str]:
    """How a view blurs, as the names of its argument inputs.

    GPU: gaussian_blur with a per-sample sigma. CPU: fn.filter with per-sample kernels made on
    the host (`blur_kernels`), which is OpenCV's vectorized filter2D: DALI's CPU gaussian_blur
    rebuilds its kernel per sample and runs a scalar loop. Measured on 2 cores: a 224-px RGB
    view with a 23-tap blur, 3.2-3.6 ms (gaussian_blur) vs 0.35-0.42 ms (a row then a column
    fn.filter), 8x; with one argument output per parameter (`_arg_names`), the whole 32-px
    grey mocov2 graph went from 24k to 42k img/s. Windows up to 5 use one 2D kernel (one op:
    DALI's per-op overhead is ~2 us per sample); wider ones a row and a column pass, rounded
    to uint8 in between (at most 1 level off gaussian_blur, 0.13 on average). Views under a
    blur conditional also get `sigma`, the predicate; elsewhere the samples the coin skipped
    get an identity kernel."""
    if view.blur_p == 0:
        return []
    if gpu:
        return ["sigma"]
    pred = ["sigma"] if _blur_conditional(view) else []
    return pred + (["blur_kernel"] if view.blur_window <= 5 else ["blur_row", "blur_col"])


def _blur_conditional(view: View) -> bool:
    return _conditional(view) and view.blur_p < 1


def _arg_names(view: View, src_chans: int, gpu: bool) -> tuple[str, ...]:
    """The per-sample argument inputs of one view's subgraph, in external-source order.

    Each one is its own external-source output, made on the host by `_arg_arrays`: slicing one
    parameter matrix inside the graph (p[0:2], p[BRIGHT], ...) runs a DALI operator per slice
    and per sample (~2 us each on this CPU), as much as the crop+resize of a 32-px view."""
    names = ["roi_start", "roi_end"]
    if view.has_color:
        names += ["bright", "contrast"] + (["sat", "hue"] if src_chans == 3 else [])
    names += _blur_names(view, gpu)
    if view.solarize_p > 0:
        names.append("solarize")
    return tuple(names)


def _arg_arrays(view: View, p: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """The host arrays behind `_arg_names`, from one (B, N_PARAMS) parameter matrix."""
    cols = {"bright": BRIGHT, "contrast": CONTRAST, "sat": SAT, "hue": HUE}
    # the 1D kernels, once for whichever of blur_kernel / blur_row / blur_col the view takes
    g = blur_kernels(p[:, SIGMA], view.blur_window) if any(
        n.startswith("blur_") for n in names) else None
    out = []
    for name in names:
        if name == "roi_start":
            a = p[:, 0:2]
        elif name == "roi_end":
            a = p[:, 2:4]
        elif name in cols:
            a = p[:, cols[name]]
        elif name == "sigma":  # 0 = no blur: the conditional's flag, or a tiny identity blur
            a = p[:, SIGMA] if _blur_conditional(view) else np.maximum(p[:, SIGMA], 1e-3)
        elif name == "blur_kernel":
            a = g[:, :, None] * g[:, None, :]
        elif name == "blur_row":
            a = g[:, None, :]
        elif name == "blur_col":
            a = g[:, :, None]
        else:  # solarize: a uint8 flag, multiplied into the uint8 arithmetic as is
            a = (p[:, SOLARIZE] > 0).astype(np.uint8)
        out.append(np.ascontiguousarray(a, dtype=np.uint8 if name == "solarize" else np.float32))
    return out


def blur_kernels(sigma: np.ndarray, window: int) -> np.ndarray:
    """(B, window) float64 1D Gaussian kernels, as DALI's gaussian_blur builds them
    (normalized exp(-x^2 / 2 sigma^2)); sigma <= 0 gives the identity, a 1 in the centre."""
    r = np.arange(window, dtype=np.float64) - window // 2
    s = np.maximum(sigma.astype(np.float64), 1e-3)[:, None]
    g = np.exp(-r[None] ** 2 / (2 * s * s))
    return g / g.sum(1, keepdims=True)


def _conditional(view: View) -> bool:
    return view.size >= CONDITIONAL_MIN_SIZE


def _filter_blur(y, a: dict):
    from nvidia.dali import fn

    if "blur_kernel" in a:
        return fn.filter(y, a["blur_kernel"], border="101")
    return fn.filter(fn.filter(y, a["blur_row"], border="101"), a["blur_col"], border="101")


def _view(img, a: dict, view: View, src_chans: int, antialias: bool, gpu: bool):
    """The per-view subgraph on uint8 HWC: crop+resize(+mirror), colour, blur, solarize.

    `a` maps `_arg_names` to their external-source nodes."""
    from nvidia.dali import fn, types

    # a box with x0 > x1 is mirrored by the resize itself: no separate flip op
    interp = types.INTERP_CUBIC if view.interp == "cubic" else types.INTERP_LINEAR
    y = fn.resize(img, size=[view.size, view.size], roi_start=a["roi_start"],
                  roi_end=a["roi_end"], roi_relative=True, interp_type=interp,
                  antialias=antialias)
    if view.has_color:
        if src_chans == 3:
            y = fn.color_twist(y, brightness=a["bright"], contrast=a["contrast"],
                               saturation=a["sat"], hue=a["hue"])
        else:  # saturation and hue are no-ops on grey
            y = fn.brightness_contrast(y, brightness=a["bright"], contrast=a["contrast"],
                                       contrast_center=128.0)
    cond = _conditional(view)
    if view.blur_p > 0:
        k = view.blur_window
        if _blur_conditional(view):
            if a["sigma"] > 0:
                y = fn.gaussian_blur(y, sigma=a["sigma"], window_size=k) if gpu else \
                    _filter_blur(y, a)
        elif gpu:  # sigma 1e-3 -> the kernel is exactly [0, 1, 0]: identity
            y = fn.gaussian_blur(y, sigma=a["sigma"], window_size=k)
        else:  # identity kernels where the coin said no: the same pixels
            y = _filter_blur(y, a)
    if view.solarize_p > 0:
        if cond or gpu:  # GPU arithmetic cannot take the per-sample CPU flag: use `if`
            if a["solarize"] > 0:
                y = fn.lookup_table(y, keys=list(range(256)), values=SOLARIZE_LUT,
                                    dtype=types.UINT8)
        else:  # x + on * (255 - 2x), on = solarize & (x >= 128)
            on = fn.cast(y >= 128, dtype=types.UINT8) * a["solarize"]
            y = fn.cast(y + on * (255 - y - y), dtype=types.UINT8)
    return y


def _fused_view(img, p, view: View, recipe: Recipe, antialias: bool, norm: tuple):
    """The whole view in one operator (csrc/view_op.cc): normalized float32 CHW."""
    from nvidia.dali import fn

    return fn.selfsup_view(img, p, size=view.size, antialias=antialias,
                           blur_window=view.blur_window if view.blur_p > 0 else 0,
                           out_chans=recipe.in_chans, scale=norm[0], shift=norm[1])


def build_pipeline(recipe: Recipe, source: Callable[[int], tuple], *, encoded: bool,
                   src_chans: int, batch_size: int, num_threads: int, device_id: int | None,
                   src_side: int | None = None, prefetch: int = 2):
    """A built DALI pipeline for `recipe`; `source(i)` returns (images, params_0, ...).

    Outputs, one batch per view: normalized float32 (B, C, S, S) from the fused CPU operator
    (whenever dali_plugin loads it; GPU pipelines never fuse), else uint8 (B, S, S, src_chans)
    from DALI's stock operators (loader.py normalizes those).
    src_side: the largest side of array sources (None for files); when no crop of a view can
    exceed its output size, antialiasing is off (it only acts when shrinking, and costs).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    # the fused operator resizes linearly only: bicubic views (DINO, MAE) take the stock graph
    fused = (not gpu and all(v.interp == "linear" for v in recipe.views)
             and dali_plugin.enabled() and dali_plugin.load())
    names = [("params",) if fused else _arg_names(v, src_chans, gpu) for v in recipe.views]
    flat = [n for ns in names for n in ns]
    norm = transforms.norm_constants(recipe.mean, recipe.std, recipe.in_chans)

    def feed(i: int):  # (images, params per view) -> (images, every view's argument arrays)
        data, *params = source(i)
        if fused:
            return (data, *(np.ascontiguousarray(p, dtype=np.float32) for p in params))
        return (data, *(a for v, p, ns in zip(recipe.views, params, names, strict=True)
                        for a in _arg_arrays(v, p, ns)))

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  enable_conditionals=True, prefetch_queue_depth=prefetch,
                  exec_async=True, exec_pipelined=True)
    def graph():
        data, *args = fn.external_source(
            source=feed, num_outputs=1 + len(flat), batch=True,
            layout=[None if encoded else "HWC"] + [None] * len(flat),
            dtype=[types.UINT8] + [types.UINT8 if n == "solarize" else types.FLOAT
                                   for n in flat])
        if encoded:
            img = fn.decoders.image(data, device="mixed" if gpu else "cpu",
                                    output_type=types.RGB if src_chans == 3 else types.GRAY,
                                    adjust_orientation=False)  # images.probe applied it
        else:
            img = data.gpu() if gpu else data
        outs, k = [], 0
        for v, ns in zip(recipe.views, names):  # noqa: B905 - autograph's zip lacks strict=
            antialias = src_side is None or src_side > v.size
            if fused:
                outs.append(_fused_view(img, args[k], v, recipe, antialias, norm))
            else:
                outs.append(_view(img, dict(zip(ns, args[k:k + len(ns)])), v, src_chans,  # noqa: B905
                                  antialias, gpu))
            k += len(ns)
        return tuple(outs)

    pipe = graph()
    pipe.build()
    return pipe


def to_torch(tl, gpu: bool) -> torch.Tensor:
    """A dense uint8 or float32 DALI TensorList -> a torch tensor (copied: DALI reuses its
    buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    if gpu:
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=torch.cuda.current_device())
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(tl.as_array())


class DaliRunner:
    """Runs one pipeline over the batches of an epoch; rebuilds it after a failed batch.

    make(source) builds a pipeline; prepare(i) returns (inputs, meta) for batch i; recover
    (metas of the batches in flight, the error) returns True once it has fixed their inputs
    (e.g. substituted a corrupt file), or False to let the error propagate.
    """

    def __init__(self, make: Callable, gpu: bool) -> None:
        self.make, self.gpu = make, gpu
        self.pipe = None
        self.clean = False  # True when the pipeline finished an epoch and can just reset
        self.builds = 0

    def run(self, n: int, prepare: Callable, recover: Callable) -> Iterator[tuple[list, object]]:
        start, pending, base = 0, {}, [0]

        def source(it: int):  # `it` counts from 0 at each build or reset of the pipeline
            i = base[0] + it
            if i >= n:
                raise StopIteration
            inputs, meta = prepare(i)
            pending[i] = meta
            return inputs

        self._source = source
        while start < n:
            if self.pipe is not None and self.clean and start == 0:
                self.pipe.reset()
            else:
                self.pipe = None  # free the old one before building
                self.pipe = self.make(lambda it: self._source(it))
                self.builds += 1
            self.clean = False
            pending.clear()
            base[0] = start
            try:
                while start < n:
                    outs = self.pipe.run()
                    views = [to_torch(o, self.gpu) for o in outs]
                    meta = pending.pop(start)
                    start += 1
                    yield views, meta
            except RuntimeError as e:  # DALI: "Critical error in pipeline" (a decode failed)
                metas = [pending[i] for i in sorted(pending)]
                self.pipe = None
                if not recover(metas, e):
                    raise
        self.clean = True
