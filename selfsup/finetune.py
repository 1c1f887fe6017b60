"""End-to-end fine-tuning of a pretrained encoder: MAE's / BEiT's protocol, and ResNets.

    python -m selfsup.finetune --checkpoint runs/mae-vit_base            # the paper recipe
    python -m selfsup.finetune --checkpoint RUN --random-init            # the baseline
    python -m selfsup.finetune --checkpoint RUN --linear-probe           # frozen encoder
    python -m selfsup.finetune --checkpoint RUN --out DIR --resume auto  # continue DIR

ViTs (He et al. 2022, App. A.2; Bao et al. 2022): AdamW (0.9, 0.999), lr = blr * batch / 256
(blr 5e-4, ViT-L/H 1e-3), weight decay 0.05, layer-wise lr decay 0.75, drop path 0.1, mixup
0.8 / cutmix 1.0 (one per batch, switch 0.5), label smoothing 0.1, random erasing 0.25,
per-step warm-up (5 of 100 epochs) then cosine to 1e-6. The features are pooled as the method
was pretrained: MAE the mean patch token under a fresh LayerNorm, MoCo v3 / DINO the cls token.
ResNets: no layer decay; SGD with Nesterov momentum 0.9, blr 0.05, no weight decay (SimCLR's
fine-tuning, Chen et al. 2020, App. B.5), label smoothing 0.1, no mixup.
--linear-probe: MAE's probe (BatchNorm without affine + linear on the frozen features), LARS
at blr 0.1, no weight decay, 10 warm-up of 90 epochs, no mixup or smoothing.

Flags left unset take the recipe's value; everything resolved is printed at the start and
saved with the checkpoint. `--steps N` alone makes the schedule N steps long (the warm-up keeps
its fraction of it); with `--epochs` too it stops after N steps of the epochs' schedule.
Checkpoints (DIR/checkpoint.pt) are atomic and load with torch.load(weights_only=True). The
last line printed is the top-1 accuracy on the held-out split: ``finetune_top1 0.9012``.
Several processes: `torchrun --nproc_per_node N -m selfsup.finetune ...` (DDP; lr = blr x
batch x N / 256; rank 0 logs, saves and scores). Not implemented (yet): MAE's RandAugment
(9, 0.5), model EMA, gradient accumulation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import dist
from .data import DatasetError, build_loader, load_dataset
from .data.datasets import subset
from .data.layouts import align_classes
from .engine import checkpoint as ckpt
from .engine import schedules
from .engine.checkpoint import CheckpointError, load_method
from .engine.finetune_utils import (
    Classifier,
    Mixup,
    RandomErasing,
    is_vit_encoder,
    param_groups,
    resolve_pool,
    set_drop_path,
    soft_cross_entropy,
)
from .engine.optim import LARS
from .engine.runlog import Progress, RunLogger
from .engine.step import NonFiniteWatch

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Recipe values, by family; a flag given on the command line wins.
RECIPES: dict[str, dict] = {
    "vit": dict(optimizer="adamw", blr=5e-4, wd=0.05, layer_decay=0.75, drop_path=0.1,
                mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, epochs=100,
                warmup_epochs=5.0, min_lr=1e-6, crop_scale=[0.08, 1.0]),
    "resnet": dict(optimizer="sgd", blr=0.05, wd=0.0, layer_decay=1.0, drop_path=0.0,
                   mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, epochs=90,
                   warmup_epochs=0.0, min_lr=0.0, crop_scale=[0.08, 1.0]),
    "probe": dict(optimizer="lars", blr=0.1, wd=0.0, layer_decay=1.0, drop_path=0.0,
                  mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0, epochs=90,
                  warmup_epochs=10.0, min_lr=0.0, crop_scale=[0.08, 1.0]),
}
LARGE_VITS = ("vit_large", "vit_l", "vit_huge", "vit_h")  # MAE: blr 1e-3, 50 epochs
# What a resumed run must share with the checkpoint it continues.
RESUME_KEYS = ("arch", "method", "pool", "linear_probe", "random_init", "num_classes",
               "batch_size", "schedule_steps", "warmup_steps", "peak_lr", "layer_decay",
               "optimizer", "seed")


# ============================================================================ settings
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m selfsup.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True, help="pretraining run folder or checkpoint file")
    a("--out", default=None, help="run folder (default runs/finetune-<method>-<arch>[-what])")
    a("--resume", default=None, help="'auto' (--out's checkpoint when present) or a path")
    a("--random-init", action="store_true", help="same encoder untrained: the baseline")
    a("--linear-probe", action="store_true", help="freeze the encoder, train the head only")
    a("--data", default=None, help="train set (default: the pretraining run's --data)")
    a("--test-data", default=None, help="held-out set (default: --data's test split)")
    a("--train-size", type=int, default=0, help="subsample the train set (0: all)")
    a("--test-size", type=int, default=0, help="subsample the test set (0: all)")
    a("--epochs", type=float, default=None)
    a("--steps", type=int, default=None, help="stop after N steps (alone: schedule length)")
    a("--batch-size", type=int, default=256)
    a("--optimizer", choices=["adamw", "sgd", "lars"], default=None)
    a("--lr", type=float, default=None, help="absolute peak lr; overrides --blr")
    a("--blr", type=float, default=None, help="base lr: lr = blr * batch / 256")
    a("--min-lr", type=float, default=None)
    a("--wd", type=float, default=None, help="weight decay (not on biases, norms, tokens)")
    a("--betas", type=float, nargs=2, default=[0.9, 0.999])
    a("--warmup-epochs", type=float, default=None)
    a("--warmup-steps", type=int, default=None, help="overrides --warmup-epochs")
    a("--layer-decay", type=float, default=None, help="layer-wise lr decay (ViT; 1 = off)")
    a("--drop-path", type=float, default=None, help="stochastic depth of the last block")
    a("--mixup", type=float, default=None, help="mixup alpha (0 = off)")
    a("--cutmix", type=float, default=None, help="cutmix alpha (0 = off)")
    a("--mix-prob", type=float, default=1.0, help="probability that a batch is mixed")
    a("--switch-prob", type=float, default=0.5, help="cutmix instead of mixup, both on")
    a("--smoothing", type=float, default=None, help="label smoothing")
    a("--reprob", type=float, default=None, help="random erasing probability per image")
    a("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    a("--pool", choices=["auto", "cls", "avg"], default="auto",
      help="ViT features: auto = as pretrained (MAE avg + fc_norm; others the cls token)")
    a("--clip-grad", type=float, default=None, help="max global gradient norm")
    a("--precision", choices=list(AMP_DTYPES), default="fp32")
    a("--seed", type=int, default=0)
    a("--device", choices=["auto", "cpu", "cuda"], default="auto")
    a("--data-device", default="auto", help="auto | dali-gpu | dali-cpu | portable")
    a("--workers", type=int, default=None, help="loader threads (default: all cores)")
    a("--log-every", type=int, default=20)
    a("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and the end)")
    a("--eval-every", type=float, default=0, help="score the test split every N epochs")
    return p


def resolve(args: argparse.Namespace, arch: str) -> dict:
    """The resolved settings: the recipe of the family (vit / resnet / probe) < the flags."""
    family = "probe" if args.linear_probe else "vit" if arch.startswith("vit") else "resnet"
    s = {k: v for k, v in vars(args).items()}
    recipe = dict(RECIPES[family])
    if family == "vit" and arch in LARGE_VITS:
        recipe.update(blr=1e-3, epochs=50)
    for k, v in recipe.items():
        if s.get(k) is None:
            s[k] = v
    s["crop_scale"] = [float(v) for v in s["crop_scale"]]
    s["family"] = family
    for k in ("batch_size", "log_every", "ckpt_every"):
        if s[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {s[k]}")
    if s["steps"] is not None and s["steps"] < 1:
        raise ValueError(f"--steps must be >= 1, got {s['steps']}")
    if s["epochs"] <= 0:
        raise ValueError(f"--epochs must be > 0, got {s['epochs']}")
    lo, hi = s["crop_scale"]
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--crop-scale must be 0 < MIN <= MAX <= 1, got {lo} {hi}")
    return s


def schedule_lengths(s: dict, steps_per_epoch: int, explicit_epochs: bool) -> tuple[int, int, int]:
    """(schedule steps, steps to run, warm-up steps), as train.py reads --steps / --epochs."""
    if s["steps"] and not explicit_epochs:
        schedule = s["steps"]
        warmup = round(schedule * s["warmup_epochs"] / s["epochs"])  # the same fraction
    else:
        schedule = max(1, round(s["epochs"] * steps_per_epoch))
        warmup = round(s["warmup_epochs"] * steps_per_epoch)
    if s["warmup_steps"] is not None:
        warmup = s["warmup_steps"]
    total = min(s["steps"], schedule) if s["steps"] else schedule
    return schedule, total, min(max(0, warmup), schedule)


# ============================================================================ building
def load_encoder(s: dict, device: torch.device):
    """(encoder, pretraining Config) from --checkpoint, trained or at its seed's random init."""
    try:
        method, cfg, _ = load_method(s["checkpoint"], random_init=s["random_init"], device=device)
    except CheckpointError:
        path = ckpt.resolve_path(s["checkpoint"])  # raises "not found" itself
        if "finetune" in ckpt.load(path):  # an unreadable file raises its own error here
            raise CheckpointError(f"{path} is a fine-tuning checkpoint, not a pretraining "
                                  "run: pass the pretraining run as --checkpoint and this "
                                  "one as --resume") from None
        raise
    return method.encoder(), cfg


