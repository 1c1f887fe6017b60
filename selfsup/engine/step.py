"""One optimizer step of the loop: gradient accumulation, and no host sync in between checks.

A GPU runs ahead of the Python loop only while the host never waits for it. Reading a loss
(`.item()`, `float()`, `bool()` of a device tensor) or an all_reduce of a Python flag makes
the host wait for every queued kernel, every step. So between two checks (every
--log-every steps, before a checkpoint, at the last step) the loop keeps everything it will
need on the device:

- NonFiniteWatch: a running OR of ~isfinite(loss) and the step where it first became true;
- the logged values (loss, the method's logs, gradient norms) stay tensors until a log
  step, where read_scalars brings them over in one copy.

What this costs: a NaN is found at the next check, not at once (the steps in between may
already have updated the weights with it; the error names the first bad step and the
diagnostic checkpoint says it holds weights from after it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from .. import dist


class NonFiniteWatch:
    """Device-side record of non-finite losses since the start: `bad` (bool scalar) and
    `first` (int64 scalar, -1 until a loss is non-finite: the step where one first was)."""

    def __init__(self, device: torch.device) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Fold `loss` (any shape) of optimizer step `step` in; queues kernels, never waits."""
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self.first = torch.where(nonfinite & ~self.bad, step, self.first)
        self.bad = self.bad | nonfinite

    def check(self, signal: bool) -> tuple[int | None, bool]:
        """(first non-finite step on any rank or None, whether a signal reached any rank).

        One device->host read, and on several ranks one all_reduce(MAX) of three numbers,
        so every rank stops at the same step."""
        never = torch.iinfo(torch.int64).max
        first = torch.where(self.bad, self.first, never)
        flags = torch.stack([self.bad.to(torch.int64), -first,
                             torch.full_like(first, int(signal))])
        if dist.is_dist():
            import torch.distributed as tdist

            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        bad, neg_first, sig = flags.tolist()
        return (-neg_first if bad else None), bool(sig)


def read_scalars(values: dict) -> dict[str, float]:
    """Every number and 1-element tensor of `values` as a float, in `values`' order, with a
    single device->host copy for all the tensors together (the log step's one sync)."""
    keys, tensors = [], []
    for k, v in values.items():
        if torch.is_tensor(v) and v.numel() == 1:
            if hasattr(v, "full_tensor"):  # FSDP2's DTensor (a sharded grad norm): a
                v = v.full_tensor()  # collective, so every rank calls read_scalars
            keys.append(k)
            tensors.append(v.detach().reshape(()).double())
    read = {}
    if tensors:
        dev = tensors[0].device
        read = dict(zip(keys, torch.stack([t.to(dev) for t in tensors]).tolist(), strict=True))
    out = {}
    for k, v in values.items():
        if k in read:
            out[k] = read[k]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def grad_sync(model: nn.Module, enabled: bool):
    """A context in which backward does (enabled) or does not all-reduce gradients:
    DDP's no_sync, FSDP2's set_requires_gradient_sync, nothing on one process."""
    if enabled:
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: back on for the last one
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP: gradients accumulate locally, no allreduce
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, scaler, micro_batches: list, *, step: int,
                     watch: NonFiniteWatch, amp_dtype: torch.dtype | None, device_type: str,
                     check: Callable[[], bool] | None = None) -> dict | None:
    """Forward and backward over the micro-batches of one optimizer step; the gradients
    (scaled by GradScaler when it is enabled) are left in .grad for the optimizer.

    Each micro-batch's loss is divided by their number N, so the summed gradient is the
    mean over the N micro-batches, as one batch of N x B would give for a loss that is a
    mean over independent samples (MAE). Gradients are all-reduced across ranks only in the
    last micro-batch's backward (DDP no_sync before it).

    check (at a check step): called once after the last forward and before its backward;
    True -> return None without a backward (the loop stops before this update).

    Returns the method's logs averaged over the micro-batches (tensors: no host read).
    """
    n = len(micro_batches)
    logs: dict = {}
    for j, views in enumerate(micro_batches):
        last = j == n - 1
        with grad_sync(model, last):
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                out = model(views)
            loss = out["loss"]
            watch.observe(loss, step)
            for k, v in out.items():  # running mean of the scalar logs
                if torch.is_tensor(v) and v.numel() == 1:
                    v = v.detach().float() / n
                    logs[k] = logs[k] + v if k in logs else v
                elif k not in logs or last:
                    logs[k] = v
            if last and check is not None and check():
                return None
            scaler.scale(loss / n if n > 1 else loss).backward()
    return logs
