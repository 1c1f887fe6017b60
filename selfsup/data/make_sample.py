"""Regenerate the committed Fashion-MNIST sample from Debian's idx files.

    python -m selfsup.data.make_sample [--root /usr/share/datasets/fashion-mnist]

Stratified: 200 images per class from the official train split and 50 per class from the
official test split, drawn with numpy's default_rng(SEED) without replacement, in class order
then ascending index. Written as an LZMA-compressed npz with fixed zip timestamps, so the same
source files and seed give the same bytes (and md5). The md5s of the sources and of the
result, the seed and the licence go to fashion_mnist_sample.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from .datasets import (
    FASHION_MNIST_DIR,
    IDX_FILES,
    SAMPLE_META,
    SAMPLE_PATH,
    _find_idx,
    load_fashion_mnist,
)

SEED = 0
PER_CLASS = {"train": 200, "test": 50}
LICENSE = "MIT, Copyright (c) 2017 Zalando SE; full text in FASHION_MNIST_LICENSE.md"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
             for c in range(int(labels.max()) + 1)]
    return np.concatenate(picks)


def build_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic npz: fixed member order and timestamps, LZMA (np.load reads it)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]),
                                      allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def make_sample(root: str | Path, seed: int = SEED) -> tuple[bytes, dict]:
    """(npz bytes, metadata) for the sample drawn from the idx files in `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    arrays, sources = {}, {}
    for split in ("train", "test"):
        ds = load_fashion_mnist(split, root, fallback=False)
        idx = stratified_indices(ds.labels, PER_CLASS[split], rng)
        arrays[f"x_{split}"] = ds.images[idx]
        arrays[f"y_{split}"] = ds.labels[idx].astype(np.uint8)
        arrays[f"index_{split}"] = idx.astype(np.int32)  # rows of the official split
        for stem in IDX_FILES[split]:
            f = _find_idx(root, stem)
            sources[f.name] = md5(f.read_bytes())
    data = build_npz(arrays)
    meta = {
        "description": "Stratified sample of Fashion-MNIST: 200/class from the official train "
                       "split, 50/class from the official test split.",
        "source": "Debian package dataset-fashion-mnist (" + FASHION_MNIST_DIR + ")",
        "source_md5": sources,
        "seed": seed,
        "generator": "python -m selfsup.data.make_sample",
        "counts": {s: PER_CLASS[s] * 10 for s in PER_CLASS},
        "md5": md5(data),
        "license": LICENSE,
    }
    return data, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=FASHION_MNIST_DIR)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default=str(SAMPLE_PATH))
    args = p.parse_args(argv)
    data, meta = make_sample(args.root, args.seed)
    Path(args.out).write_bytes(data)
    meta_path = SAMPLE_META if args.out == str(SAMPLE_PATH) else Path(args.out + ".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} ({len(data) / 2**20:.3f} MiB, md5 {meta['md5']}) and {meta_path}")


if __name__ == "__main__":
    main()
