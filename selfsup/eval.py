"""Evaluate a trained encoder: k-NN or a linear probe on frozen features.

    python -m selfsup.eval knn --checkpoint runs/byol-resnet_tiny [--random-init]
    python -m selfsup.eval linear --checkpoint RUN [--tune-blocks 1] [--data D --test-data D2]

- knn: DINO's protocol (cosine similarity, k = 20, votes weighted by exp(sim / 0.07)).
- linear: a BatchNorm (no affine) + linear classifier on the frozen features (MAE's probe),
  trained with AdamW; `--tune-blocks N` also trains the last N transformer blocks (ResNet: the
  last N stages), MAE's partial fine-tuning.
- `--random-init` evaluates the same architecture untrained: always report it as the baseline.

By default the data is the run's own dataset (train split as the memory / training set, test
split for scoring); a folder path works too. The last printed line ends with the top-1
accuracy as a plain number, e.g. ``knn_top1 0.8123``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .data import build_loader, load_dataset
from .data.datasets import subset
from .engine.checkpoint import CheckpointError, load_method
from .engine.monitors import extract_features, knn_classify


def loaders(cfg, args):
    train = subset(load_dataset(args.data or cfg.data, "train"), args.train_size, cfg.seed)
    test = subset(load_dataset(args.test_data or args.data or cfg.data, "test"),
                  args.test_size, cfg.seed)
    kw = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, drop_last=False, seed=cfg.seed,
              device=args.data_device)
    return (build_loader(train, "eval", args.batch_size, **kw),
            build_loader(test, "eval", args.batch_size, **kw), len(train.classes))


# ----------------------------------------------------------------------------- partial tuning
def split_encoder(encoder: nn.Module, n_tune: int) -> tuple[callable, nn.Module, callable]:
    """(frozen prefix fn, tuned modules, feature fn) so that feature(tuned(prefix(x))) == enc(x)."""
    if hasattr(encoder, "blocks"):  # ViT
        depth = len(encoder.blocks)
        if not 0 <= n_tune <= depth:
            raise ValueError(f"--tune-blocks must be in [0, {depth}], got {n_tune}")
        head, tail = encoder.blocks[:depth - n_tune], encoder.blocks[depth - n_tune:]
        tuned = nn.ModuleList([*tail, encoder.norm])
        return (lambda x: encoder._run_blocks(encoder._embed(x), head),
                tuned, lambda h: encoder.norm(encoder._run_blocks(h, tail))[:, 0])
    stages = [encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]  # ResNet
    if not 0 <= n_tune <= 4:
        raise ValueError(f"--tune-blocks must be in [0, 4] for a ResNet, got {n_tune}")
    head, tail = stages[:4 - n_tune], stages[4 - n_tune:]

    def prefix(x):
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        for s in head:
            x = s(x)
        return x

    def feature(h):
        for s in tail:
            h = s(h)
        return torch.flatten(encoder.avgpool(h), 1)

    return prefix, nn.ModuleList(tail), feature


def linear_probe(encoder: nn.Module, train_loader, test_loader, num_classes: int,
                 device: torch.device, *, epochs: int, lr: float, tune_blocks: int = 0,
                 seed: int = 0) -> float:
    torch.manual_seed(seed)
    encoder.eval().requires_grad_(False)
    head = nn.Sequential(nn.BatchNorm1d(encoder.feature_dim, affine=False),
                         nn.Linear(encoder.feature_dim, num_classes)).to(device)
    if tune_blocks == 0:  # features never change: extract once, train on the cache
        xtr, ytr = extract_features(encoder, train_loader, device)
        xte, yte = extract_features(encoder, test_loader, device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            head.train()
            for idx in torch.randperm(len(xtr)).split(256):
                loss = nn.functional.cross_entropy(head(xtr[idx].to(device)), ytr[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            pred = head(xte.to(device)).argmax(1).cpu()
        return (pred == yte).float().mean().item()
    prefix, tuned, feature = split_encoder(encoder, tune_blocks)
    tuned.requires_grad_(True)
    params = list(head.parameters()) + list(tuned.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        head.train()
        tuned.train()
        for views, y in train_loader:
            x = views[0].to(device)
            with torch.no_grad():
                h = prefix(x)
            loss = nn.functional.cross_entropy(head(feature(h)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    tuned.eval()
    correct = total = 0
    with torch.no_grad():
        for views, y in test_loader:
            pred = head(feature(prefix(views[0].to(device)))).argmax(1).cpu()
            correct += (pred == y).sum().item()
            total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfsup.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--data", default=None, help="train set (default: the run's --data)")
    p.add_argument("--test-data", default=None, help="test set (default: --data's test split)")
    p.add_argument("--random-init", action="store_true", help="the untrained baseline")
    p.add_argument("--train-size", type=int, default=0, help="subsample the train set (0: all)")
    p.add_argument("--test-size", type=int, default=0, help="subsample the test set (0: all)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--t", type=float, default=0.07)
    p.add_argument("--epochs", type=int, default=None, help="linear: default 50 (10 tuning)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tune-blocks", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-device", default="auto")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto"
                          and torch.cuda.is_available() else "cpu")
    try:
        method, cfg, _ = load_method(args.checkpoint, random_init=args.random_init,
                                     device=device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_loader, test_loader, n_cls = loaders(cfg, args)
    encoder = method.encoder()
    what = "random-init" if args.random_init else "trained"
    if args.protocol == "knn":
        xtr, ytr = extract_features(encoder, train_loader, device)
        xte, yte = extract_features(encoder, test_loader, device)
        pred = knn_classify(xtr, ytr, xte, k=args.k, t=args.t, num_classes=n_cls)
        acc = (pred == yte).float().mean().item()
        print(f"{cfg.method} {cfg.arch} ({what}): {args.k}-NN on {len(ytr)} train / "
              f"{len(yte)} test images")
        print(f"knn_top1 {acc:.4f}")
    else:
        epochs = args.epochs or (10 if args.tune_blocks else 50)
        acc = linear_probe(encoder, train_loader, test_loader, n_cls, device, epochs=epochs,
                           lr=args.lr, tune_blocks=args.tune_blocks, seed=cfg.seed)
        print(f"{cfg.method} {cfg.arch} ({what}): linear probe, {epochs} epochs, "
              f"{args.tune_blocks} tuned blocks")
        print(f"linear_top1 {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
