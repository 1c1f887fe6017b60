"""Per-step schedules, precomputed once: lr (cosine or step) and weight decay.

Methods and the loop index these arrays by the optimizer step; nothing is computed from the
epoch inside a method. (EMA momentum: ssl.common.momentum_at; DINO's teacher temperature:
kernels.teacher_temp_schedule.)
"""

from __future__ import annotations

import math

import torch


def cosine(start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0
           ) -> torch.Tensor:
    """Linear warm-up warmup_start -> start over `warmup` steps, then cosine start -> end.

    Returns a float64 tensor of length `total`.
    """
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    warmup = max(0, min(int(warmup), total))
    warm = torch.linspace(warmup_start, start, warmup + 1, dtype=torch.float64)[1:]
    n = total - warmup
    t = torch.arange(n, dtype=torch.float64) / max(1, n - 1) if n > 1 else torch.zeros(n)
    cos = end + 0.5 * (start - end) * (1 + torch.cos(math.pi * t))
    return torch.cat([warm, cos.to(torch.float64)])


def constant(value: float, total: int) -> torch.Tensor:
    return torch.full((total,), float(value), dtype=torch.float64)


def step(start: float, total: int, milestones, gamma: float = 0.1, warmup: int = 0,
         warmup_start: float = 0.0) -> torch.Tensor:
    """Linear warm-up, then `start` multiplied by `gamma` at each milestone step (MoCo v1:
    x0.1 at epochs 120 and 160 of 200). A milestone at step s applies from step s on.

    Returns a float64 tensor of length `total`.
    """
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    ms = sorted(int(m) for m in milestones)
    if any(m < 0 for m in ms):
        raise ValueError(f"milestones must be >= 0 steps, got {list(milestones)}")
    warmup = max(0, min(int(warmup), total))
    t = torch.arange(total)
    drops = torch.zeros(total, dtype=torch.float64)  # milestones passed at each step
    for m in ms:
        drops += t >= m
    out = start * gamma ** drops
    warm = torch.linspace(warmup_start, start, warmup + 1, dtype=torch.float64)[1:]
    out[:warmup] = torch.minimum(warm, out[:warmup])
    return out.to(torch.float64)