def make_loaders(s: dict, cfg, rank: int = 0, world: int = 1):
    data = s["data"] or cfg.data
    train = load_dataset(data, "train")
    # the layout rules of training and selfsup.eval (docs/data.md): --test-data names the split
    # folder itself (or a folder holding val/ or test/); without it, data's own held-out split
    test = (load_dataset(s["test_data"], "test", named=True) if s["test_data"]
            else load_dataset(data, "test"))
    if len(train.classes) < 2 or not getattr(train, "labeled", True):
        raise DatasetError(f"fine-tuning needs labelled images of >= 2 classes (one subfolder "
                           f"per class); {data} has {len(train.classes)}")
    if not getattr(test, "labeled", True):
        raise DatasetError(f"the held-out set {getattr(test, 'root', test)} has no labels "
                           f"({test.why_unlabeled}); it must be a tree of class folders")
    # label i must mean one class in both: held-out folders are relabeled by class name (a val/
    # missing a class would otherwise shift every later label); classes unknown to the train set
    # are scored as misses, with a warning
    test = align_classes(train, test)
    train = subset(train, s["train_size"], s["seed"])
    test = subset(test, s["test_size"], s["seed"])
    kw = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, seed=s["seed"],
              device=s["data_device"], num_threads=s["workers"])
    # MAE's fine-tuning crop + flip (the "mae" recipe: scale range, ratio 3/4-4/3, flip 0.5)
    train_loader = build_loader(train, "mae", s["batch_size"], drop_last=True,
                                scale=tuple(s["crop_scale"]), shard_id=rank, num_shards=world,
                                **kw)
    test_loader = build_loader(test, "eval", s["batch_size"], drop_last=False, **kw)
    if len(train_loader) == 0:
        raise ValueError(f"--batch-size {s['batch_size']} exceeds the train set "
                         f"({len(train)} images): no full batch per epoch")
    return train_loader, test_loader, len(train.classes)


