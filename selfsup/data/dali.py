"""DALI graphs: one builder for every recipe, on CPU (`device_id=None`) or GPU.

Every input comes through one `fn.external_source` whose callback is keyed by the batch index:
the images (uint8 HWC arrays, or the encoded bytes of image files, decoded by
`fn.decoders.image`: "mixed" on GPU, "cpu" otherwise) and one (B, N_PARAMS) parameter matrix
per view, drawn on the host by recipes.draw_params. The graph uses no DALI random operator,
so its output is a pure function of what the callback returns: deterministic across runs,
thread counts, restarts and rebuilds. Per view, on uint8 HWC:

    resize(roi = crop box, x0 > x1 mirrors; linear) -> color_twist (RGB) or
    brightness_contrast (grey) -> gaussian_blur (sigma > 0) -> solarize lookup table

and the loader turns each view into normalized float32 CHW with the same torch code as the
portable path (transforms.normalize): measured cheaper than crop_mirror_normalize + fn.cat in
the graph, and it hands over 4x fewer bytes. Optional ops on views of >= 64 px run under DALI
conditionals, so only the samples whose coin selected them pay; on small views the
split/merge costs more than the op, so there every sample is blurred, with sigma ~0 (an
exact identity) where the coin said no: same pixels either way.

Speed (bench/bench_data.py, 2 shared cores, images/s, DALI CPU vs portable): Fashion-MNIST
mocov2 2x32 10.8k vs 19.3k, dino 2x32+10x16 3.2k vs 5.1k; 224-320 px JPEGs mocov2 116 vs
241, dino 2x224+10x96 60 vs 70. DALI's CPU operators (resize, color_twist, gaussian_blur)
are per-sample scalar loops, while the portable path runs each op once over the batch with
vectorized torch; DALI's place is the GPU ("mixed" decode and GPU ops).

A corrupt file makes DALI's decoder fail the whole batch: `DaliRunner` then asks its owner to
find the culprit (loader.py checks the batch's files with Pillow, marks the bad ones and
substitutes them) and rebuilds the pipeline at that batch. Outputs are torch uint8 tensors
(CPU, or CUDA on the current stream for GPU pipelines).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import torch

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


def _view(img, p, view: View, src_chans: int, antialias: bool, gpu: bool):
    """The per-view subgraph on uint8 HWC: crop+resize(+mirror), colour, blur, solarize."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    # a box with x0 > x1 is mirrored by the resize itself: no separate flip op
    y = fn.resize(img, size=[view.size, view.size], roi_start=p[0:2], roi_end=p[2:4],
                  roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=antialias)
    if view.has_color:
        if src_chans == 3:
            y = fn.color_twist(y, brightness=p[BRIGHT], contrast=p[CONTRAST],
                               saturation=p[SAT], hue=p[HUE])
        else:  # saturation and hue are no-ops on grey
            y = fn.brightness_contrast(y, brightness=p[BRIGHT], contrast=p[CONTRAST],
                                       contrast_center=128.0)
    cond = view.size >= CONDITIONAL_MIN_SIZE
    if view.blur_p > 0:
        k = view.blur_window
        if cond and view.blur_p < 1:
            if p[SIGMA] > 0:
                y = fn.gaussian_blur(y, sigma=p[SIGMA], window_size=k)
        else:  # sigma 1e-3 -> the kernel is exactly [0, 1, 0]: identity
            y = fn.gaussian_blur(y, sigma=dmath.max(p[SIGMA], 1e-3), window_size=k)
    if view.solarize_p > 0:
        if cond or gpu:  # GPU arithmetic cannot take the per-sample CPU flag: use `if`
            if p[SOLARIZE] > 0:
                y = fn.lookup_table(y, keys=list(range(256)), values=SOLARIZE_LUT,
                                    dtype=types.UINT8)
        else:  # x + on * (255 - 2x), on = solarize & (x >= 128)
            on = fn.cast(y >= 128, dtype=types.UINT8) * fn.cast(p[SOLARIZE], dtype=types.UINT8)
            y = fn.cast(y + on * (255 - y - y), dtype=types.UINT8)
    return y


def build_pipeline(recipe: Recipe, source: Callable[[int], tuple], *, encoded: bool,
                   src_chans: int, batch_size: int, num_threads: int, device_id: int | None,
                   src_side: int | None = None, prefetch: int = 2):
    """A built DALI pipeline for `recipe`; `source(i)` returns (images, params_0, ...).

    Outputs: one uint8 (B, S, S, src_chans) batch per view (loader.py normalizes them).
    src_side: the largest side of array sources (None for files); when no crop of a view can
    exceed its output size, antialiasing is off (it only acts when shrinking, and costs).
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    n_views = len(recipe.views)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  enable_conditionals=True, prefetch_queue_depth=prefetch,
                  exec_async=True, exec_pipelined=True)
    def graph():
        data, *params = fn.external_source(
            source=source, num_outputs=1 + n_views, batch=True,
            layout=[None if encoded else "HWC"] + [None] * n_views,
            dtype=[types.UINT8] + [types.FLOAT] * n_views)
        if encoded:
            img = fn.decoders.image(data, device="mixed" if gpu else "cpu",
                                    output_type=types.RGB if src_chans == 3 else types.GRAY,
                                    adjust_orientation=False)  # as Pillow: EXIF not applied
        else:
            img = data.gpu() if gpu else data
        # no strict=: DALI's conditionals (autograph) replace zip with one that lacks it
        return tuple(_view(img, p, v, src_chans, src_side is None or src_side > v.size, gpu)
                     for v, p in zip(recipe.views, params))  # noqa: B905

    pipe = graph()
    pipe.build()
    return pipe


def to_torch(tl, gpu: bool) -> torch.Tensor:
    """A dense uint8 DALI TensorList -> a torch tensor (copied: DALI reuses its buffers)."""
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
