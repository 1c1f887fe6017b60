"""docs/recipes.md: each method's preset beside the paper's values, generated from the presets.

    python -m selfsup.recipes_doc            # rewrite docs/recipes.md
    python -m selfsup.recipes_doc --check    # exit 1 when the file differs from the output

The "preset" column is read from the code: the config `train.py --method M --arch A` resolves
to (defaults < the method's preset) and the augmentation recipe it builds at 224 px. The paper
and official-code columns are written here, from the papers and their official repositories
(/work/shared/METHODS.md has the prose). A row is marked when the preset differs from the
official code (or from the paper, where the official code says nothing else), so a
deviation cannot hide. tests/test_faithful.py checks the committed file equals this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"

# (method, arch, title, rows). A row: (label, key, paper, official, note). `key` is a Config
# field, "sync_bn" (the method's class attribute) or "aug:<what>" (the recipe, below).
# `official` is None where the official code agrees with the paper.
# Paper values are the ImageNet settings of each paper's main table, for the arch named.
AUG_MOCOV2 = [
    ("crop scale", "aug:scale", "0.2-1", None, ""),
    ("colour jitter (b, c, s, h)", "aug:jitter", "0.4, 0.4, 0.4, 0.1", None, ""),
    ("jitter p", "aug:jitter_p", 0.8, None, ""),
    ("grey p", "aug:gray_p", 0.2, None, ""),
    ("blur p (view 1 / 2)", "aug:blur_p", "0.5 / 0.5", None, "sigma 0.1-2"),
    ("solarize p (view 1 / 2)", "aug:solarize_p", "0 / 0", None, ""),
    ("crop interpolation", "aug:interp", "linear", None, "torchvision's default, bilinear"),
]
AUG_BYOL = [
    ("crop scale", "aug:scale", "0.08-1", None, ""),
    ("colour jitter (b, c, s, h)", "aug:jitter", "0.4, 0.4, 0.2, 0.1", None, ""),
    ("jitter p", "aug:jitter_p", 0.8, None, ""),
    ("grey p", "aug:gray_p", 0.2, None, ""),
    ("blur p (view 1 / 2)", "aug:blur_p", "1 / 0.1", None, "sigma 0.1-2"),
    ("solarize p (view 1 / 2)", "aug:solarize_p", "0 / 0.2", None, ""),
    ("crop interpolation", "aug:interp", "linear", None, ""),
]

METHODS = [
    ("mocov1", "resnet50", "MoCo v1 (He et al. 2020), ResNet-50", [
        ("optimizer", "optimizer", "sgd", None, ""),
        ("base lr (x batch / 256)", "blr", 0.03, None, ""),
        ("lr scaling", "lr_scaling", "linear", None, ""),
        ("lr schedule", "lr_schedule", "step", None, ""),
        ("lr milestones (epochs)", "lr_milestones", "120, 160", None, "x0.1 at each"),
        ("epochs", "epochs", 200, None, ""),
        ("weight decay", "wd", 1e-4, None, ""),
        ("decay biases and BN too", "decay_all", True, None, "official: SGD over all params"),
        ("SGD momentum", "momentum", 0.9, None, ""),
        ("temperature", "temperature", 0.07, None, ""),
        ("queue size K", "queue_size", 65536, None, ""),
        ("key encoder momentum", "ema_momentum", 0.999, None, ""),
        ("head output", "proj_dim", 128, None, "one Linear"),
        ("shuffle BN", "shuffle_bn", True, None, ""),
        ("crop scale", "aug:scale", "0.2-1", None, ""),
        ("colour jitter (b, c, s, h)", "aug:jitter", "0.4, 0.4, 0.4, 0.4", None, ""),
        ("jitter p", "aug:jitter_p", 1.0, None, ""),
        ("grey p", "aug:gray_p", 0.2, None, ""),
        ("blur p (view 1 / 2)", "aug:blur_p", "0 / 0", None, ""),
    ]),
    ("mocov2", "resnet50", "MoCo v2 (Chen et al. 2020), ResNet-50", [
        ("optimizer", "optimizer", "sgd", None, ""),
        ("base lr (x batch / 256)", "blr", 0.03, None, ""),
        ("lr schedule", "lr_schedule", "cosine", None, ""),
        ("epochs", "epochs", 200, None, "800 for 71.1%"),
        ("weight decay", "wd", 1e-4, None, ""),
        ("decay biases and BN too", "decay_all", True, None, "official: SGD over all params"),
        ("temperature", "temperature", 0.2, None, ""),
        ("queue size K", "queue_size", 65536, None, ""),
        ("key encoder momentum", "ema_momentum", 0.999, None, ""),
        ("head hidden", "proj_hidden", "backbone width", None, "2048 for ResNet-50"),
        ("head output", "proj_dim", 128, None, ""),
        ("shuffle BN", "shuffle_bn", True, None, ""),
        *AUG_MOCOV2,
    ]),
    ("mocov3", "vit_small", "MoCo v3 (Chen, Xie and He 2021), ViT-S/16", [
        ("optimizer", "optimizer", "adamw", None, ""),
        ("base lr (x batch / 256)", "blr", 1.5e-4, None, ""),
        ("weight decay", "wd", 0.1, None, ""),
        ("decay biases and norms too", "decay_all", True, None, "official AdamW: all params"),
        ("warm-up epochs", "warmup_epochs", 40, None, ""),
        ("epochs", "epochs", 300, None, ""),
        ("temperature", "temperature", 0.2, None, ""),
        ("momentum (cosine to 1)", "ema_momentum", 0.99, None, ""),
        ("projector hidden", "proj_hidden", 4096, None, "3 layers for ViT"),
        ("projection dim", "proj_dim", 256, None, ""),
        ("predictor hidden", "pred_hidden", 4096, None, ""),
        ("bias in MLP Linears", "mlp_bias", False, None, ""),
        ("ViT init", "vit_init", "xavier", None, "frozen random patch projection"),
        ("SyncBN in the heads", "sync_bn", True, None, ""),
        *AUG_BYOL,
    ]),
    ("mocov3", "resnet50", "MoCo v3, ResNet-50", [
        ("optimizer", "optimizer", "lars", None, ""),
        ("base lr (x batch / 256)", "blr", 0.6, None, "official CONFIG.md, 100 epochs"),
        ("weight decay", "wd", 1e-6, None, "LARS skips biases and BN"),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 100, None, "300 / 1000 epochs: lr 0.3 (1000: wd 1.5e-6, "
         "momentum 0.996)"),
        ("temperature", "temperature", 1.0, None, ""),
        ("momentum (cosine to 1)", "ema_momentum", 0.99, None, ""),
        ("projector hidden", "proj_hidden", 4096, None, "2 layers for ResNet"),
        ("bias in MLP Linears", "mlp_bias", False, None, ""),
        ("zero-init residuals", "zero_init_residual", True, None, ""),
        ("SyncBN", "sync_bn", True, None, ""),
        ("crop scale", "aug:scale", "-", "0.2-1", "CONFIG.md's ResNet-50 commands pass "
         "--crop-min=.2 (main_moco.py's default, the ViT one, is 0.08)"),
        ("blur p (view 1 / 2)", "aug:blur_p", "1 / 0.1", None, ""),
        ("solarize p (view 1 / 2)", "aug:solarize_p", "0 / 0.2", None, ""),
    ]),
    ("simsiam", "resnet50", "SimSiam (Chen and He 2021), ResNet-50", [
        ("optimizer", "optimizer", "sgd", None, ""),
        ("base lr (x batch / 256)", "blr", 0.05, None, "predictor: fixed lr"),
        ("weight decay", "wd", 1e-4, None, ""),
        ("decay biases and BN too", "decay_all", True, None, "official: SGD over all params"),
        ("SGD momentum", "momentum", 0.9, None, ""),
        ("epochs", "epochs", 100, None, ""),
        ("projector hidden", "proj_hidden", "backbone width", None, "2048 for ResNet-50"),
        ("projector output", "proj_dim", 2048, None, ""),
        ("predictor hidden", "pred_hidden", 512, None, ""),
        ("zero-init residuals", "zero_init_residual", True, None, ""),
        ("SyncBN", "sync_bn", True, None, ""),
        *AUG_MOCOV2,
    ]),
    ("byol", "resnet50", "BYOL (Grill et al. 2020), ResNet-50, 300 epochs", [
        ("optimizer", "optimizer", "lars", None, ""),
        ("base lr (x batch / 256)", "blr", 0.2, 0.3, "paper 0.2 is for 1000 epochs; the "
         "official code's 300-epoch preset is 0.3"),
        ("weight decay", "wd", 1.5e-6, 1e-6, "1000 epochs: 1.5e-6; 300: 1e-6 (official)"),
        ("decay biases and BN too", "decay_all", False, None, "excluded from wd and LARS"),
        ("target momentum (cosine to 1)", "ema_momentum", 0.996, 0.99,
         "1000 epochs: 0.996; 300: 0.99 (official)"),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 1000, 300, "the preset is the 300-epoch one"),
        ("projector hidden", "proj_hidden", 4096, None, ""),
        ("projection dim", "proj_dim", 256, None, ""),
        ("predictor hidden", "pred_hidden", 4096, None, ""),
        ("SyncBN", "sync_bn", True, None, ""),
        *AUG_BYOL,
    ]),
    ("simclr", "resnet50", "SimCLR (Chen et al. 2020), ResNet-50", [
        ("optimizer", "optimizer", "lars", None, ""),
        ("base lr", "blr", 0.3, None, "or 0.075 x sqrt(batch): --lr-scaling sqrt --blr 0.075"),
        ("lr scaling", "lr_scaling", "linear", None, ""),
        ("weight decay", "wd", 1e-6, None, ""),
        ("decay biases and BN too", "decay_all", False, None, ""),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 100, None, "up to 1000 in the paper"),
        ("temperature", "temperature", 0.1, None, ""),
        ("projector hidden", "proj_hidden", 2048, None, ""),
        ("projection dim", "proj_dim", 128, None, ""),
        ("SyncBN", "sync_bn", True, None, ""),
        ("crop scale", "aug:scale", "0.08-1", None, ""),
        ("colour jitter (b, c, s, h)", "aug:jitter", "0.8, 0.8, 0.8, 0.2", None,
         "strength 1.0 (--jitter-strength)"),
        ("jitter p", "aug:jitter_p", 0.8, None, ""),
        ("grey p", "aug:gray_p", 0.2, None, ""),
        ("blur p (view 1 / 2)", "aug:blur_p", "0.5 / 0.5", None, ""),
    ]),
    ("dino", "vit_small", "DINO (Caron et al. 2021), ViT-S/16", [
        ("optimizer", "optimizer", "adamw", None, ""),
        ("base lr (x batch / 256)", "blr", 5e-4, None, ""),
        ("min lr", "min_lr", 1e-6, None, ""),
        ("weight decay (cosine)", "wd", 0.04, None, ""),
        ("weight decay end", "wd_end", 0.4, None, ""),
        ("gradient clip", "clip_grad", 3.0, None, ""),
        ("clip mode", "clip_mode", "per-param", None, "each tensor, before the last-layer "
         "freeze"),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 100, None, "ViT-S/16 also 300 / 800"),
        ("student temperature", "temperature", 0.1, None, ""),
        ("teacher temperature", "teacher_temp", 0.07, None, "after the warm-up"),
        ("teacher temperature at start", "warmup_teacher_temp", 0.04, None, ""),
        ("teacher temperature warm-up", "warmup_teacher_temp_epochs", 30, None, "epochs"),
        ("teacher momentum (cosine to 1)", "ema_momentum", 0.996, None, ""),
        ("center momentum", "center_momentum", 0.9, None, ""),
        ("head output K", "out_dim", 65536, None, ""),
        ("head hidden", "proj_hidden", 2048, None, ""),
        ("head bottleneck", "proj_dim", 256, None, ""),
        ("norm_last_layer", "norm_last_layer", True, None,
         "official help recommends False for ViT-S (--no-norm-last-layer)"),
        ("last layer frozen (epochs)", "freeze_last_layer_epochs", 1, None, ""),
        ("local crops", "n_local", 8, None, ""),
        ("student drop path", "drop_path", 0.1, None, "teacher: none"),
        ("ViT init", "vit_init", "trunc_normal", None, "std 0.02"),
        ("SyncBN (ResNet backbones)", "sync_bn", True, None, ""),
        ("global crop scale", "aug:scale", "0.4-1", None, ""),
        ("local crop scale", "aug:local_scale", "0.05-0.4", None, "--local-crop-scale"),
        ("colour jitter (b, c, s, h)", "aug:jitter", "0.4, 0.4, 0.2, 0.1", None, ""),
        ("blur p (global 1 / 2)", "aug:blur_p", "1 / 0.1", None, "locals 0.5"),
        ("solarize p (global 1 / 2)", "aug:solarize_p", "0 / 0.2", None, ""),
        ("crop interpolation", "aug:interp", "cubic", None, ""),
    ]),
    ("ibot", "vit_small", "iBOT (Zhou et al. 2022), ViT-S/16", [
        ("optimizer", "optimizer", "adamw", None, ""),
        ("base lr (x batch / 256)", "blr", 5e-4, None, ""),
        ("min lr", "min_lr", 1e-6, None, ""),
        ("weight decay (cosine)", "wd", 0.04, None, ""),
        ("weight decay end", "wd_end", 0.4, None, ""),
        ("gradient clip", "clip_grad", 3.0, None, "each tensor"),
        ("clip mode", "clip_mode", "per-param", None, ""),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 800, None, "ViT-S/16 also 100 / 300"),
        ("student temperature", "temperature", 0.1, None, ""),
        ("teacher temperature (cls)", "teacher_temp", 0.07, None, "after the warm-up"),
        ("teacher temperature at start", "warmup_teacher_temp", 0.04, None, ""),
        ("teacher patch temperature", "teacher_patch_temp", 0.07, None, ""),
        ("teacher patch temperature at start", "warmup_teacher_patch_temp", 0.04, None, ""),
        ("teacher temperature warm-up", "warmup_teacher_temp_epochs", 30, None,
         "epochs, both"),
        ("teacher momentum (cosine to 1)", "ema_momentum", 0.996, None, ""),
        ("center momentum", "center_momentum", 0.9, None, "cls and patch centers; the "
         "patch center averages the masked tokens (DINOv2), iBOT's all of them"),
        ("head output K", "out_dim", 8192, None, ""),
        ("patch head output K", "patch_out_dim", 8192, None, ""),
        ("separate patch head", "separate_patch_head", False, None, "shared for ViT-S/B"),
        ("head hidden", "proj_hidden", 2048, None, ""),
        ("head bottleneck", "proj_dim", 256, None, ""),
        ("norm_last_layer", "norm_last_layer", False, None, ""),
        ("last layer frozen (epochs)", "freeze_last_layer_epochs", 1, None, "both heads"),
        ("local crops", "n_local", 10, None, ""),
        ("mask ratio range", "mask_ratio_range", "0.1, 0.5", None, "pred_ratio 0.3 +- 0.2"),
        ("masked image probability", "mask_probability", 0.5, None,
         "pred_ratio [0, 0.3]: one of the two per image"),
        ("patch loss weight (lambda2)", "patch_loss_weight", 1.0, None, ""),
        ("student drop path", "drop_path", 0.1, None, "teacher: none"),
        ("ViT init", "vit_init", "trunc_normal", None, "std 0.02"),
        ("global crop scale", "aug:scale", "0.25-1", None, ""),
        ("local crop scale", "aug:local_scale", "0.05-0.25", None, ""),
        ("crop interpolation", "aug:interp", "cubic", None, ""),
    ]),
    ("mae", "vit_base", "MAE (He et al. 2022), ViT-B/16 pre-training", [
        ("optimizer", "optimizer", "adamw", None, ""),
        ("AdamW betas", "betas", "0.9, 0.95", None, ""),
        ("base lr (x batch / 256)", "blr", 1.5e-4, None, ""),
        ("weight decay", "wd", 0.05, None, ""),
        ("decay biases and norms too", "decay_all", False, None, ""),
        ("warm-up epochs", "warmup_epochs", 40, None, ""),
        ("epochs", "epochs", 800, None, "1600 for the headline"),
        ("mask ratio", "mask_ratio", 0.75, None, ""),
        ("normalized-pixel target", "norm_pix", True, None, ""),
        ("decoder width", "decoder_dim", 512, None, ""),
        ("decoder depth", "decoder_depth", 8, None, ""),
        ("crop scale", "aug:scale", "0.2-1", None, "crop + flip only"),
        ("crop interpolation", "aug:interp", "cubic", None, ""),
    ]),
    ("barlowtwins", "resnet50", "Barlow Twins (Zbontar et al. 2021), ResNet-50", [
        ("optimizer", "optimizer", "lars", None, "biases and BN outside LARS and wd"),
        ("base lr (x batch / 256)", "blr", 0.2, None,
         "biases and BN: 0.0048 (their param group's lr_scale 0.024)"),
        ("weight decay", "wd", 1.5e-6, None, ""),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 1000, None, ""),
        ("projector hidden", "proj_hidden", 8192, None, "Linear-BN-ReLU x 2, then Linear"),
        ("projection dim", "proj_dim", 8192, None, ""),
        ("lambda (off-diagonal)", "barlow_lambda", 0.0051, None, ""),
        ("SyncBN", "sync_bn", True, None, ""),
        *AUG_BYOL,
    ]),
    ("vicreg", "resnet50", "VICReg (Bardes et al. 2022), ResNet-50", [
        ("optimizer", "optimizer", "lars", None, "biases and BN outside LARS and wd"),
        ("base lr (x batch / 256)", "blr", 0.2, None, ""),
        ("weight decay", "wd", 1e-6, None, ""),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 1000, None, ""),
        ("expander hidden", "proj_hidden", 8192, None, "Linear-BN-ReLU x 2, then Linear"),
        ("expander dim", "proj_dim", 8192, None, ""),
        ("sim, var, cov weights", "vicreg_weights", "25, 25, 1", None, ""),
        *AUG_BYOL,
    ]),
    ("swav", "resnet50", "SwAV (Caron et al. 2020), ResNet-50, 2x224 + 6x96", [
        ("optimizer", "optimizer", "lars", None, ""),
        ("base lr (x batch / 256)", "blr", 0.3, None, "4.8 at batch 4096"),
        ("final lr", "min_lr", 0.0048, None, "absolute: the paper's at batch 4096"),
        ("weight decay", "wd", 1e-6, None, ""),
        ("warm-up epochs", "warmup_epochs", 10, None, ""),
        ("epochs", "epochs", 800, None, ""),
        ("projector hidden", "proj_hidden", 2048, None, ""),
        ("projection dim", "proj_dim", 128, None, ""),
        ("prototypes K", "out_dim", 3000, None, "rows re-normalised after every step"),
        ("temperature", "temperature", 0.1, None, ""),
        ("Sinkhorn epsilon", "sinkhorn_eps", 0.05, None, ""),
        ("Sinkhorn iterations", "sinkhorn_iters", 3, None, "sums all-reduced across ranks"),
        ("queue length", "queue_size", 3840, None, "the batch-256 setting"),
        ("queue from epoch", "queue_start_epochs", 15, None, ""),
        ("prototypes frozen (epochs)", "freeze_last_layer_epochs", 1, None,
         "313 iterations at batch 4096; counted in steps"),
        ("local crops", "n_local", 6, None, "96 px"),
        ("SyncBN", "sync_bn", True, None, ""),
        ("global crop scale", "aug:scale", "0.14-1", None, ""),
        ("local crop scale", "aug:local_scale", "0.05-0.14", None, "--local-crop-scale"),
        ("colour jitter (b, c, s, h)", "aug:jitter", "0.8, 0.8, 0.8, 0.2", None, ""),
        ("jitter p", "aug:jitter_p", 0.8, None, ""),
        ("grey p", "aug:gray_p", 0.2, None, ""),
        ("blur p (global 1 / 2)", "aug:blur_p", "0.5 / 0.5", None, "locals 0.5"),
    ]),
]

# what an unset (None) preset value means, per key
NONE_MEANS = {"proj_hidden": "backbone width", "decoder_dim": 512, "decoder_depth": 8,
              "decay_all": False, "mlp_bias": True, "zero_init_residual": False,
              "norm_last_layer": True, "drop_path": 0.0, "vit_init": "xavier",
              "lr_milestones": "-"}


# The flags that choose between the official behaviour and an alternative.
FLAGS = """
## Flags for the official behaviour (and its alternatives)

