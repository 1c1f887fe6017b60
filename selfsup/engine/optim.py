"""Optimizers: SGD, AdamW and LARS, built from the method's parameter groups.

Param-group keys understood here and by the loop (all optional):
- ``apply_wd`` (bool, default True): False for biases and norms -> weight decay 0;
- ``lars_exclude`` (bool): skip LARS' trust ratio (biases, norms);
- ``lr_scale`` (float): multiply the scheduled lr (layer-wise scaling);
- ``fixed_lr`` (bool): keep the peak lr, no schedule (SimSiam's predictor);
- ``freeze_steps`` (int): gradients dropped for the first N steps (DINO's last layer);
- ``name`` (str): for logs.
"""

from __future__ import annotations

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017).

    update = lr * momentum_buffer(g + wd * w) scaled per tensor by
    trust = eta * ||w|| / ||g + wd * w|| (1 when either norm is 0), except for groups with
    ``lars_exclude`` (biases, norms), as in SimCLR / BYOL / MoCo v3.
    """

    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["weight_decay"] and not g["lars_exclude"]:
                    d = d.add(p, alpha=g["weight_decay"])
                if not g["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.clone(d).detach()
                else:
                    state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])
        return loss


def build_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """Optimizer over the method's groups; lr and wd are overwritten every step by the loop."""
    groups = [dict(g) for g in groups if g["params"]]
    for g in groups:
        g.setdefault("apply_wd", True)
        g.setdefault("lars_exclude", not g["apply_wd"])
        g["weight_decay"] = cfg.wd if g["apply_wd"] else 0.0
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas))
    if cfg.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum)
    raise ValueError(f"optimizer must be sgd, lars or adamw, got {cfg.optimizer!r}")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def clip_per_param_(params, max_norm: float) -> None:
    """Scale each gradient tensor whose norm exceeds max_norm down to it (official DINO's
    per-tensor clip: coef = max_norm / (norm + 1e-6), applied when < 1). Unlike the global
    clip, a tensor under the bound is never touched, whatever the other tensors' norms.
    Foreach ops, no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
