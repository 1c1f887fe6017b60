"""Evaluate a trained encoder: k-NN or a linear probe on frozen features.

    python -m selfsup.eval knn --checkpoint runs/byol-resnet_tiny [--random-init] [--full]
    python -m selfsup.eval linear --checkpoint RUN [--tune-blocks 1] [--data D --test-data D2]

- knn: DINO's protocol (cosine similarity, k = 20, votes weighted by exp(sim / 0.07)).
- linear: a BatchNorm (no affine) + linear classifier on the frozen features (MAE's probe),
  trained with AdamW; `--tune-blocks N` also trains the last N transformer blocks (ResNet: the
  last N stages), MAE's partial fine-tuning. Both protocols pool the features as the method
  does (the cls token, or MAE's average of the patch tokens: `encoder.global_pool`).
- `--random-init` evaluates the same architecture untrained: always report it as the baseline.

Size: by default at most DEFAULT_TRAIN_SIZE train and DEFAULT_TEST_SIZE test images (a fixed
random subset), which takes about a minute on a 2-core CPU for Fashion-MNIST with a
resnet_tiny; `--full` (or `--train-size 0 --test-size 0`) runs the full protocol. Progress
(images, img/s, ETA) goes to stderr; on CUDA the encoder runs under bf16 autocast
(`--precision fp32` to turn it off).

Data: by default the run's own (its --data, --test-data, --knn-data, --unlabeled), resolved
as the trainer's k-NN monitor resolves them (selfsup/data/layouts.py): the labeled train split
is the memory / probe training set, the held-out split is scored. Override with --data (a
labeled set: a built-in name, class folders, root/train with a sibling val/ or test/),
--test-data (the held-out split folder itself, or a folder holding val/ or test/), or
--knn-data. The last printed line ends with the top-1 accuracy as a plain number, e.g.
``knn_top1 0.8123``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from .data import build_loader, score_sets
from .data.datasets import subset
from .engine.checkpoint import CheckpointError, load_method
from .engine.monitors import extract_features, knn_classify

DEFAULT_TRAIN_SIZE = 10000  # images: about a minute of a 2-core CPU with a resnet_tiny
DEFAULT_TEST_SIZE = 5000


def score_args(cfg, args) -> tuple:
    """(data, test_data, knn_data, unlabeled): the command line's, else the run's."""
    if args.data is None and args.test_data is None and args.knn_data is None:
        return cfg.data, cfg.test_data, cfg.knn_data, cfg.unlabeled
    data = args.data or cfg.data
    unlabeled = args.unlabeled or (args.data is None and cfg.unlabeled)
    return data, args.test_data, args.knn_data, unlabeled


def loaders(cfg, args):
    """(train loader, test loader, number of classes, a line saying what is scored); or a
    string saying why there is nothing labeled to score."""
    data, test_data, knn_data, unlabeled = score_args(cfg, args)
    sets = score_sets(data, test_data, knn_data, unlabeled=unlabeled, seed=cfg.seed)
    if isinstance(sets, str):
        return sets.replace("k-NN monitor off: ", "nothing to score: ")
    sizes = (0, 0) if args.full else (
        DEFAULT_TRAIN_SIZE if args.train_size is None else args.train_size,
        DEFAULT_TEST_SIZE if args.test_size is None else args.test_size)
    train, test = (subset(sets.memory, sizes[0], cfg.seed), subset(sets.queries, sizes[1],
                                                                    cfg.seed))
    note = sets.note.replace("k-NN memory", "train set")
    if len(train) < len(sets.memory) or len(test) < len(sets.queries):
        note += (f"; a fixed subset of {len(train)} of {len(sets.memory)} train and "
                 f"{len(test)} of {len(sets.queries)} test images (the full protocol: --full)")
    kw = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, drop_last=False, seed=cfg.seed,
              device=args.data_device, max_pixels=cfg.max_pixels)
    n_cls = max(len(sets.memory.classes), len(getattr(sets.queries, "classes", [])))
    return (build_loader(train, "eval", args.batch_size, **kw),
            build_loader(test, "eval", args.batch_size, **kw), n_cls, note)


def progress(loader, what: str, stream=None, every: float = 2.0):
    """Iterate `loader`, writing "what: done/total images, img/s, ETA" to stderr about every
    `every` seconds and at the end. The time counted includes the caller's work per batch."""
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()  # a terminal: one line, rewritten
    total, done = loader.num_samples, 0
    t0 = last = time.perf_counter()
    for views, y in loader:
        yield views, y
        done += len(y)
        now = time.perf_counter()
        if now - last >= every or done >= total:
            last = now
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            line = f"{what}: {done}/{total} images, {rate:.0f} img/s, ETA {_clock(eta)}"
            end = "\n" if not tty or done >= total else ""
            stream.write(("\r" + line.ljust(72) if tty else line) + end)
            stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class _Counted:
    """A loader wrapped by `progress`, iterable more than once (one progress run each)."""

    def __init__(self, loader, what: str) -> None:
        self.loader, self.what = loader, what

    def __iter__(self):
        return progress(self.loader, self.what)

    def __len__(self) -> int:
        return len(self.loader)