def build_optimizer(model: Classifier, s: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, s["layer_decay"])
    for g in groups:
        g["weight_decay"] = s["wd"] if g["apply_wd"] else 0.0
    if s["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(s["betas"]))
    if s["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, nesterov=True)
    return LARS(groups, lr=0.0, momentum=0.9)


def setup_device(name: str) -> torch.device:
    """The device, after joining the process group when torchrun launched several."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    want_cuda = name == "cuda" or name == "auto" and torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_dist():
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def step_key(seed: int, step: int) -> list[int]:
    """What seeds one step's randomness (drop path, erasing, mixing): a resumed run draws what
    an uninterrupted one does, whatever else (loader threads, evaluation) drew meanwhile.
    Ranks past 0 add their rank, so each process draws its own masks."""
    return [seed, step] + ([dist.rank()] if dist.rank() else [])


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([*step_key(seed, step), 0xF17E]).generate_state(1)[0])


# ============================================================================ the loop
def batches(loader, start: int, steps_per_epoch: int):
    """(step, epoch, images, labels) from step `start` on, across epochs, forever."""
    epoch, skip = divmod(start, steps_per_epoch)
    step = start
    while True:
        loader.set_epoch(epoch)
        for i, (views, y) in enumerate(loader):
            if i < skip:  # a resumed epoch: these batches were trained on before
                continue
            yield step, epoch, views[0], y
            step += 1
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate(model: Classifier, loader, device: torch.device, amp_dtype) -> float:
    model.eval()
    correct = total = 0
    for views, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            pred = model(views[0].to(device, non_blocking=True)).argmax(1).cpu()
        correct += (pred == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def train_step(model, opt, scaler, augment: tuple[RandomErasing, Mixup], x, y, lr: float,
               s: dict, step: int, amp_dtype, watch: NonFiniteWatch | None = None,
               check: Callable[[], bool] | None = None) -> torch.Tensor | None:
    """One optimizer step. Returns the loss as a detached device tensor (reading it would
    make the host wait for the device), or None, without an update, when `check` (given at
    a check step: called after the forward, before the backward) says to stop. `watch` keeps
    the non-finite record on the device until that check."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    torch.manual_seed(step_seed(s["seed"], step))
    rng = np.random.default_rng([*step_key(s["seed"], step), 0x31A])  # erasing and mixing
    erase, mixup = augment
    x, target = mixup(erase(x, rng), y, rng)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        logits = model(x)
    loss = soft_cross_entropy(logits, target)
    if watch is not None:
        watch.observe(loss, step)
    if check is not None and check():
        return None
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if s["clip_grad"]:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip_grad"])
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def save_state(path: Path, model, opt, scaler, step: int, epoch: int, cfg, s: dict) -> None:
    ckpt.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
               "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
               "config": cfg.to_dict(), "finetune": s, "rng": ckpt.rng_state()}, path)


