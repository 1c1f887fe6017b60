"""torch.distributed helpers shared by kernels (DINO center), methods and the engine.

Everything degrades to the single-process identity when torch.distributed is not
initialized, so the same code runs on a laptop and under torchrun.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order). No gradient.

    All ranks must pass the same shape.
    """
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    Rank r's loss depends on every rank's rows, so the gradient of rank s's rows is the
    sum over ranks of d loss_r / d rows_s: an all_reduce(SUM) then a local slice. With DDP
    averaging parameter gradients, this reproduces single-process training on the
    concatenated batch exactly.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank; gradients flow back to every rank's own slice."""
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (identity without torch.distributed); returns `x`."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """In-place mean across ranks; returns `x`."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x.div_(world_size())
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(x, src)
    return x
