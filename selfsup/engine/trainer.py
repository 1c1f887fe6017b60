"""The one training loop that drives every method.

The loop knows the method contract (ARCHITECTURE.md) and nothing else about the method:
``forward(views) -> {"loss", **logs}``, ``param_groups(cfg)``, ``on_step_end(step, total)``,
``encoder()``, the class attribute ``recipe`` and the optional ``recipe_kwargs(cfg)``.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from .. import dist
from ..data import build_loader, load_dataset, score_sets
from ..data.datasets import subset
from ..ssl import METHODS
from . import checkpoint as ckpt
from . import schedules
from .config import Config
from .init_from import apply_init_from
from .monitors import (
    KNN_CPU_BUDGET_FLOP,
    CollapseMonitor,
    first_layer,
    forward_flops,
    grad_norm_tensor,
    knn_accuracy,
)
from .optim import build_optimizer, clip_per_param_
from .prefetch import DevicePrefetcher
from .presets import cap_warmups
from .presets import describe as describe_preset
from .runlog import Progress, RunLogger
from .step import NonFiniteWatch, forward_backward, read_scalars

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf: the run stops at the next check (every --log-every
    steps), naming the step where it first was, after a diagnostic checkpoint."""


# ============================================================================ setup
def setup_device(cfg: Config) -> torch.device:
    """Pick the device and join the process group when launched by torchrun."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_dist():
        import torch.distributed as tdist

        tdist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def method_class(cfg_or_name):
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.method
    if name not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def make_train_loader(cfg: Config, recipe: str, recipe_kwargs: dict):
    data = load_dataset(cfg.data, "train", unlabeled=cfg.unlabeled)
    return build_loader(data, recipe, cfg.batch_size, device=cfg.data_device,
                        img_size=cfg.img_size, num_threads=cfg.workers, seed=cfg.seed,
                        shard_id=dist.rank(), num_shards=dist.world_size(), drop_last=True,
                        in_chans=cfg.in_chans, blur=cfg.blur, max_pixels=cfg.max_pixels,
                        interp=cfg.interp, **recipe_kwargs)


def recipe_name(cfg: Config, cls) -> str:
    """--aug when given (e.g. to rerun a recorded row on its old recipe), else the method's."""
    from ..data.recipes import RECIPES

    if cfg.aug is not None and (cfg.aug not in RECIPES or cfg.aug == "eval"):
        names = sorted(set(RECIPES) - {"eval"})
        raise ValueError(f"--aug must be one of {names}, got {cfg.aug!r}")
    return cfg.aug or cls.recipe


def lr_schedule(cfg: Config, peak_lr: float, total: int, steps_per_epoch: int,
                warmup: int) -> torch.Tensor:
    """The per-step lr: cosine to --min-lr, or MoCo v1's step schedule (--lr-milestones in
    epochs, x --lr-gamma at each)."""
    if cfg.lr_schedule == "cosine":
        return schedules.cosine(peak_lr, cfg.min_lr, total, warmup)
    if cfg.lr_schedule != "step":
        raise ValueError(f"--lr-schedule must be cosine or step, got {cfg.lr_schedule!r}")
    if not cfg.lr_milestones:
        raise ValueError("--lr-schedule step needs --lr-milestones (epochs, e.g. 120 160)")
    milestones = [round(e * steps_per_epoch) for e in cfg.lr_milestones]
    return schedules.step(peak_lr, total, milestones, cfg.lr_gamma, warmup)


KNN_BATCH = 256  # images per k-NN feature-extraction batch


def make_knn_loaders(cfg: Config):
    """((memory loader, query loader), None), deterministic single-view loaders over the
    labeled sets of data.layouts.score_sets; or (None, why) when there is nothing labeled."""
    sets = score_sets(cfg.data, cfg.test_data, cfg.knn_data, unlabeled=cfg.unlabeled,
                      seed=cfg.seed)
    if isinstance(sets, str):
        return None, sets
    train = subset(sets.memory, cfg.knn_train_size, cfg.seed)
    test = subset(sets.queries, cfg.knn_test_size, cfg.seed)
    kw = dict(device=cfg.data_device, img_size=cfg.img_size, num_threads=cfg.workers,
              drop_last=False, in_chans=cfg.in_chans, seed=cfg.seed, max_pixels=cfg.max_pixels)
    return (build_loader(train, "eval", KNN_BATCH, **kw),
            build_loader(test, "eval", KNN_BATCH, **kw)), None


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# ============================================================================ checkpoints
def checkpoint_state(model: nn.Module, opt, scaler, step: int, epoch: int, cfg: Config
                     ) -> dict:
    """Everything a resume needs. Collective under FSDP: call it on every rank."""
    from .distributed import model_state, optimizer_state

    return {"model": model_state(model), "optimizer": optimizer_state(model, opt),
            "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
            "config": cfg.to_dict(), "rng": ckpt.rng_state()}