def resume_state(s: dict, out: Path) -> dict | None:
    if s["resume"] is None:
        return None
    path = out / ckpt.CHECKPOINT_NAME if s["resume"] == "auto" else ckpt.resolve_path(s["resume"])
    if s["resume"] == "auto" and not path.is_file():
        return None
    state = ckpt.load(path)
    old = state.get("finetune")
    if old is None:
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint (pass pretraining "
                              "runs as --checkpoint)")
    for key in RESUME_KEYS:
        if old.get(key) != s.get(key):
            raise CheckpointError(f"{path} was fine-tuned with {key} {old.get(key)!r}, this run "
                                  f"has {s.get(key)!r}: resume with the same settings")
    state["path"] = str(path)
    return state


def run(args: argparse.Namespace, explicit_epochs: bool | None = None) -> dict:
    """Fine-tune as `args` says; returns the summary (top1, steps, seconds, settings)."""
    device = setup_device(args.device)
    rank, world = dist.rank(), dist.world_size()
    s = vars(args).copy()
    encoder, cfg = load_encoder(s, device)
    s = resolve(args, cfg.arch)
    s.update(method=cfg.method, arch=cfg.arch, world_size=world)
    what = "-probe" if s["linear_probe"] else "-random" if s["random_init"] else ""
    out = Path(s["out"] or f"runs/finetune-{cfg.method}-{cfg.arch}{what}")
    s["out"] = str(out)

    train_loader, test_loader, n_cls = make_loaders(s, cfg, rank, world)
    spe = len(train_loader)
    if explicit_epochs is None:
        explicit_epochs = args.epochs is not None
    schedule, total, warmup = schedule_lengths(s, spe, explicit_epochs)
    s.update(num_classes=n_cls, steps_per_epoch=spe, schedule_steps=schedule,
             total_steps=total, warmup_steps=warmup,
             peak_lr=s["lr"] if s["lr"] is not None
             else s["blr"] * s["batch_size"] * world / 256)
    s["pool"] = resolve_pool(args.pool, cfg.method, encoder)
    encoder.requires_grad_(True)  # DINO's teacher and MoCo v3's patch embedding were frozen
    s["drop_path_per_block"] = set_drop_path(encoder, 0.0 if s["linear_probe"] else s["drop_path"])
    torch.manual_seed(s["seed"])  # the head's init, the same on every rank
    model = Classifier(encoder, n_cls, s["pool"], probe=s["linear_probe"]).to(device)
    opt = build_optimizer(model, s)
    scaler = torch.amp.GradScaler(device.type, enabled=s["precision"] == "fp16")

    step = 0
    state = resume_state(s, out)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        ckpt.set_rng_state(state["rng"])
    main = rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(out, enabled=main, tensorboard=False)
    progress = Progress(total, step, s["batch_size"] * world, s["log_every"], enabled=main)
    progress.message(settings_line(s, model, encoder))
    if state is not None:
        progress.message(f"resumed from {state['path']} at step {step}")
    loop = dict(model=model, opt=opt, scaler=scaler, device=device, s=s, cfg=cfg, out=out,
                logger=logger, progress=progress, amp_dtype=AMP_DTYPES[s["precision"]],
                lr_sched=schedules.cosine(s["peak_lr"], s["min_lr"], schedule, warmup),
                augment=(RandomErasing(s["reprob"]),
                         Mixup(n_cls, s["mixup"], s["cutmix"], s["smoothing"], s["mix_prob"],
                               s["switch_prob"])))
    try:
        return train_loop(loop, train_loader, test_loader, step)
    finally:
        logger.close()


