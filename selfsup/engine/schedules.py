"""Per-step schedules, precomputed once: lr, weight decay, teacher temperature.

Methods and the loop index these arrays by the optimizer step; nothing is computed from the
epoch inside a method.
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


def linear_warmup_then_constant(start: float, end: float, warmup: int, total: int
                                ) -> torch.Tensor:
    """start -> end linearly over `warmup` steps, then `end` (DINO's teacher temperature)."""
    warmup = max(0, min(int(warmup), total))
    ramp = torch.linspace(start, end, warmup, dtype=torch.float64) if warmup else torch.zeros(0)
    return torch.cat([ramp, torch.full((total - warmup,), float(end), dtype=torch.float64)])
