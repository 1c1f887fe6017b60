"""The file scan of an image tree: the cached index (selfsup/data/scan.py) vs walking it.

Rows, on a tree of empty files made here (ImageNet's shape: class folders of JPEG names):
  - scandir: a plain recursive os.scandir walk keeping the image names (the floor of any
    uncached scan: one directory entry per file);
  - walk: selfsup's uncached scan (scan.walk: the same walk, plus each directory's mtime and
    the sort by path parts);
  - cached: scan.scan_images finding a valid index (one stat per directory, one listing of
    the root, then reading the index file);
  - imagefolder: ImageFolder on the cached tree, i.e. what a run's start pays (index plus
    building the (path, label) samples).
The 1M-entry tree (1,000 folders x 1,000 files, like ImageNet's 1,000 x ~1,281) is marked
slow: building it takes about a minute. Figures: docs/data.md. Timings are of a warm page
cache (the tree was just made); on a cold disk or a network filesystem the walk costs far
more, the cached path about the same (it reads one file and stats the folders).
"""

from __future__ import annotations

import os
import time

import pytest
from _harness import versions

from selfsup.data import scan as scan_mod
from selfsup.data.datasets import IMG_EXTENSIONS, ImageFolder

SIZES = {  # name: (folders, files per folder)
    "10k": (100, 100),
    "1M": (1000, 1000),
}
PARAMS = [pytest.param(k, marks=() if k == "10k" else pytest.mark.slow) for k in SIZES]
IMPLS = ("scandir", "walk", "cached", "imagefolder")


def build_tree(root, folders: int, per: int) -> str:
    """`folders` class folders of `per` empty .JPEG files, mtimes set an hour back (a tree
    at rest: a freshly changed one is not cached, see scan.py's racy-mtime rule)."""
    for d in range(folders):
        path = os.path.join(root, f"n{d:08d}")
        os.mkdir(path)
        for i in range(per):
            os.close(os.open(os.path.join(path, f"n{d:08d}_{i}.JPEG"),
                             os.O_CREAT | os.O_WRONLY, 0o644))
    t = time.time() - 3600
    for d in range(folders):
        os.utime(os.path.join(root, f"n{d:08d}"), (t, t))
    os.utime(root, (t, t))
    return str(root)


def plain_scandir(root: str, exts) -> list[str]:
    out, stack = [], [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir():
                    stack.append(e.path)
                elif e.name.lower().endswith(exts):
                    out.append(e.path)
    return out


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            folders, per = SIZES[name]
            made[name] = build_tree(tmp_path_factory.mktemp(f"scan{name}"), folders, per)
        return made[name]

    return get


@pytest.mark.parametrize("size", PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_scan(benchmark, trees, size, impl, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = trees(size)
    folders, per = SIZES[size]
    exts = tuple(e.lower() for e in IMG_EXTENSIONS)
    scan_mod.scan_images(root, IMG_EXTENSIONS)  # writes the index (the tree is at rest)
    assert os.path.isfile(os.path.join(root, scan_mod.INDEX_NAME))
    fn = {
        "scandir": lambda: plain_scandir(root, exts),
        "walk": lambda: scan_mod.walk(root, IMG_EXTENSIONS)[0],
        "cached": lambda: scan_mod.scan_images(root, IMG_EXTENSIONS),
        "imagefolder": lambda: ImageFolder(root).samples,
    }[impl]
    if impl in ("cached", "imagefolder"):  # it must really be the index that answers
        monkeypatch.setattr(scan_mod, "walk", lambda *a: pytest.fail("walked: no index"))
    out = benchmark.pedantic(fn, rounds=3 if size == "1M" else 10, iterations=1,
                             warmup_rounds=1)
    assert len(out) == folders * per
    info = benchmark.extra_info
    info.update(versions())
    info.update(impl=impl, shape=f"{folders} folders x {per} files",
                index_mb=round(os.path.getsize(os.path.join(root, scan_mod.INDEX_NAME)) / 2**20,
                               2))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        info["median_s"] = round(stats.stats.median, 4)
        info["entries/s"] = round(folders * per / stats.stats.median)