# ----------------------------------------------------------------------------- partial tuning
def pool(encoder: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1+L, D) normed tokens -> (B, D), as the ViT's own forward pools them: the mean of
    the patch tokens for global_pool "avg" (MAE), else the cls token. Register tokens
    (DINOv2) are never pooled."""
    if getattr(encoder, "num_registers", 0):
        tokens = encoder.drop_registers(tokens)
    return tokens[:, 1:].mean(1) if getattr(encoder, "global_pool", "token") == "avg" \
        else tokens[:, 0]


def split_encoder(encoder: nn.Module, n_tune: int) -> tuple[callable, nn.Module, callable]:
    """(frozen prefix fn, tuned modules, feature fn) so that feature(tuned(prefix(x))) == enc(x)
    (tests/test_eval.py checks it for both ViT poolings and a ResNet)."""
    if hasattr(encoder, "blocks"):  # ViT
        depth = len(encoder.blocks)
        if not 0 <= n_tune <= depth:
            raise ValueError(f"--tune-blocks must be in [0, {depth}], got {n_tune}")
        head, tail = encoder.blocks[:depth - n_tune], encoder.blocks[depth - n_tune:]
        tuned = nn.ModuleList([*tail, encoder.norm])
        return (lambda x: encoder._run_blocks(encoder._embed(x), head), tuned,
                lambda h: pool(encoder, encoder.norm(encoder._run_blocks(h, tail))))
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
        return encoder.fc(torch.flatten(encoder.avgpool(h), 1))

    return prefix, nn.ModuleList(tail), feature


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def linear_probe(encoder: nn.Module, train_loader, test_loader, num_classes: int,
                 device: torch.device, *, epochs: int, lr: float, tune_blocks: int = 0,
                 seed: int = 0, autocast_dtype: torch.dtype | None = None) -> float:
    torch.manual_seed(seed)
    encoder.eval().requires_grad_(False)
    head = nn.Sequential(nn.BatchNorm1d(encoder.feature_dim, affine=False),
                         nn.Linear(encoder.feature_dim, num_classes)).to(device)
    if tune_blocks == 0:  # features never change: extract once, train on the cache
        xtr, ytr = extract_features(encoder, _Counted(train_loader, "train features"), device,
                                    autocast_dtype)
        xte, yte = extract_features(encoder, _Counted(test_loader, "test features"), device,
                                    autocast_dtype)
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
    for epoch in range(epochs):
        head.train()
        tuned.train()
        for views, y in progress(train_loader, f"tuning epoch {epoch + 1}/{epochs}"):
            x = views[0].to(device)
            with _autocast(device, autocast_dtype):
                with torch.no_grad():
                    h = prefix(x)
                logits = head(feature(h).float())
            loss = nn.functional.cross_entropy(logits, y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    tuned.eval()
    correct = total = 0
    with torch.no_grad():
        for views, y in progress(test_loader, "test"):
            with _autocast(device, autocast_dtype):
                pred = head(feature(prefix(views[0].to(device))).float()).argmax(1).cpu()
            correct += (pred == y).sum().item()
            total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m selfsup.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint file")
    p.add_argument("--data", default=None, help="labeled train set (default: the run's)")
    p.add_argument("--test-data", default=None,
                   help="held-out set: the split folder, or a folder holding val/ or test/")
    p.add_argument("--knn-data", default=None,
                   help="a labeled set giving both (its train and held-out splits)")
    p.add_argument("--unlabeled", action="store_true", help="--data's folders are not classes")
    p.add_argument("--random-init", action="store_true", help="the untrained baseline")
    p.add_argument("--train-size", type=int, default=None,
                   help=f"train images, a fixed subset (default {DEFAULT_TRAIN_SIZE}; 0: all)")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"test images, a fixed subset (default {DEFAULT_TEST_SIZE}; 0: all)")
    p.add_argument("--full", action="store_true", help="the full protocol: every image")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--t", type=float, default=0.07)
    p.add_argument("--epochs", type=int, default=None, help="linear: default 50 (10 tuning)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tune-blocks", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast for the encoder: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--data-device", default="auto")
    args = p.parse_args(argv)
    for name in ("train_size", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0: all), got {getattr(args, name)}")
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto"
                          and torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if args.precision == "bf16" or (
        args.precision == "auto" and device.type == "cuda") else None
    try:
        method, cfg, _ = load_method(args.checkpoint, random_init=args.random_init,
                                     device=device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    got = loaders(cfg, args)
    if isinstance(got, str):
        print(f"error: {got}", file=sys.stderr)
        return 2
    train_loader, test_loader, n_cls, note = got
    print(note)
    encoder = method.encoder()
    what = "random-init" if args.random_init else "trained"
    prec = "bf16 autocast" if amp is not None else "fp32"
    if args.protocol == "knn":
        xtr, ytr = extract_features(encoder, _Counted(train_loader, "train features"), device,
                                    amp)
        xte, yte = extract_features(encoder, _Counted(test_loader, "test features"), device,
                                    amp)
        pred = knn_classify(xtr, ytr, xte, k=args.k, t=args.t, num_classes=n_cls)
        acc = (pred == yte).float().mean().item()
        print(f"{cfg.method} {cfg.arch} ({what}): {args.k}-NN on {len(ytr)} train / "
              f"{len(yte)} test images, {prec}")
        print(f"knn_top1 {acc:.4f}")
    else:
        epochs = args.epochs or (10 if args.tune_blocks else 50)
        acc = linear_probe(encoder, train_loader, test_loader, n_cls, device, epochs=epochs,
                           lr=args.lr, tune_blocks=args.tune_blocks, seed=cfg.seed,
                           autocast_dtype=amp)
        print(f"{cfg.method} {cfg.arch} ({what}): linear probe, {epochs} epochs, "
              f"{args.tune_blocks} tuned blocks, {prec}")
        print(f"linear_top1 {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