def wrap(model: Classifier, device: torch.device):
    """DDP across the ranks (gradients averaged); the model itself on one process."""
    if not dist.is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def settings_line(s: dict, model: Classifier, encoder) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = ("linear probe" if s["linear_probe"] else "fine-tuning") + (
        " from random init" if s["random_init"] else "")
    keys = ("optimizer", "peak_lr", "wd", "layer_decay", "drop_path", "mixup", "cutmix",
            "smoothing", "reprob", "batch_size", "total_steps", "schedule_steps", "warmup_steps",
            "crop_scale", "min_lr")
    vit = "ViT" if is_vit_encoder(encoder) else "ResNet"
    return (f"{kind}: {s['method']} {s['arch']} ({vit}, pool {s['pool']}), {n / 1e6:.2f}M "
            f"trained parameters, {s['num_classes']} classes; "
            + ", ".join(f"{k} {s[k]}" for k in keys))


def nonfinite_check(watch: NonFiniteWatch, stop: dict, lr_sched: list[float], s: dict,
                    step: int) -> bool:
    """A check step's one host read (and, on several ranks, one all_reduce): raise
    FloatingPointError naming the first step whose loss was NaN/Inf on any rank; True when a
    signal reached any rank (every rank then stops before this step's update)."""
    first, signalled = watch.check(stop["signal"] is not None)
    if first is not None:
        raise FloatingPointError(
            f"non-finite loss first at step {first} with lr {lr_sched[first]:.4g} (found at "
            f"the check of step {step}; checks run every --log-every {s['log_every']} steps, "
            "so the weights after it are not to be trusted): lower --blr or raise "
            "--warmup-epochs")
    if signalled:
        stop["signal"] = stop["signal"] or "SIGTERM (another rank)"
    return signalled


