"""Barlow Twins and VICReg over 2 gloo ranks equal one process on the concatenated batch.

Each rank holds half of one fixed float64 batch. The loss must be the single-process loss on
the whole batch (global BatchNorm statistics, global cross-correlation / covariances), and
each rank's gradient of its own rows must be WORLD x the single-process gradient of those rows:
`selfsup.dist.all_gather_with_grad`'s convention, which DDP's gradient averaging turns into
the single-process gradient exactly. Both routes (N x N Gram: 2N <= D; direct: 2N > D) and
every path (Triton runs through the interpreter here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from selfsup.kernels import barlow_twins_loss, vicreg_loss

WORLD = 2
N = 12  # global batch
LOSSES = {"barlow": (barlow_twins_loss, dict(lambd=0.3)),
          "vicreg": (vicreg_loss, dict(sim=2.0, var=3.0, cov=4.0))}
DIMS = [30, 7]  # 2N <= D: Gram route; 2N > D: direct route

pytestmark = pytest.mark.dist


def batch(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + d)
    z1 = torch.randn(N, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    z2 = 0.5 * z1 + torch.randn(N, d, generator=g, dtype=torch.float64) * 0.6
    return z1, z2


def loss_and_grads(name: str, z1: torch.Tensor, z2: torch.Tensor):
    fn, kw = LOSSES[name]
    z1, z2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(z1, z2, **kw)
    g1, g2 = torch.autograd.grad(loss * 1.7, (z1, z2))
    return loss.detach(), g1, g2


def _rank_main(rank: int, path: str, init_file: str, out_dir: str) -> None:
    os.environ["SELFSUP_KERNELS"] = path
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=WORLD)
    try:
        out = {}
        n = N // WORLD
        for name in LOSSES:
            for d in DIMS:
                z1, z2 = batch(d)
                out[f"{name}/{d}"] = loss_and_grads(name, z1[rank * n:(rank + 1) * n],
                                                    z2[rank * n:(rank + 1) * n])
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("path", ["torch", "triton", "ref"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(path, tmp_path, monkeypatch):
    if path == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton path needs the interpreter on CPU")
    mp.spawn(_rank_main, args=(path, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    monkeypatch.setenv("SELFSUP_KERNELS", path)
    n = N // WORLD
    for name in LOSSES:
        for d in DIMS:
            loss, g1, g2 = loss_and_grads(name, *batch(d))
            for r, res in enumerate(ranks):
                rl, rg1, rg2 = res[f"{name}/{d}"]
                rows = slice(r * n, (r + 1) * n)
                torch.testing.assert_close(rl, loss, rtol=1e-10, atol=1e-12, msg=f"{name}/{d}")
                torch.testing.assert_close(rg1, WORLD * g1[rows], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(rg2, WORLD * g2[rows], rtol=1e-9, atol=1e-12)