- `--clip-mode global|per-param` with `--clip-grad N`: the norm of all gradients, or each
  tensor's (official DINO, applied before its last layer's gradient is cancelled).
- `--drop-path RATE`: stochastic depth in the trained ViT (last block's rate, linear from 0);
  momentum / target / teacher copies never drop paths, and eval never does.
- `--lr-scaling linear|sqrt`: `blr x batch / 256`, or `blr x sqrt(batch)` (SimCLR).
- `--lr-schedule cosine|step`, `--lr-milestones E ...` (epochs), `--lr-gamma`.
- `--decay-all` / `--no-decay-all`: weight decay on biases and norm parameters too.
- `--zero-init-residual`: each ResNet block's last BN gamma starts at 0.
- `--mlp-bias` / `--no-mlp-bias`: a bias in head Linears that feed no BN (MoCo v3: none).
- `--vit-init xavier|trunc_normal`; `--norm-last-layer` / `--no-norm-last-layer` (DINO head).
- `--aug RECIPE` (mocov1, mocov2, byol, simclr, dino, swav, mae), `--interp linear|cubic`,
  `--jitter-strength S` (SimCLR), `--crop-scale A B`, `--local-crop-scale A B`.
- `--local-crops N`: multi-crop, N local views besides the 2 global ones, for byol, simsiam,
  simclr, barlowtwins, vicreg, swav and dino (DINO and SwAV default to their `--n-local`,
  8 and 6; the others to none); docs/multicrop.md says which pairs enter each loss.
"""

# What no setting shows: deliberate differences of the implementation, each with its reason.
NOT_SETTINGS = """
## Differences that are not settings

- Colour jitter is one linear colour twist in a fixed order with the contrast centred at
  mid-grey (DALI's definition), where torchvision's ColorJitter applies its four factors in a
  random order and centres contrast on the image mean; crop boxes are continuous
  (torchvision rounds them to pixels). Both backends (DALI, portable) share the draw
  (selfsup/data/recipes.py).
- MoCo v1/v2 shuffle BN needs several processes; on one it is emulated by per-group BN
  statistics over groups of >= 32 samples (selfsup/ssl/moco.py).
- SyncBatchNorm exists only on CUDA: on gloo/CPU each rank normalizes its own batch.
- Distributed SimCLR scores each rank's anchors against the gathered keys in plain torch (the
  fused kernel has no self-mask at an offset); one process uses the fused kernel.
- The ViT trunc-normal init (DINO) cuts at +-2 as the official code (in effect a normal);
  the DINO head's linears and learned position tables cut at +-2 std.
"""


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def _range(r) -> str:
    return f"{r[0]:g}-{r[1]:g}"


def aug_value(recipe, what: str) -> str:
    views = recipe.views
    if what == "scale":
        return _range(views[0].scale)
    if what == "local_scale":
        return _range(views[2].scale) if len(views) > 2 else "-"
    if what == "jitter":
        return fmt(views[0].jitter)
    if what in ("blur_p", "solarize_p"):
        return " / ".join(fmt(getattr(v, what)) for v in views[:2]) if len(views) > 1 \
            else fmt(getattr(views[0], what))
    return fmt(getattr(views[0], what))


def preset_values(method: str, arch: str) -> dict:
    from .data.recipes import get_recipe
    from .engine.config import resolve
    from .engine.trainer import method_class, recipe_name

    cls = method_class(method)
    cfg = resolve({"method": method, "arch": arch}, cls.preset)
    vals = {k: (NONE_MEANS.get(k, "-") if v is None else v) for k, v in cfg.to_dict().items()}
    vals["sync_bn"] = cls.sync_bn
    kwargs = cls.recipe_kwargs(cfg) if hasattr(cls, "recipe_kwargs") else {}
    recipe = get_recipe(recipe_name(cfg, cls), 224, 3, interp=cfg.interp, **kwargs)
    vals["aug"] = recipe
    return vals


def render() -> str:
    out = ["# Recipes: the presets beside the papers",
           "",
           "Generated by `python -m selfsup.recipes_doc` from the presets (do not edit by "
           "hand; a test checks this file equals the script's output). \"preset\" is what "
           "train.py runs with only `--method M --arch A`, at 224 px; \"paper\" "
           "the paper's ImageNet setting; \"official\" the official code where it differs from "
           "the paper. A row marked **differs** is one where the preset is not the official "
           "value (the paper's where the official code agrees).",
           "",
           "```bash",
           "python -m selfsup.recipes_doc          # rewrite this file from the presets",
           "python -m selfsup.recipes_doc --check  # exit 1 when it is out of date",
           "```",
           "",
           "Flags to change each setting are the Config fields (`python train.py --help`); the "
           "augmentation recipe of any method can be chosen with `--aug`. The quality rows of "
           "bench/quality.py pin the pre-issue-25 behaviour with explicit flags (its `PIN`).",
           ""]
    for method, arch, title, rows in METHODS:
        vals = preset_values(method, arch)
        out += [f"## {title}", "", f"`--method {method} --arch {arch}`", "",
                "| setting | preset | paper | official | note |",
                "|---|---|---|---|---|"]
        for label, key, paper, official, note in rows:
            if key.startswith("aug:"):
                mine = aug_value(vals["aug"], key[4:])
            else:
                mine = fmt(vals[key])
            target = fmt(official if official is not None else paper)
            mark = "" if mine == target else " **differs**"
            out.append(f"| {label} | {mine}{mark} | {fmt(paper)} | "
                       f"{'' if official is None else fmt(official)} | {note} |")
        out.append("")
    return "\n".join(out) + FLAGS + NOT_SETTINGS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write docs/recipes.md from the presets")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    a = p.parse_args(argv)
    text = render()
    if a.check:
        same = DOC.is_file() and DOC.read_text() == text
        print("docs/recipes.md is up to date" if same else
              "docs/recipes.md differs from the presets: run python -m selfsup.recipes_doc")
        return 0 if same else 1
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
