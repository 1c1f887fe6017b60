"""Config: one dataclass drives the trainer; the CLI is derived from its fields.

Precedence: the dataclass defaults < the method's preset (`Method.preset(arch)`, the paper
defaults; with --preset small, or automatically for images <= 64 px, then
`Method.small_preset(arch)` on top: engine/presets.py) < what the command line gives. The
resolved config is saved in the run folder as config.json (its `preset` field the one chosen),
and checkpoints carry it. `resolve_cli(argv)` is what train.py runs: parse, choose the preset
from --data, resolve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Config:
    # ---------------------------------------------------------------- what to train
    method: str = "byol"  # a key of selfsup.ssl.METHODS
    preset: str | None = None  # imagenet | small; None: small for images <= 64 px (presets.py)
    arch: str = "resnet_tiny"  # a backbone of selfsup.models.build_backbone
    data: str = "fashion-mnist"  # fashion-mnist | mnist | fashion-mnist-sample | image folder
    test_data: str | None = None  # labeled held-out set (the split folder, or DIR with val/)
    knn_data: str | None = None  # labeled set for the k-NN monitor (for an unlabeled --data)
    unlabeled: bool = False  # --data's folders are not classes (nested unlabeled images)
    max_pixels: int | None = None  # skip larger images; None: $SELFSUP_MAX_PIXELS or ~179 MP
    img_size: int | None = None  # None: 32 for 28-px datasets, 224 for image folders
    patch_size: int | None = None  # ViT patch; None: the arch table, or 4 for images <= 64 px
    in_chans: int = 3  # grey images are replicated to 3 channels
    cifar_stem: bool | None = None  # ResNet 3x3 stride-1 stem, no max-pool; None: if <= 64 px
    # ---------------------------------------------------------------- how long
    epochs: float = 100  # schedule length in epochs (unless only --steps is given)
    steps: int | None = None  # stop after this many optimizer steps
    batch_size: int = 256  # per process
    # ---------------------------------------------------------------- optimization
    optimizer: str = "sgd"  # sgd | lars | adamw
    lr: float | None = None  # absolute peak lr; overrides blr
    blr: float = 0.03  # base lr: lr = blr * global_batch / 256 (sqrt: blr * sqrt(batch))
    lr_scaling: str = "linear"  # linear: blr * batch / 256 | sqrt: blr * sqrt(batch) (SimCLR)
    lr_schedule: str = "cosine"  # cosine | step (MoCo v1: x lr_gamma at each milestone)
    lr_milestones: tuple[float, ...] | None = None  # step schedule: epochs (MoCo v1: 120 160)
    lr_gamma: float = 0.1  # step schedule: factor at each milestone
    min_lr: float = 0.0  # end of the cosine lr schedule
    wd: float = 1e-4  # weight decay (start value when wd_end is set)
    wd_end: float | None = None  # cosine weight-decay schedule end (DINO: 0.4); None: constant
    decay_all: bool | None = None  # wd on biases and norms too (official MoCo, SimSiam, MoCo v3)
    momentum: float = 0.9  # SGD / LARS momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (MAE: 0.9, 0.95)
    warmup_epochs: float = 0.0  # linear lr warm-up
    clip_grad: float | None = None  # max grad norm (DINO: 3.0), see clip_mode
    clip_mode: str = "global"  # global: the norm of all grads | per-param: each tensor's (DINO)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; GradScaler for fp16)
    grad_ckpt: bool = False  # activation checkpointing in ViT blocks (ViT-L/H)
    channels_last: bool = False  # NHWC weights and images: faster oneDNN / cuDNN convolutions
    accum_steps: int = 1  # micro-batches of --batch-size per optimizer step (docs/training.md)
    compile: bool = False  # torch.compile the backbone and heads (docs/training.md)
    drop_path: float | None = None  # ViT stochastic depth of the trained encoder (DINO: 0.1)
    zero_init_residual: bool | None = None  # ResNet: last BN of each block 0 (MoCo v3, SimSiam)
    vit_init: str | None = None  # xavier (MAE, MoCo v3) | trunc_normal (DINO: std 0.02)
    registers: int = 0  # ViT register tokens after cls (Darcet et al. 2023; docs/dinov2.md)
    layer_scale: float | None = None  # ViT LayerScale init, e.g. 1e-5 (DINOv2); None: off
    init_from: str | None = None  # backbone weights file (export / timm / DINOv2 names)
    init_warmup_steps: int = 0  # with --init-from: backbone frozen for the first N steps
    # ---------------------------------------------------------------- method knobs (presets)
    temperature: float | None = None  # InfoNCE / NT-Xent / DINO student temperature
    queue_size: int | None = None  # MoCo v1/v2 negative queue length K
    ema_momentum: float | None = None  # base momentum of key / target / teacher encoder
    proj_dim: int | None = None  # projection output width
    proj_hidden: int | None = None  # projection hidden width
    proj_layers: int | None = None  # SimSiam projector Linears (paper 3; its CIFAR recipe 2)
    pred_hidden: int | None = None  # predictor hidden width
    mlp_bias: bool | None = None  # bias in head Linears feeding no BN (MoCo v3: none)
    out_dim: int | None = None  # DINO head output width K
    n_local: int | None = None  # DINO / SwAV local crops (their presets: 8 / 6)
    local_crops: int | None = None  # multi-crop: N local views for any method that takes them
    teacher_temp: float | None = None  # DINO teacher temperature after warm-up
    warmup_teacher_temp: float | None = None  # DINO teacher temperature at step 0
    warmup_teacher_temp_epochs: float | None = None  # DINO teacher temperature warm-up
    freeze_last_layer_epochs: float | None = None  # DINO: last head layer frozen this long
    norm_last_layer: bool | None = None  # DINO: the head's last layer keeps unit-norm rows
    center_momentum: float | None = None  # DINO center EMA
    centering: str | None = None  # DINO teacher: center (EMA) | sinkhorn (DINOv2); None: preset
    koleo_weight: float | None = None  # DINOv2 KoLeo regulariser weight (paper 0.1)
    mask_ratio: float | None = None  # MAE
    norm_pix: bool | None = None  # MAE normalized-pixel target
    decoder_dim: int | None = None  # MAE decoder width
    decoder_depth: int | None = None  # MAE decoder blocks
    shuffle_bn: bool | None = None  # MoCo v1/v2 shuffle BN (emulated on one process)
    barlow_lambda: float | None = None  # Barlow Twins off-diagonal weight (paper 0.0051)
    vicreg_weights: tuple[float, ...] | None = None  # VICReg sim var cov weights (25 25 1)
    sinkhorn_eps: float | None = None  # SwAV Sinkhorn-Knopp epsilon (paper 0.05)
    sinkhorn_iters: int | None = None  # SwAV Sinkhorn-Knopp iterations (paper 3)
    queue_start_epochs: float | None = None  # SwAV: the queue joins the codes from this epoch
    mask_ratio_range: tuple[float, float] | None = None  # iBOT block-mask ratio range (0.1 0.5)
    mask_probability: float | None = None  # iBOT / DINOv2: chance an image is masked (0.5)
    patch_out_dim: int | None = None  # iBOT patch head width (8192; a shared head: = out_dim)
    separate_patch_head: bool | None = None  # iBOT: a head of its own for the patch tokens
    patch_loss_weight: float | None = None  # iBOT lambda2, the masked-patch loss weight (1.0)
    teacher_patch_temp: float | None = None  # iBOT patch teacher temperature after warm-up
    warmup_teacher_patch_temp: float | None = None  # iBOT patch teacher temperature at step 0
    # ---------------------------------------------------------------- augmentation
    crop_scale: tuple[float, float] | None = None  # random-resized-crop area (DINO: global)
    local_crop_scale: tuple[float, float] | None = None  # DINO local crops (paper 0.05 0.4)
    blur: bool = True  # the recipe's Gaussian blur; --no-blur: SimCLR's CIFAR-10 recipe
    aug: str | None = None  # augmentation recipe (selfsup.data.recipes); None: the method's
    interp: str | None = None  # crop resize: linear | cubic; None: the recipe's (DINO, MAE cubic)
    jitter_strength: float | None = None  # SimCLR colour distortion s (ImageNet 1.0, CIFAR 0.5)
    # ---------------------------------------------------------------- runtime
    device: str = "auto"  # auto | cpu | cuda
    data_device: str = "auto"  # loader: auto | dali-gpu | dali-cpu | portable
    workers: int | None = None  # loader threads; None: all cores
    out: str | None = None  # run folder; None: runs/<method>-<arch>
    resume: str | None = None  # checkpoint path, run folder, or "auto" (this run's folder)
    seed: int = 0
    knn_every: float = 1.0  # k-NN every N epochs, < 1: every that fraction (0: before/after only)
    knn_k: int = 20
    knn_t: float = 0.07
    knn_train_size: int = 10000  # train images used as the k-NN memory (0: all)
    knn_test_size: int = 10000  # held-out images scored (0: all)
    log_every: int = 10  # optimizer steps between log lines (and NaN checks: host syncs)
    prefetch: int = 2  # batches copied to the device ahead of the step (0: none)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (and always at the end)
    fsdp: bool = False  # shard with FSDP2 fully_shard (ViT-L/H, several GPUs)
    # Filled in by the trainer, not by users.
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    # ---------------------------------------------------------------- derived values
    def peak_lr(self, world_size: int = 1) -> float:
        """--lr, else --blr scaled by the effective batch (--batch-size x --accum-steps x
        processes): linearly (x batch / 256, Goyal et al. 2017) or by its square root
        (SimCLR's LARS: 0.075 * sqrt(batch))."""
        if self.lr is not None:
            return self.lr
        batch = self.batch_size * self.accum_steps * world_size  # the effective batch
        if self.lr_scaling == "sqrt":
            return self.blr * math.sqrt(batch)
        if self.lr_scaling != "linear":
            raise ValueError(f"--lr-scaling must be linear or sqrt, got {self.lr_scaling!r}")
        return self.blr * batch / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("betas", "crop_scale", "local_crop_scale", "lr_milestones",
                    "vicreg_weights", "mask_ratio_range"):  # JSON: lists
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


CHOICES = {
    "preset": ("imagenet", "small"),
    "optimizer": ("sgd", "lars", "adamw"),
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "data_device": ("auto", "dali-gpu", "dali-cpu", "portable"),
    "lr_scaling": ("linear", "sqrt"),
    "lr_schedule": ("cosine", "step"),
    "clip_mode": ("global", "per-param"),
    "vit_init": ("xavier", "trunc_normal"),
    "interp": ("linear", "cubic"),
    "centering": ("center", "sinkhorn"),
}


def _base_type(annotation: object) -> tuple[type, bool]:
    """(scalar type, optional?) for an annotation like `int | None` or `tuple[float, float]`."""
    tp = typing.get_type_hints(Config)[annotation] if isinstance(annotation, str) else annotation
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field (underscores become dashes); unset flags stay absent."""
    p = argparse.ArgumentParser(
        prog="train.py", argument_default=argparse.SUPPRESS,
        description="Self-supervised pre-training. Defaults < method preset < these flags.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if not f.metadata.get("cli", True):
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, dest=f.name)
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is Ellipsis:
            p.add_argument(flag, type=float, nargs="+", dest=f.name, metavar="E")
        elif typing.get_origin(tp) is tuple:
            p.add_argument(flag, type=float, nargs=2, dest=f.name, metavar=("B1", "B2"))
        else:
            p.add_argument(flag, type=tp, dest=f.name, choices=CHOICES.get(f.name),
                           metavar=None if f.name in CHOICES else f.name.upper())
    return p


def _merge(cfg: dict, preset: dict, what: str) -> None:
    unknown = set(preset) - set(cfg)
    if unknown:
        raise ValueError(f"{what} sets unknown config keys: {sorted(unknown)}")
    cfg.update(preset)


def resolve(cli: dict, preset_fn: typing.Callable[[str | None], dict] | None = None,
            small_preset_fn: typing.Callable[[str | None], dict] | None = None,
            image_px: int | None = None) -> Config:
    """Merge defaults < preset < (small preset) < cli. `cli` holds only the flags given.

    With `small_preset_fn` the preset is chosen as train.py does (presets.choose: --preset,
    else `image_px`, the training images' longer side); without it `preset_fn` alone applies
    (the ImageNet preset, as before --preset existed) unless cli says --preset small, which
    takes the small preset of the class `preset_fn` is bound to. resolve_method does all of
    it from --data."""
    from . import presets

    cfg = Config().to_dict()
    presets.check_preset(cli.get("preset"))
    name, why = cli.get("preset"), None
    if preset_fn is not None:
        if small_preset_fn is None and name == "small":
            small_preset_fn = getattr(getattr(preset_fn, "__self__", None), "small_preset", None)
            if small_preset_fn is None:
                raise ValueError("--preset small: this method preset has no small_preset")
        if small_preset_fn is not None:
            name, why = presets.choose(cli, image_px)
        else:
            name = name or "imagenet"
            why = "--preset imagenet" if cli.get("preset") else \
                "the method's paper preset; resolved without the image size"
        arch = cli.get("arch")
        _merge(cfg, preset_fn(arch), "method preset")
        if name == "small":
            small = small_preset_fn(arch)  # the arch the run will have decides the stem
            final_arch = cli.get("arch") or small.get("arch") or cfg["arch"]
            _merge(cfg, {**presets.small_common(final_arch, image_px), **small},
                   "method small preset")
    cfg.update(cli)
    cfg["preset"] = name
    out = Config.from_dict(cfg)
    out.extra["cli_keys"] = sorted(cli)
    if why:
        out.extra["preset_why"] = why
    return out


def resolve_method(cli: dict, image_px: int | None = None) -> Config:
    """resolve() for the method named by cli (default: Config.method), with its ImageNet and
    small presets, the choice made from the size of --data's images (image_px, measured from
    --data by presets.image_px when not given) unless --preset is given."""
    from ..ssl import METHODS
    from . import presets

    name = cli.get("method", Config.method)
    if name not in METHODS:
        raise ValueError(f"--method must be one of {sorted(METHODS)}, got {name!r}")
    cls = METHODS[name]
    presets.check_preset(cli.get("preset"))
    if image_px is None and cli.get("preset") is None:
        image_px = presets.image_px(cli.get("data", Config.data))
    return resolve(cli, cls.preset, cls.small_preset, image_px)


def resolve_cli(argv: list[str]) -> Config:
    """What `python train.py ARGV` runs: parse the flags, choose the preset, resolve."""
    return resolve_method(vars(build_parser().parse_args(list(argv))))
