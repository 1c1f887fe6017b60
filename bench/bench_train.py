"""Training-step time and img/s per method, fused kernels on vs the paper-style references.

    make bench                                   # every row, production shapes included
    pytest bench/bench_train.py --benchmark-enable --benchmark-only -m "" -k paper

One row = one optimizer step (forward, backward, optimizer, on_step_end) on fixed random
views, so the data loader is not part of it. `impl` is the kernel path for every loss and
masking op of the step: "ref" is the papers' pseudocode, "torch" the portable chunked path,
"triton" the fused kernels (CUDA only: the CPU interpreter's timings mean nothing).
"paper" uses each method's paper-scale loss shapes (MoCo's 65536-key queue, DINO's 65536
prototypes with 2 + 8 crops) on the small CPU backbones; "small" runs in the test suite once.
"""

from __future__ import annotations

import pytest
import torch
from _harness import device, run, skip_if_interpreted

from selfsup.engine.config import build_parser, resolve
from selfsup.engine.optim import build_optimizer
from selfsup.ssl import METHODS

ARCH = {"dino": "vit_tiny", "mae": "vit_tiny", "ibot": "vit_tiny", "dinov2": "vit_tiny"}
SIZES = {
    # name: (batch, image side, extra flags)
    "small": (16, 16, ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64",
                       "--queue-size", "256", "--out-dim", "256", "--n-local", "2",
                       "--decoder-dim", "32", "--decoder-depth", "1"]),
    "paper": (128, 32, ["--queue-size", "65536", "--out-dim", "65536", "--n-local", "8",
                        "--proj-hidden", "2048", "--pred-hidden", "2048"]),
}


def build_step(method_name: str, size: str):
    batch, img, extra = SIZES[size]
    argv = ["--method", method_name, "--arch", ARCH.get(method_name, "resnet_tiny"),
            "--img-size", str(img), "--batch-size", str(batch), *extra]
    cfg = resolve(vars(build_parser().parse_args(argv)), METHODS[method_name].preset)
    cfg.extra.update(steps_per_epoch=100, schedule_steps=100)
    torch.manual_seed(0)
    method = METHODS[method_name](cfg).to(device())
    opt = build_optimizer(method.param_groups(cfg), cfg)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    views = make_views(method, cfg, batch, img)
    state = {"step": 0}

    def step():
        out = method(views)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(state["step"], 100)
        state["step"] += 1
        return out["loss"]

    return step, batch, len(views)


def make_views(method, cfg, batch: int, img: int) -> list[torch.Tensor]:
    n_views = {"dino": 2 + cfg.n_local, "ibot": 2 + cfg.n_local, "dinov2": 2 + cfg.n_local,
               "mae": 1}.get(cfg.method, 2)
    local = max(8, round(img * 96 / 224 / 8) * 8)
    sizes = [img if v < 2 else local for v in range(n_views)]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, cfg.in_chans, s, s, generator=g).to(device()) for s in sizes]


@pytest.mark.parametrize("size", ["small", pytest.param("paper", marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", ["ref", "torch", "triton"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step(benchmark, monkeypatch, method, impl, size):
    skip_if_interpreted(impl)
    monkeypatch.setenv("SELFSUP_KERNELS", impl)
    step, batch, n_views = build_step(method, size)
    step()  # warm-up: lazy buffers, first-call allocations
    rounds = 3 if size == "paper" else None
    run(benchmark, step, impl=impl, shape=f"{size}: batch {batch} x {n_views} views",
        rounds=rounds, method=method)
    us = benchmark.extra_info.get("median_us")
    if us:
        benchmark.extra_info["img_per_s"] = round(batch * 1e6 / us, 1)