def save_checkpoint(model, opt, scaler, step, epoch, cfg, path: Path, **extra) -> None:
    state = checkpoint_state(model, opt, scaler, step, epoch, cfg)  # every rank (FSDP)
    state.update(extra)
    if dist.is_main():
        ckpt.save(state, path)


def find_resume(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        p = run_dir / ckpt.CHECKPOINT_NAME
        return p if p.is_file() else None
    return ckpt.resolve_path(cfg.resume)


# ============================================================================ the loop
def train(cfg: Config) -> dict:
    """Train `cfg.method` and return a summary dict (k-NN before/after, steps, run folder)."""
    # ---------------------------------------------------------------- setup
    device = setup_device(cfg)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if main:  # which method preset, and why (engine/presets.py): the first line of every run
        print(describe_preset(cfg), flush=True)
    torch.manual_seed(cfg.seed + rank)
    run_dir = Path(cfg.out or f"runs/{cfg.method}-{cfg.arch}")
    cls = method_class(cfg)
    amp_dtype = AMP_DTYPES[cfg.precision]

    # ---------------------------------------------------------------- data
    recipe_kwargs = cls.recipe_kwargs(cfg) if hasattr(cls, "recipe_kwargs") else {}
    accum = cfg.accum_steps
    if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1:
        raise ValueError(f"--accum-steps must be an int >= 1, got {accum!r}")
    loader = make_train_loader(cfg, recipe_name(cfg, cls), recipe_kwargs)
    steps_per_epoch = len(loader) // accum  # optimizer steps: what every schedule counts
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} x --accum-steps {accum} x {world} "
                         f"processes exceeds the dataset ({loader.num_samples} images): "
                         "no full batch per epoch")
    cfg.img_size = cfg.img_size or loader.view_sizes[0]
    explicit_epochs = "epochs" in cfg.extra.get("cli_keys", ())
    schedule_steps = (cfg.steps if cfg.steps and not explicit_epochs
                      else max(1, math.ceil(cfg.epochs * steps_per_epoch)))
    total = min(cfg.steps, schedule_steps) if cfg.steps else schedule_steps
    cfg.extra.update(steps_per_epoch=steps_per_epoch, schedule_steps=schedule_steps,
                     world_size=world)
    # the small preset's warm-ups capped to a share of this schedule (presets.py), before the
    # method reads them and config.json records them
    for line in cap_warmups(cfg):
        if main:
            print(line, flush=True)

    # ---------------------------------------------------------------- model + optimizer
    method = cls(cfg).to(device)
    apply_init_from(method, cfg)  # --init-from: backbones loaded, heads fresh (docs/dinov2.md)
    # NHWC: ResNet convolutions run ~10-25% faster in oneDNN (CPU) and cuDNN (tensor cores);
    # a ViT only has its patch embedding to convert. Activations follow the input's format.
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    method.to(memory_format=memory_format)
    model = wrap_distributed(method, cfg, device)
    if cfg.compile:
        compile_modules(method)
    opt = build_optimizer(method.param_groups(cfg), cfg)
    peak_lr = cfg.peak_lr(world)
    # Python floats, read once: indexing a tensor per step would be a (host) sync to count
    lr_sched = lr_schedule(cfg, peak_lr, schedule_steps, steps_per_epoch,
                           round(cfg.warmup_epochs * steps_per_epoch)).tolist()
    wd_sched = (schedules.cosine(cfg.wd, cfg.wd_end, schedule_steps) if cfg.wd_end is not None
                else schedules.constant(cfg.wd, schedule_steps)).tolist()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    params = [p for p in method.parameters() if p.requires_grad]
    stem = first_layer(method.trained_encoder())

    # ---------------------------------------------------------------- resume
    step = 0
    resume_path = find_resume(cfg, run_dir)
    if resume_path is not None:
        state = ckpt.load(resume_path)
        for key in ("method", "arch"):
            if state["config"].get(key) != getattr(cfg, key):
                raise ckpt.CheckpointError(f"{resume_path} was trained with --{key} "
                                           f"{state['config'].get(key)}, not {getattr(cfg, key)}")
        from .distributed import load_states

        load_states(model, opt, state["model"], state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        ckpt.set_rng_state(state["rng"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    logger = RunLogger(run_dir, enabled=main)
    progress = Progress(total, step, cfg.batch_size * accum * world, cfg.log_every,
                        enabled=main)
    if resume_path is not None:
        progress.message(f"resumed from {resume_path} at step {step}")

    # ---------------------------------------------------------------- k-NN monitor
    knn_on = main and cfg.knn_every >= 0
    knn_loaders, knn_off = make_knn_loaders(cfg) if knn_on else (None, None)
    summary: dict = {"run_dir": str(run_dir), "method": cfg.method, "arch": cfg.arch}
    if knn_off:  # nothing labeled to score with: train anyway, and say so once
        knn_on, summary["knn_skipped"] = False, knn_off
        progress.message(knn_off)
    if knn_on and device.type == "cpu":
        n_images = sum(len(loader) for loader in knn_loaders) * KNN_BATCH
        cost = 2 * n_images * forward_flops(method.encoder(), cfg.img_size, cfg.in_chans, device)
        if cost > KNN_CPU_BUDGET_FLOP:
            knn_on, knn_loaders = False, None
            summary["knn_skipped"] = (
                f"k-NN monitor skipped: scoring {n_images} images before and after training "
                f"with {cfg.arch} would cost {cost / 1e12:.0f} TFLOP on CPU (budget "
                f"{KNN_CPU_BUDGET_FLOP / 1e12:.0f}); lower --knn-train-size/--knn-test-size, "
                "or evaluate later with python -m selfsup.eval")
            progress.message(summary["knn_skipped"])

    # --knn-every under 1 epoch scores every that many steps; whole epochs score at epoch ends
    knn_steps = (max(1, round(cfg.knn_every * steps_per_epoch))
                 if knn_on and 0 < cfg.knn_every < 1 else 0)

    def run_knn(tag: str) -> float:
        acc = knn_accuracy(method.encoder(), *knn_loaders, device, k=cfg.knn_k, t=cfg.knn_t,
                           autocast_dtype=amp_dtype)
        logger.log(step, {"knn_top1": acc, "tag": tag}, kind="knn")
        progress.message(f"[k-NN] step {step} ({tag}): top-1 {acc:.4f}")
        return acc

    if knn_on and step == 0:
        summary["knn_random_init"] = run_knn("random init")

    # ---------------------------------------------------------------- signals
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    collapse = CollapseMonitor()
    watch = NonFiniteWatch(device)  # NaN/Inf losses, on the device until the next check
    epoch = step // steps_per_epoch
    t_start = time.perf_counter()

    def check() -> bool:
        """The interval's one host read (and one all_reduce): stop on NaN or a signal."""
        first, signalled = watch.check(stop["signal"] is not None)
        if first is not None:
            path = run_dir / f"diagnostic-step{step}.pt"
            save_checkpoint(model, opt, scaler, step, epoch, cfg, path,
                            nonfinite_first_step=first)
            after = ("" if first == step else
                     f"; its weights were updated by steps {first}..{step - 1} with the "
                     "non-finite loss: inspect it, do not resume from it")
            raise NonFiniteLossError(
                f"non-finite loss first at step {first} of method {cfg.method} with lr "
                f"{lr_sched[first]:.4g} (found at the check of step {step}; checks run every "
                f"--log-every {cfg.log_every} steps); diagnostic checkpoint: {path}{after}")
        if signalled:  # a signal reached some rank: all stop before this step
            stop["signal"] = stop["signal"] or "SIGTERM (another rank)"
        return signalled

    try:
        while step < total and stop["signal"] is None:
            loader.set_epoch(epoch)
            done = step - epoch * steps_per_epoch  # optimizer steps this epoch already took
            source = iter(loader)
            batches = iter(DevicePrefetcher(
                itertools.islice(source, done * accum, steps_per_epoch * accum), device,
                depth=0 if getattr(loader, "backend", None) == "dali-gpu" else cfg.prefetch,
                memory_format=memory_format))
            try:
                for _ in range(done, steps_per_epoch):
                    if step >= total:
                        break
                    micro = [next(batches)[0] for _ in range(accum)]
                    # ---------------------------------------------- one optimizer step
                    lr = lr_sched[step]
                    for g in opt.param_groups:
                        g["lr"] = (peak_lr if g.get("fixed_lr") else lr) * g.get("lr_scale", 1.0)
                        g["weight_decay"] = wd_sched[step] if g.get("apply_wd", True) else 0.0
                    log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
                    ckpt_now = (step + 1) % cfg.ckpt_every == 0  # checked before it is saved
                    opt.zero_grad(set_to_none=True)
                    out = forward_backward(model, scaler, micro, step=step, watch=watch,
                                           amp_dtype=amp_dtype, device_type=device.type,
                                           check=check if log_now or ckpt_now else None)
                    if out is None:  # stopped at the check, before this update
                        break
                    scaler.unscale_(opt)
                    norms = {"grad_norm": clip_gradients(opt, params, cfg, step, log_now)}
                    if log_now:
                        if norms["grad_norm"] is None:
                            norms["grad_norm"] = grad_norm_tensor(params)
                        norms["grad_norm_first_layer"] = (
                            grad_norm_tensor(stem.parameters()) if stem is not None else 0.0)
                    scaler.step(opt)
                    scaler.update()
                    unwrap(model).on_step_end(step, schedule_steps)
                    step += 1
                    if knn_steps and step % knn_steps == 0 and step < total:
                        run_knn(f"epoch {step / steps_per_epoch:.2f}")
                    # ---------------------------------------------- logs and monitors
                    if log_now:
                        logs = read_scalars({**out, **norms})  # the interval's one copy
                        logs.update(lr=lr, epoch=step / steps_per_epoch)
                        if scaler.is_enabled():
                            logs["loss_scale"] = scaler.get_scale()
                        logger.log(step, logs)
                        collapse.update(step, logs)
                        progress.update(step, logs["loss"], lr)
                    if ckpt_now and step < total:
                        save_checkpoint(model, opt, scaler, step, epoch, cfg,
                                        run_dir / ckpt.CHECKPOINT_NAME)
                else:  # the epoch ran out (not a break)
                    epoch += 1
                    if knn_on and cfg.knn_every >= 1 and step < total and (
                            epoch % max(1, round(cfg.knn_every)) == 0):
                        run_knn(f"epoch {epoch}")
                    continue
            finally:
                batches.close()
                source.close()
            if step >= total or stop["signal"] is not None:
                break
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)

    # ---------------------------------------------------------------- the end
    save_checkpoint(model, opt, scaler, step, epoch, cfg, run_dir / ckpt.CHECKPOINT_NAME)
    summary.update(steps=step, seconds=round(time.perf_counter() - t_start, 1),
                   collapse_warnings=list(collapse.warnings))
    if stop["signal"] is not None:
        progress.message(f"received {stop['signal']}: saved {run_dir / ckpt.CHECKPOINT_NAME} "
                         f"at step {step}; resume with --resume auto --out {run_dir}")
        summary["interrupted"] = stop["signal"]
    elif knn_on:
        summary["knn_trained"] = run_knn("trained")
    logger.log(step, {k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
               kind="summary")
    logger.close()
    return summary


def clip_gradients(opt, params, cfg: Config, step: int, log_now: bool
                   ) -> torch.Tensor | None:
    """Drop frozen groups' gradients (DINO's last layer in epoch 1) and clip; returns the
    global norm before clipping (a device tensor, not read here) when it was computed
    (global mode, or a log step).

    global: the norm of all gradients together, after the frozen ones are dropped.
    per-param (official DINO): each tensor's norm to --clip-grad, BEFORE the last layer's
    gradient is cancelled (DINO's clip_gradients precedes cancel_gradients_last_layer).
    """
    if cfg.clip_grad and cfg.clip_mode not in ("global", "per-param"):
        raise ValueError(f"--clip-mode must be global or per-param, got {cfg.clip_mode!r}")
    per_param = bool(cfg.clip_grad) and cfg.clip_mode == "per-param"
    total_norm = grad_norm_tensor(params) if per_param and log_now else None
    if per_param:
        clip_per_param_(params, cfg.clip_grad)
    for g in opt.param_groups:  # e.g. DINO's last layer during epoch 1
        if step < g.get("freeze_steps", 0):
            for p in g["params"]:
                p.grad = None
    if cfg.clip_grad and not per_param:
        total_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    return total_norm


def compile_modules(method: nn.Module, backend: str = "inductor") -> list[str]:
    """torch.compile, in place, every child of the method that owns parameters (backbone,
    heads, predictor, EMA teachers); returns their names.

    nn.Module.compile keeps the module and its state_dict keys (no "_orig_mod." prefix), so
    checkpoints, EMA updates and DDP's parameter hooks see the same tensors. A ViT's
    forward_features (MAE's encoder entry, with its kept-patch indices) is compiled too.
    Losses stay outside: the fused ones are custom ops that the method's own graph calls.
    Called after the DDP/FSDP wrap, so compile traces the final modules (SyncBatchNorm,
    FSDP2 shards); DDP stays outside the compiled regions (no DDPOptimizer graph split)."""
    names = []
    for name, child in method.named_children():
        if next(child.parameters(), None) is None:
            continue
        child.compile(backend=backend)
        if callable(getattr(type(child), "forward_features", None)):
            child.forward_features = torch.compile(child.forward_features, backend=backend)
        names.append(name)
    return names


def wrap_distributed(method: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """DDP (or FSDP2 with --fsdp) across ranks; the method itself on one process."""
    if not dist.is_dist():
        return method
    from .distributed import wrap

    return wrap(method, cfg, device)
