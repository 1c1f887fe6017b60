"""Multi-process training: DDP or FSDP2 around the method, and full state dicts.

    torchrun --nproc_per_node 8 train.py --method dino --arch vit_s ...
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint HOST:29500 train.py ... [--fsdp]

- Before wrapping, every parameter and buffer is broadcast from rank 0, so all ranks start
  from one state: the same weights (ranks seed with seed + rank) and, since DDP never
  broadcasts buffers here, the same random MoCo queue (the official code's buffers are
  broadcast by DDP once at construction).
- DDP by default. Methods with ``sync_bn = True`` (SimSiam, BYOL, SimCLR, MoCo v3, and DINO,
  whose ResNet student and teacher the official code converts) get SyncBatchNorm on CUDA.
  torch's SyncBatchNorm has no CPU kernel, so on gloo/CPU each rank normalizes its own batch
  (one warning says so).
- ``--fsdp``: FSDP2 ``fully_shard`` on every transformer block, then on the whole method
  (ViT-L/H). Checkpoints hold full, unsharded tensors, so they load without FSDP and at another
  world size.
- Cross-rank communication inside methods (key gathering, MoCo's real shuffle BN, the DINO
  center all-reduce) lives in selfsup.dist and the methods themselves.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import dist


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` set to rank `src`'s, in place (one broadcast
    per tensor, once at start)."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def wrap(method: nn.Module, cfg, device: torch.device) -> nn.Module:
    """The module the loop calls: DDP(method) or the FSDP2-sharded method itself."""
    broadcast_state(method)
    if getattr(method, "sync_bn", False) and has_batchnorm(method):
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            warnings.warn("SyncBatchNorm needs CUDA; on CPU each rank normalizes its own batch",
                          stacklevel=2)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for m in list(method.modules()):
            if m.__class__.__name__ == "Block":  # transformer blocks: the unit of sharding
                fully_shard(m)
        fully_shard(method)
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Buffers (queue, center, EMA encoders) are updated identically on every rank from
    # gathered data, so DDP need not broadcast them each step.
    return DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False)


def is_fsdp(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def model_state(model: nn.Module) -> dict:
    """Full (unsharded) state dict; a collective under FSDP: every rank must call it."""
    module = getattr(model, "module", model)
    if not is_fsdp(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    module = getattr(model, "module", model)
    if not is_fsdp(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(module, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_states(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict
                ) -> None:
    """Load full state dicts into a plain, DDP or FSDP2 model (any world size)."""
    module = getattr(model, "module", model)
    if not is_fsdp(module):
        module.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_sd, options=options)
    set_optimizer_state_dict(module, opt, opt_sd, options=options)
    dist.barrier()
