"""build_loader: multi-view batches from arrays or image folders, on DALI or the portable path.

Order, sharding and augmentation randomness are all decided on the host, per batch:
  - epoch order: a permutation seeded by (seed, epoch) (identity for "eval"), the same on
    every shard; truncated (drop_last) or cyclically padded to a multiple of num_shards, then
    shard k takes every num_shards-th entry, so shards are disjoint and equally long;
  - batch i of the shard: positions [i*B, (i+1)*B) of that list, and its augmentation
    parameters from recipes.batch_rng(seed, epoch, shard, i).
So batch i of epoch e is a pure function of (seed, epoch, shard, i) on every backend: a fresh
loader after set_epoch(e) reproduces it exactly, whatever was drawn before in the process.

Files are decoded under one policy on both backends (images.py: transparency composited over
white, EXIF orientation applied, a pixel limit checked from the header). A file that is
corrupt, truncated or over the pixel limit is remembered (or raises CorruptImageError with
on_corrupt="error") and its slot is filled by the next decodable image of the shard's epoch
order, so batches keep their size and DDP ranks stay in step; each epoch ends with ONE
warning naming the skipped files and why (`skip_summary`), never one line per file. The
DALI path checks each file cheaply before DALI sees it (images.probe); anything that still
fails DALI's decoder fails its batch, and the runner then checks that batch's files with a
full Pillow decode and rebuilds the pipeline at that batch.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import dali as dali_mod
from . import transforms
from .datasets import ArrayDataset, ImageFolder, load_dataset
from .errors import CorruptImageError, DatasetError, ImageTooLargeError
from .images import MAX_PIXELS_ENV, open_image, probe, resolve_max_pixels
from .recipes import EVAL_CROP, Recipe, batch_rng, draw_params, get_recipe

DEVICES = ("auto", "dali-gpu", "dali-cpu", "portable")
NAMED_PER_EPOCH = 20  # skipped files named in an epoch's summary line (all: Loader.bad_files)
SMALL_SIDE = 64  # arrays up to this side: 32-px default, whole-image eval, grid_sample path
ALIASES = {"gpu": "dali-gpu", "cpu": "dali-cpu"}


# ----------------------------------------------------------------------------- arguments
def resolve_backend(device: str) -> str:
    """"auto" -> dali-gpu (CUDA + DALI), dali-cpu (DALI), else portable."""
    dev = ALIASES.get(device, device)
    if dev not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (or 'gpu'/'cpu'), got {device!r}")
    have_dali = dali_mod.available()
    if dev == "auto":
        if not have_dali:
            return "portable"
        return "dali-gpu" if torch.cuda.is_available() else "dali-cpu"
    if dev.startswith("dali") and not have_dali:
        raise RuntimeError(f"device={device!r} needs NVIDIA DALI, which is not installed: "
                           "pip install nvidia-dali-cuda120 (Linux x86_64/aarch64), or use "
                           "device='portable'")
    if dev == "dali-gpu" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} needs CUDA, which is not available; use "
                           "'dali-cpu' or 'portable'")
    return dev


def _dataset(data, in_chans: int, unlabeled: bool = False) -> ArrayDataset | ImageFolder:
    if isinstance(data, (ArrayDataset, ImageFolder)):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        images, labels = np.asarray(data[0]), np.asarray(data[1]).astype(np.int64)
        return ArrayDataset(images, labels, [], "arrays", "in memory")
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data, "train", unlabeled=unlabeled)
    raise ValueError("data must be a dataset name, an image-folder path, an ArrayDataset or "
                     f"ImageFolder, or an (images, labels) tuple; got {type(data).__name__}")


def _arrays(ds: ArrayDataset, in_chans: int) -> np.ndarray:
    """uint8 (N, H, W, C) with C = 1 or 3, converted to grey for in_chans=1."""
    x = ds.images if ds.images.ndim == 4 else ds.images[..., None]
    if x.shape[-1] not in (1, 3):
        raise DatasetError(f"{ds.name}: images must have 1 or 3 channels, got {x.shape}")
    if in_chans == 1 and x.shape[-1] == 3:  # Pillow's "L": ITU-R 601-2 luma
        x = np.round(x @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- the loader
class Loader:
    """Iterate for (views, labels): views a list of float32 (B, C, H, W), labels int64 (B,).

    len(): batches of this shard per epoch. Call set_epoch(e) before each epoch.
    num_samples: images of this shard per epoch. view_sizes: output side of each view.
    backend: "dali-gpu" | "dali-cpu" | "portable". recipe: the Recipe (mean, std, views).
    skipped: images skipped this epoch; bad_files: every file found unusable so far.
    max_pixels: the pixel limit in force (0: none).
    """

    def __init__(self, ds, recipe: Recipe, batch_size: int, backend: str, *, num_threads: int,
                 seed: int, shard_id: int, num_shards: int, drop_last: bool,
                 on_corrupt: str, max_pixels: int = 0) -> None:
        self.recipe, self.batch_size, self.backend = recipe, batch_size, backend
        self.num_threads, self.seed = num_threads, seed
        self.shard_id, self.num_shards, self.drop_last = shard_id, num_shards, drop_last
        self.on_corrupt, self.max_pixels = on_corrupt, max_pixels
        self.dataset = ds
        self.files = isinstance(ds, ImageFolder)
        self.labels = np.asarray(ds.labels, dtype=np.int64)
        self.mode = "RGB" if recipe.in_chans == 3 else "L"
        if self.files:
            self.paths = [p for p, _ in ds.samples]
            self.src_chans = recipe.in_chans
        else:
            self.images = _arrays(ds, recipe.in_chans)
            self.src_chans = self.images.shape[-1]
            self.hw = np.array(self.images.shape[1:3], np.float64)
        n = len(self.labels)
        if n == 0:
            raise DatasetError(f"dataset {getattr(ds, 'name', '')!r} is empty")
        per = n // num_shards if drop_last else math.ceil(n / num_shards)
        self.num_samples = per  # images in this shard per epoch
        self._len = per // batch_size if drop_last else math.ceil(per / batch_size)
        self.epoch = 0
        self.bad: dict[str, CorruptImageError] = {}  # found so far, by path
        self._skips: dict[int, str] = {}  # this epoch: shard position -> skipped path
        self._pool = None
        self._runner = None
        self._fatal: CorruptImageError | None = None

    # ---------------------------------------------------------------- public
    def __len__(self) -> int:
        return self._len

    @property
    def view_sizes(self) -> list[int]:
        return self.recipe.view_sizes

    @property
    def skipped(self) -> int:
        return len(self._skips)

    @property
    def bad_files(self) -> list[str]:
        return sorted(self.bad)

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __iter__(self):
        self._skips = {}
        order = self.order(self.epoch)
        try:
            if self.backend == "portable":
                yield from _prefetch(lambda i: self._portable_batch(order, i), len(self))
            else:
                yield from self._dali_batches(order)
        except GeneratorExit:  # the caller stopped mid-epoch (a run ending at --steps)
            self._warn_skipped()
            raise
        self._warn_skipped()  # (an error ends the epoch with its own message instead)

    def _warn_skipped(self) -> None:
        if self._skips:
            warnings.warn(self.skip_summary(), stacklevel=3)

    def skip_summary(self) -> str:
        """One line for this epoch's skipped files: how many, which, and why."""
        paths = sorted(set(self._skips.values()))
        big = [p for p in paths if isinstance(self.bad.get(p), ImageTooLargeError)]
        broken = [p for p in paths if p not in set(big)]
        parts = []
        if broken:
            named = "; ".join(f"{p}: {self.bad[p].reason}" for p in broken[:NAMED_PER_EPOCH])
            parts.append(f"{len(broken)} corrupt or truncated ({named}"
                         f"{self._more(len(broken))})")
        if big:
            named = "; ".join(f"{p} ({self.bad[p].width} x {self.bad[p].height})"
                              for p in big[:NAMED_PER_EPOCH])
            parts.append(f"{len(big)} over the pixel limit of {self.max_pixels:,} (raise it "
                         f"with --max-pixels N or {MAX_PIXELS_ENV}=N, 0 for none: {named}"
                         f"{self._more(len(big))})")
        return (f"epoch {self.epoch}: skipped {len(self._skips)} image(s), each replaced by "
                f"the next readable one: " + "; and ".join(parts))

    @staticmethod
    def _more(n: int) -> str:
        return f"; and {n - NAMED_PER_EPOCH} more: see Loader.bad_files" \
            if n > NAMED_PER_EPOCH else ""

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices of this shard for `epoch`, in batch order."""
        n = len(self.labels)
        if self.recipe.deterministic:
            perm = np.arange(n)
        else:
            perm = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x0D])
                                         ).permutation(n)
        s = self.num_shards
        total = n - n % s if self.drop_last else n + (-n) % s
        perm = np.resize(perm, total)  # truncates, or pads by repeating from the start
        return perm[self.shard_id::s]

    # ---------------------------------------------------------------- one batch
    def _positions(self, i: int) -> range:
        return range(i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples))

    def _params(self, i: int, hw: np.ndarray) -> list[np.ndarray]:
        rng = batch_rng(self.seed, self.epoch, self.shard_id, i)
        return [draw_params(v, rng, hw).astype(np.float32) for v in self.recipe.views]

    def _array_batch(self, order, i):
        idx = order[self._positions(i)]
        hw = np.tile(self.hw, (len(idx), 1))
        return self.images[idx], self.labels[idx], self._params(i, hw)

    def _file_batch(self, order, i, load):
        """Load every file of batch i with `load(path) -> (payload, (h, w))`, substituting
        corrupt ones; returns payloads, labels, params, paths."""
        pos = list(self._positions(i))
        pool = self._threads()
        got = list(pool.map(lambda p: self._try(load, self.paths[order[p]]), pos))
        idx = [order[p] for p in pos]
        for j, (p, g) in enumerate(zip(pos, got, strict=True)):
            if isinstance(g, CorruptImageError):
                self._skips[p] = self.paths[order[p]]
                idx[j], got[j] = self._substitute(order, p, load)
        payloads, hw = [g[0] for g in got], np.array([g[1] for g in got], np.float64)
        return payloads, self.labels[idx], self._params(i, hw), [self.paths[k] for k in idx]

    def _try(self, load, path):
        if path in self.bad:
            return self.bad[path]
        try:
            return load(path)
        except CorruptImageError as e:
            self._mark_bad(e)
            return e

    def _mark_bad(self, e: CorruptImageError) -> None:
        if self.on_corrupt == "error":
            self._fatal = e  # DALI may wrap what its callback raises: keep the original
            raise e
        self.bad.setdefault(e.path, e)  # named in the epoch's one summary line

    def _substitute(self, order, p: int, load):
        """The next decodable image after shard position p (cyclic): deterministic, since
        corruption is a property of the files."""
        m = len(order)
        for k in range(1, m):
            g = self._try(load, self.paths[order[(p + k) % m]])
            if not isinstance(g, CorruptImageError):
                return order[(p + k) % m], g
        named = "; ".join(str(e) for e in list(self.bad.values())[:3])
        raise DatasetError(f"no decodable image in this shard of {self.dataset.root} "
                           f"({len(self.bad)} unusable files: {named})")

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:  # Pillow releases the GIL while decoding and resizing
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="selfsup-data")
        return self._pool

    # ---------------------------------------------------------------- portable backend
    def _portable_batch(self, order, i):
        r = self.recipe
        if not self.files:
            images, labels, params = self._array_batch(order, i)
            if self.hw.max() <= SMALL_SIDE:  # small: one batched grid_sample per view
                views = transforms.augment_arrays(images, params, r.views, r.mean, r.std,
                                                  r.in_chans)
                return views, torch.from_numpy(labels)
            from PIL import Image  # large arrays shrink: Pillow's antialiased resize

            imgs = [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in images]
        else:
            load = lambda path: (lambda im: (im, (im.height, im.width)))(
                open_image(path, self.mode, max_pixels=self.max_pixels))
            imgs, labels, params, _ = self._file_batch(order, i, load)
        crops = list(self._threads().map(
            lambda b: [transforms.crop_resize_pil(imgs[b], params[v][b], view.size, view.interp)
                       for v, view in enumerate(r.views)], range(len(imgs))))
        per_view = [[c[v] for c in crops] for v in range(len(r.views))]
        views = transforms.augment_crops(per_view, params, r.views, r.mean, r.std, r.in_chans)
        return views, torch.from_numpy(labels)

    # ---------------------------------------------------------------- DALI backend
    def _probe(self, path: str):
        """Encoded bytes and (h, w) of a file for DALI's decoder (images.probe)."""
        return probe(path, self.mode, self.max_pixels)

    def _dali_prepare(self, order, i):
        if self.files:
            data, labels, params, paths = self._file_batch(order, i, self._probe)
        else:
            data, labels, params = self._array_batch(order, i)
            paths = None
        return (data, *params), (labels, paths)

    def _dali_recover(self, metas, error) -> bool:
        """A batch failed in DALI: full-decode its files with Pillow and mark the bad ones."""
        if self._fatal is not None:
            raise self._fatal
        found = False
        for _, paths in metas:
            for path in paths or ():
                if path in self.bad:
                    continue
                try:
                    open_image(path, self.mode, max_pixels=self.max_pixels)
                except CorruptImageError as e:
                    self._mark_bad(e)
                    found = True
        return found

    def _dali_batches(self, order):
        if self._runner is None:
            gpu = self.backend == "dali-gpu"
            dev = torch.cuda.current_device() if gpu else None

            def make(source):
                return dali_mod.build_pipeline(
                    self.recipe, source, encoded=self.files, src_chans=self.src_chans,
                    batch_size=self.batch_size, num_threads=self.num_threads, device_id=dev,
                    src_side=None if self.files else int(self.hw.max()))

            self._runner = dali_mod.DaliRunner(make, gpu)
        r = self.recipe
        for views, (labels, _) in self._runner.run(
                len(self), lambda i: self._dali_prepare(order, i), self._dali_recover):
            # stock operators: uint8 (B, S, S, C) -> float32 (B, C', S, S); the fused
            # operator's views are normalized already
            views = [transforms.normalize(v.permute(0, 3, 1, 2), r.mean, r.std, r.in_chans)
                     if v.dtype == torch.uint8 else v for v in views]
            yield views, torch.from_numpy(labels)


