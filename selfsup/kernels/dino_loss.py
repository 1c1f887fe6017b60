"""Fused DINO loss: centering + tempered softmax cross-entropy over every crop pair.

SCAFFOLD (lead): the reference and the public API; the portable and Triton paths are being
written. Shapes: V views of B rows each (view-major), K prototypes, n_global teacher views.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .. import dist


def dino_loss_ref(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04,
                  n_global=2):
    """The official loop over pairs (teacher view i, student view v), v != i."""
    n_views = student_out.shape[0] // (teacher_out.shape[0] // n_global)
    s_chunks = (student_out / student_temp).chunk(n_views)
    t_chunks = F.softmax((teacher_out - center.reshape(1, -1)) / teacher_temp, -1).detach()
    t_chunks = t_chunks.chunk(n_global)
    total, pairs = 0.0, 0
    for i, t in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == i:
                continue
            total = total + torch.sum(-t * F.log_softmax(s, -1), -1).mean()
            pairs += 1
    return total / pairs


def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04,
              n_global=2):
    return dino_loss_ref(student_out, teacher_out, center, student_temp=student_temp,
                         teacher_temp=teacher_temp, n_global=n_global)


def teacher_temp_schedule(total_steps, warmup_steps, start=0.04, end=0.07):
    """Per-step teacher temperature: linear start -> end over warmup_steps, then end."""
    warm = torch.linspace(start, end, max(int(warmup_steps), 0), dtype=torch.float64)
    rest = torch.full((max(total_steps - len(warm), 0),), float(end), dtype=torch.float64)
    return torch.cat([warm, rest])[:total_steps]


class DINOLoss(nn.Module):
    def __init__(self, out_dim, *, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9,
                 n_global=2):
        super().__init__()
        self.out_dim, self.student_temp, self.teacher_temp = out_dim, student_temp, teacher_temp
        self.center_momentum, self.n_global = center_momentum, n_global
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict = {}

    def forward(self, student_out, teacher_out, teacher_temp=None):
        tt = self.teacher_temp if teacher_temp is None else teacher_temp
        loss = dino_loss(student_out, teacher_out, self.center, student_temp=self.student_temp,
                         teacher_temp=tt, n_global=self.n_global)
        with torch.no_grad():
            p = F.softmax((teacher_out.float() - self.center) / tt, -1)
            ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
            self.last_stats = {"teacher_entropy": ent, "kl": loss.detach() - ent}
            s = dist.all_reduce_sum(teacher_out.float().sum(0, keepdim=True))
            mean = s / (len(teacher_out) * dist.world_size())
            self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
        return loss