def train_loop(loop: dict, train_loader, test_loader, step: int) -> dict:
    """Train from `step` to the end (or a signal); rank 0 saves, logs and scores.

    No host sync between checks: the loss stays on the device (NonFiniteWatch) and is read,
    with the NaN / signal agreement across ranks, only at a check step: every --log-every
    steps, the last one, and the step before each checkpoint or evaluation (so neither ever
    follows an unchecked non-finite loss). A NaN is found there, naming its first step."""
    model, s, device, out = loop["model"], loop["s"], loop["device"], loop["out"]
    progress, logger, amp_dtype = loop["progress"], loop["logger"], loop["amp_dtype"]
    total, spe = s["total_steps"], s["steps_per_epoch"]
    eval_steps = max(1, round(s["eval_every"] * spe)) if s["eval_every"] > 0 else 0
    main, ckpt_path = dist.is_main(), out / ckpt.CHECKPOINT_NAME
    lr_sched = loop["lr_sched"].tolist()  # host floats once: no tensor read per step
    net = wrap(model, device)
    stop = {"signal": None}
    watch = NonFiniteWatch(device)

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    def save(at: int) -> None:
        if main:
            save_state(ckpt_path, model, loop["opt"], loop["scaler"], at, at // spe,
                       loop["cfg"], s)

    def score(at: int) -> float | None:  # rank 0 scores the whole test split, the rest wait
        acc = evaluate(model, test_loader, device, amp_dtype) if main else None
        if main:
            logger.log(at, {"top1": acc}, kind="eval")
        dist.barrier()
        return acc

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.perf_counter()
    try:
        model.train()
        for i, _epoch, x, y in batches(train_loader, step, spe):
            if i >= total:
                break
            lr, after = lr_sched[i], i + 1
            log_now = after % s["log_every"] == 0 or after == total
            eval_now = bool(eval_steps) and after % eval_steps == 0 and after < total
            ckpt_now = after % s["ckpt_every"] == 0 and after < total
            check = (lambda at=i: nonfinite_check(watch, stop, lr_sched, s, at)) \
                if log_now or eval_now or ckpt_now else None
            loss = train_step(net, loop["opt"], loop["scaler"], loop["augment"],
                              x.to(device, non_blocking=True), y.to(device), lr, s, i,
                              amp_dtype, watch=watch, check=check)
            if loss is None:  # a signal, found at this step's check: no update
                break
            step = after
            if log_now:
                value = float(loss)  # the interval's one read of a loss
                progress.update(step, value, lr)
                logger.log(step, {"loss": value, "lr": lr, "epoch": step / spe})
            if eval_now:
                acc = score(step)
                progress.message(f"[eval] step {step}: top-1 {acc:.4f}" if main else "")
                model.train()
            if ckpt_now:
                save(step)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    save(step)
    summary = {"steps": step, "seconds": round(time.perf_counter() - t0, 1),
               "checkpoint": str(ckpt_path), "settings": s}
    if stop["signal"] is not None:
        progress.message(f"received {stop['signal']}: saved {ckpt_path} at step {step}; "
                         f"resume with the same command and --resume auto")
        summary["interrupted"] = stop["signal"]
        return summary
    summary["top1"] = score(step)
    if main:
        (out / "finetune.json").write_text(json.dumps(
            {k: v for k, v in summary.items() if k != "settings"} | {"settings": s}, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError,
            FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "interrupted" in summary or not dist.is_main():
        return 0
    s = summary["settings"]
    what = "linear probe" if s["linear_probe"] else "fine-tuned"
    print(f"{s['method']} {s['arch']} ({what}{', random init' if s['random_init'] else ''}): "
          f"{summary['steps']} steps in {summary['seconds']} s, checkpoint {summary['checkpoint']}")
    print(f"finetune_top1 {summary['top1']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