_END = object()


def _prefetch(make_batch, n: int, depth: int = 2):
    """Yield make_batch(0..n-1), computed `depth` batches ahead in a background thread.

    Order and content are unchanged (batch i is a pure function of i); torch and Pillow
    release the GIL, so the next batch is built while the caller trains on this one."""
    return background((make_batch(i) for i in range(n)), depth, "selfsup-prefetch")


def background(items, depth: int, name: str = "selfsup-background"):
    """Yield `items` (any iterable), drawn `depth` ahead by a daemon thread of that `name`.

    An exception raised while drawing is re-raised here, after the items before it; closing
    this generator early (break, error) stops the thread, which never blocks on a full queue
    nobody reads."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put((False, e))

    t = threading.Thread(target=work, daemon=True, name=name)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        t.join()


# ----------------------------------------------------------------------------- entry point
def build_loader(data, recipe: str, batch_size: int, *, device: str = "auto",
                 img_size: int | None = None, num_threads: int | None = None,
                 seed: int | None = None, shard_id: int = 0, num_shards: int = 1,
                 drop_last: bool = True, in_chans: int = 3, on_corrupt: str = "skip",
                 max_pixels: int | None = None, unlabeled: bool = False,
                 **recipe_overrides) -> Loader:
    """Multi-view augmented batches of `data` for `recipe` (see recipes.py).

    Args:
      data: "fashion-mnist", "fashion-mnist-sample", "mnist", an image-folder path, an
        ArrayDataset / ImageFolder, or a tuple (uint8 images (N, H, W[, C]), labels (N,)).
      recipe: "mocov1", "mocov2", "byol", "dino", "mae" or "eval" (deterministic, 1 view).
      device: "auto" | "dali-gpu" | "dali-cpu" | "portable" ("gpu"/"cpu" alias the DALI ones).
      img_size: output side; None -> 32 for arrays of <= 64 px, else 224. The "eval" recipe
        resizes such small arrays whole; folders and larger arrays get the shorter side
        resized to img_size*256/224 and the centre img_size x img_size crop.
      num_threads: DALI / Pillow threads; None -> all cores.
      seed: None -> 0. Batches are a pure function of (seed, epoch, shard_id, batch index).
      shard_id, num_shards: this rank's disjoint, equally long shard.
      drop_last: drop each shard's last partial batch (and truncate the dataset to a multiple
        of num_shards); False keeps it (and pads by repeating the first images).
      in_chans: 3 (grey replicated) or 1 (colour converted to grey).
      on_corrupt: "skip" (substitute, one summary line per epoch) or "error" (raise
        CorruptImageError).
      max_pixels: images with more pixels are skipped as unusable (from the header, nothing
        decoded); None -> $SELFSUP_MAX_PIXELS, else images.DEFAULT_MAX_PIXELS; 0: no limit.
      unlabeled: for a folder path: its folders are not classes (datasets.ImageFolder).
      recipe_overrides: e.g. n_local=, local_size=, scale=, mean=, std= (see get_recipe).
    Returns:
      a Loader; iterate for (views, labels): views a list of float32 (B, C, S_v, S_v)
      normalized with recipe.mean/std (CUDA tensors for dali-gpu), labels int64 (B,).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(num_shards, int) and num_shards >= 1 and 0 <= shard_id < num_shards):
        raise ValueError(f"need num_shards >= 1 and 0 <= shard_id < num_shards, got "
                         f"shard_id={shard_id!r}, num_shards={num_shards!r}")
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
    if num_threads is not None and num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 or None, got {num_threads!r}")
    limit = resolve_max_pixels(max_pixels)
    backend = resolve_backend(device)
    ds = _dataset(data, in_chans, unlabeled)
    large = isinstance(ds, ImageFolder) or max(ds.images.shape[1:3]) > SMALL_SIDE
    if img_size is None:
        img_size = 224 if large else 32
    if recipe == "eval" and large:  # shorter side to S*256/224, then the centre S x S
        recipe_overrides.setdefault("center_crop", EVAL_CROP)
    r = get_recipe(recipe, img_size, in_chans, **recipe_overrides)
    threads = (os.cpu_count() or 1) if num_threads is None else max(1, num_threads)
    return Loader(ds, r, int(batch_size), backend, num_threads=threads,
                  seed=0 if seed is None else int(seed), shard_id=shard_id,
                  num_shards=num_shards, drop_last=drop_last, on_corrupt=on_corrupt,
                  max_pixels=limit)


