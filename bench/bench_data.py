"""Augmentation throughput: DALI CPU vs the portable fallback (and DALI GPU under CUDA).

Rows: backend x workload. Backends: portable; dali-cpu (the default DALI CPU pipeline: the
fused view operator of selfsup/data/csrc/view_op.cc); dali-cpu-stock (DALI's stock operators,
SELFSUP_DALI_PLUGIN=0, what dali-cpu falls back to without a C++ compiler); dali-gpu. A
workload is a recipe on a
source: Fashion-MNIST arrays (mocov2 2x32, dino 2x32 + 10x16) or a folder of 224-320 px JPEGs
made here from upscaled, tinted Fashion-MNIST images (mocov2 2x224, dino 2x224 + 10x96).
Each timed call pulls `steps` batches from a loader that is already built and warm (epochs
roll over inside), so the figure is steady-state images/s, recorded as extra_info["img/s"]
(with the thread count: ROOFLINE.md's CPU targets are per effective core).

The non-slow rows are tiny smoke runs; `-m slow` runs the real sizes.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _harness import run
from PIL import Image

from selfsup.data import build_loader, dali_plugin, load_fashion_mnist, load_fashion_mnist_sample
from selfsup.data import dali as dali_mod

THREADS = min(2, os.cpu_count() or 1)  # the target is stated on 2 cores
BACKENDS = [
    "portable",
    pytest.param("dali-cpu", marks=pytest.mark.skipif(not dali_mod.available(),
                                                      reason="nvidia-dali not installed")),
    pytest.param("dali-cpu-stock", marks=pytest.mark.skipif(not dali_mod.available(),
                                                            reason="nvidia-dali not installed")),
    pytest.param("dali-gpu", marks=pytest.mark.skipif(
        not (dali_mod.available() and torch.cuda.is_available()), reason="needs CUDA + DALI")),
]
# name: (source, recipe, img_size, n_local, batch, steps)
WORKLOADS = {
    "fmnist-mocov2-tiny": ("fmnist-sample", "mocov2", 32, None, 32, 2),
    "jpeg-dino-tiny": ("jpeg-16", "dino", 224, 2, 4, 1),
    "fmnist-mocov2": ("fmnist", "mocov2", 32, None, 256, 40),  # steps: ~0.3 s a round
    "fmnist-dino": ("fmnist", "dino", 32, 10, 256, 16),
    "jpeg-mocov2": ("jpeg-256", "mocov2", 224, None, 32, 8),
    "jpeg-dino": ("jpeg-256", "dino", 224, 10, 32, 4),
}
PARAMS = [pytest.param(k, marks=() if k.endswith("tiny") else pytest.mark.slow)
          for k in WORKLOADS]


def make_jpeg_folder(root, n: int) -> str:
    """n JPEGs of 224-320 px: real Fashion-MNIST garments, upscaled and tinted (colour ops
    have colour to act on), in class folders."""
    ds = load_fashion_mnist_sample("train")
    rng = np.random.default_rng(0)
    for i in range(n):
        j = (i * 97) % len(ds)
        d = root / f"class{ds.labels[j]}"
        d.mkdir(parents=True, exist_ok=True)
        tint, base = rng.uniform(0.4, 1.0, 3), rng.uniform(0, 60, 3)
        rgb = np.clip(ds.images[j][..., None] * tint + base, 0, 255).astype(np.uint8)
        size = (int(rng.integers(224, 321)), int(rng.integers(224, 321)))
        Image.fromarray(rgb).resize(size, Image.BICUBIC).save(d / f"{i:04d}.jpg", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            if name == "fmnist-sample":
                cache[name] = load_fashion_mnist_sample("train")
            elif name == "fmnist":
                cache[name] = load_fashion_mnist("train")
            else:
                n = int(name.split("-")[1])
                cache[name] = make_jpeg_folder(tmp_path_factory.mktemp(name), n)
        return cache[name]

    return get


def forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@pytest.mark.parametrize("workload", PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_throughput(benchmark, sources, backend, workload, monkeypatch):
    src, recipe, img_size, n_local, batch, steps = WORKLOADS[workload]
    kw = {"n_local": n_local} if n_local else {}
    device = backend
    if backend == "dali-cpu-stock":
        monkeypatch.setenv("SELFSUP_DALI_PLUGIN", "0")
        device = "dali-cpu"
    elif backend == "dali-cpu" and not dali_plugin.load():
        pytest.skip("the fused DALI CPU operator cannot be built here")
    loader = build_loader(sources(src), recipe, batch, device=device, img_size=img_size,
                          num_threads=THREADS, seed=0, **kw)
    stream = forever(loader)
    views, labels = next(stream)  # builds and warms the pipeline
    assert len(labels) == batch and views[0].shape[-1] == img_size

    def pull():
        for _ in range(steps):
            out = next(stream)
        return out

    run(benchmark, pull, impl=backend, shape=f"{workload} b{batch}x{steps}",
        rounds=5, threads=THREADS,
        views="+".join(f"{n}x{s}" for s, n in _count(loader.view_sizes)))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        ips = batch * steps / stats.stats.median
        benchmark.extra_info["img/s"] = round(ips, 1)
        benchmark.extra_info["img/s/thread"] = round(ips / THREADS, 1)


def _count(sizes):
    out = []
    for s in sizes:
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out
