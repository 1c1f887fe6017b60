"""--init-from PATH: start a run from local backbone weights, heads fresh.

    train.py --method dino --arch vit_s14 --init-from dinov2_vits14.pth --init-warmup-steps 500

The file is safetensors or a torch state_dict (read with weights_only=True: no code runs),
and its keys may be in any of three layouts, mapped onto ours before loading:

- our export (`python -m selfsup.export`) and timm: our names already (timm's ViT names,
  `reg_token`, `blocks.N.ls{1,2}.gamma`; torchvision's for a ResNet);
- DINOv2's: `register_tokens` -> `reg_token`, chunked blocks `blocks.C.N.*` -> `blocks.N.*`,
  and `mask_token` (1, D) -> (1, 1, D).

`mask_token` (iBOT's masked-patch embedding, a pre-training parameter) is optional both ways:
loaded into a model built with one (ibot, dinov2), dropped for a model without, and a file
without one (our export, timm) leaves the model's fresh token as it is.

A leading `module.` / `_orig_mod.` (DDP, torch.compile) and a `backbone.` / `encoder.` prefix
on every key are stripped; classifier keys (`head.*`, `fc.*`, `fc_norm.*`) are dropped; a ViT
`pos_embed` of another grid is resized bicubically. Anything else that does not match is an
error listing the keys: a silently half-loaded backbone would train, just worse.

Every backbone of the method gets the weights: the student and its teacher / momentum /
target copy (`t_backbone`, `key_backbone`, `m_backbone`, ...), so the EMA starts where the
student does. Heads keep their fresh init. With --init-warmup-steps N the student backbone
is frozen for the first N optimizer steps (its gradients are dropped, as DINO's last layer
is in epoch 1: the trainer's `freeze_steps` group key), so the fresh heads settle before
they push gradients through a good backbone.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..models import ResNet, VisionTransformer, load_backbone_state_dict

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OWNER_PREFIXES = ("backbone.", "encoder.")
_CLASSIFIER_PREFIXES = ("head.", "fc.", "fc_norm.", "head_drop.")
_OPTIONAL = "mask_token"  # DINOv2 / iBOT: the masked-patch token (module doc)
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\.)")  # DINOv2's BlockChunk: blocks.C.N.


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a safetensors or torch file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--init-from: no such file {str(path)!r}")
    from ..export import load_exported  # selfsup.export imports the engine: import late

    sd = load_exported(path)
    if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model"):  # a wrapped state_dict
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"--init-from: {path} holds no flat tensor state_dict "
                         f"(got {type(sd).__name__})")
    return sd


def to_our_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an export / timm / DINOv2 key layout onto ours (module doc)."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    for prefix in _OWNER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    mapped = {}
    for k, v in out.items():
        if k.startswith(_CLASSIFIER_PREFIXES):
            continue
        if k == "register_tokens":
            k = "reg_token"
        if k == _OPTIONAL and v.dim() == 2:  # DINOv2 keeps it as (1, D)
            v = v.unsqueeze(0)
        mapped[_CHUNKED.sub(r"blocks.\1", k)] = v
    return mapped


def _listing(keys: list[str], n: int = 12) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "file") -> None:
    """Load a mapped state_dict into one backbone; ValueError naming mismatched keys."""
    own = model.state_dict()
    sd = dict(sd)
    if _OPTIONAL not in own:
        sd.pop(_OPTIONAL, None)
    elif _OPTIONAL not in sd:  # the file has none: the model keeps its fresh token
        sd[_OPTIONAL] = own[_OPTIONAL]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = ([f"missing from the file: {_listing(missing)}"] if missing else []) + \
            ([f"unexpected in the file: {_listing(unexpected)}"] if unexpected else [])
        hint = ""
        if "reg_token" in missing or "reg_token" in unexpected:
            hint = " (match --registers to the file's register count)"
        elif any(".ls1." in k for k in missing + unexpected):
            hint = " (LayerScale keys: set or drop --layer-scale to match the file)"
        raise ValueError(f"--init-from {source}: backbone keys do not match: "
                         f"{'; '.join(parts)}{hint}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k != "pos_embed" and sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"--init-from {source}: tensor shapes differ (file vs model): "
                         f"{_listing(bad, 6)}")
    load_backbone_state_dict(model, sd, strict=True)  # resizes pos_embed to the model's grid


def backbones(method: nn.Module) -> dict[str, nn.Module]:
    """The method's backbone submodules (student and teacher copies), by attribute name."""
    return {n: m for n, m in method.named_children() if isinstance(m, (VisionTransformer, ResNet))}


def apply_init_from(method: nn.Module, cfg) -> dict | None:
    """--init-from / --init-warmup-steps: load every backbone, then (warm-up) freeze the
    student backbone's optimizer groups for N steps. Call before the optimizer is built."""
    path = getattr(cfg, "init_from", None)
    warmup = getattr(cfg, "init_warmup_steps", 0) or 0
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"--init-warmup-steps must be an int >= 0, got {warmup!r}")
    if path is None:
        if warmup:
            raise ValueError("--init-warmup-steps needs --init-from (nothing to keep frozen)")
        return None
    sd = to_our_names(read_state_dict(path))
    nets = backbones(method)
    if not nets:
        raise ValueError(f"--init-from: --method {cfg.method} has no backbone to load into")
    for net in nets.values():
        load_backbone(net, sd, source=str(path))
    if warmup:
        freeze_backbone_groups(method, warmup)
    return {"path": str(path), "backbones": sorted(nets), "tensors": len(sd),
            "warmup_steps": warmup}


def freeze_backbone_groups(method: nn.Module, steps: int) -> None:
    """Make method.param_groups(cfg) put the trained backbone's parameters in groups of
    their own with `freeze_steps` >= steps (the trainer drops their gradients until then).
    An instance attribute wrapping the method's own param_groups: each method's grouping
    (weight decay, DINO's last layer, lr scales) is kept, only split further."""
    frozen = {id(p) for p in method.trained_encoder().parameters()}
    inner = method.param_groups

    def param_groups(cfg) -> list[dict]:
        out = []
        for g in inner(cfg):
            params = list(g["params"])
            mine = [p for p in params if id(p) in frozen]
            rest = [p for p in params if id(p) not in frozen]
            if rest:
                out.append({**g, "params": rest})
            if mine:
                out.append({**g, "params": mine,
                            "freeze_steps": max(steps, g.get("freeze_steps", 0))})
        return out

    method.param_groups = param_groups
