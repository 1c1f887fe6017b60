"""Training monitors: k-NN accuracy, collapse, gradient norms.

- k-NN (DINO's protocol): cosine similarity of L2-normalized features against a memory of
  train features, k = 20 neighbours, votes weighted by exp(sim / 0.07).
- Collapse: the std over the batch of normalize(z) should stay near 1/sqrt(d); it goes to 0
  when every image maps to one point. DINO adds the teacher entropy (-> 0 when one prototype
  wins) and a loss stuck at ln K (uniform outputs).
- Gradient norms of the first layer (patch embedding or stem) and of the whole model: MoCo v3
  found ViT instability starts as spikes in the first layer.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- k-NN
# On CPU the monitor is skipped (with a message) when scoring before and after training would
# cost more than this: ~5-10 minutes of a 2-core machine. A ViT-H at 224 px is 167 GFLOP per
# image, so 2 x 20k images would take days; a resnet_tiny at 32 px costs 0.4 TFLOP in all.
KNN_CPU_BUDGET_FLOP = 30e12


@torch.no_grad()
def forward_flops(encoder: nn.Module, img_size: int, in_chans: int,
                  device: torch.device) -> float:
    """FLOPs of one image through `encoder` (counted on a real 1-image forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = encoder.training
    encoder.eval()
    try:
        x = torch.zeros(1, in_chans, img_size, img_size, device=device)
        with FlopCounterMode(display=False) as counter:
            encoder(x)
    finally:
        encoder.train(was_training)
    return float(counter.get_total_flops())


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, *, k: int = 20, t: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels of `test_feats` by a weighted k-NN vote over `train_feats`."""
    if len(train_feats) == 0:
        raise ValueError("knn_classify: the train memory is empty")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long()
    c = int(num_classes or int(labels.max()) + 1)
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), c, device=q.device)
        votes.scatter_add_(1, labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device,
                     autocast_dtype: torch.dtype | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) of every image the loader yields."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for views, y in loader:
            x = views[0].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                f = encoder(x)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(encoder: nn.Module, train_loader, test_loader, device: torch.device, *,
                 k: int = 20, t: float = 0.07, autocast_dtype: torch.dtype | None = None
                 ) -> float:
    """Top-1 k-NN accuracy of `encoder`'s features: train_loader is the memory."""
    xtr, ytr = extract_features(encoder, train_loader, device, autocast_dtype)
    xte, yte = extract_features(encoder, test_loader, device, autocast_dtype)
    pred = knn_classify(xtr, ytr, xte, k=k, t=t, num_classes=int(max(ytr.max(), yte.max())) + 1)
    return (pred == yte).float().mean().item()


# ----------------------------------------------------------------------------- collapse
# What to change, per kind of collapse (each warning names it). A point: the update outran what
# holds the representation apart (the predictor / EMA target, the negatives), so a smaller or
# slower-starting lr, or a slower target. DINO's two failure modes (Caron et al. 2021, sec.
# 5.3): one dimension dominating when centering is too weak for the sharpening, uniform
# outputs when the sharpening is too weak for the centering.
ADVICE = {
    "point": "try a lower --blr (or --lr) or a longer --warmup-epochs; with a target "
             "network (BYOL, MoCo v3) also a higher --ema-momentum",
    "one_prototype": "try a higher --teacher-temp (less sharpening), a lower "
                     "--center-momentum (faster centering) or --centering sinkhorn",
    "uniform": "try a lower --teacher-temp (a sharper teacher) or a lower --blr (or --lr)",
}


class CollapseMonitor:
    """Warns loudly when the method's logs show a collapse.

    Keys it understands in a step's logs: ``collapse_std`` with ``collapse_dim`` (std of the
    normalized outputs, warn below 0.1/sqrt(d)); ``teacher_entropy`` (warn near 0);
    ``loss`` with ``uniform_loss`` (ln K: warn when the loss sits there for `patience` logs).
    """

    def __init__(self, patience: int = 20, min_entropy: float = 1e-2) -> None:
        self.patience, self.min_entropy = patience, min_entropy
        self.at_uniform = 0
        self.warnings: list[str] = []

    def update(self, step: int, logs: dict[str, float]) -> str | None:
        msg = None
        if "collapse_std" in logs and "collapse_dim" in logs:
            floor = 0.1 / math.sqrt(logs["collapse_dim"])
            if logs["collapse_std"] < floor:
                msg = (f"output std {logs['collapse_std']:.2e} < 0.1/sqrt(d) = {floor:.2e}: "
                       "the representation is collapsing to a point; " + ADVICE["point"])
        if "teacher_entropy" in logs and logs["teacher_entropy"] < self.min_entropy:
            msg = (f"teacher entropy {logs['teacher_entropy']:.2e} ~ 0: one prototype "
                   "dominates (collapse); " + ADVICE["one_prototype"])
        if "uniform_loss" in logs and "loss" in logs:
            near = abs(logs["loss"] - logs["uniform_loss"]) < 1e-3 * logs["uniform_loss"]
            self.at_uniform = self.at_uniform + 1 if near else 0
            if self.at_uniform >= self.patience:
                msg = (f"loss has sat at ln K = {logs['uniform_loss']:.3f} for "
                       f"{self.at_uniform} logs: uniform outputs (collapse); "
                       + ADVICE["uniform"])
        if msg:
            text = f"COLLAPSE WARNING at step {step}: {msg}"
            self.warnings.append(text)
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        return msg


# ----------------------------------------------------------------------------- grad norms
def first_layer(module: nn.Module) -> nn.Module | None:
    """The first module owning a trainable weight of rank >= 2 (stem conv or patch embed)."""
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.ndim >= 2 and w.requires_grad:
            return m
    return None


def grad_norm_tensor(params) -> torch.Tensor | float:
    """The global L2 norm of the gradients as a device tensor (no host sync; 0.0 if none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def grad_norm(params) -> float:
    norm = grad_norm_tensor(params)
    return norm.item() if torch.is_tensor(norm) else norm
