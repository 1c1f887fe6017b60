"""Fused kernels for self-supervised learning, importable on their own.

Each op family lives in one file and offers three paths, picked per call by
`choose_backend` (``SELFSUP_KERNELS=triton|torch|ref`` forces one):

- Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1`` for testing);
- a portable chunked torch path. The fused families (InfoNCE, DINO, iBOT, MAE, Barlow
  Twins, VICReg) run both paths inside torch custom ops (`torch.ops.selfsup.*`: fake
  implementations and registered autograd, so torch.compile traces them); KoLeo and SwAV
  are plain torch;
- a plain-torch ``*_ref`` written like the paper, the test oracle.

Works without CUDA and without triton installed.
"""

from ._registry import REGISTRY, KernelConfig, register_kernel
from ._triton import HAS_TRITON
from ._utils import BACKENDS, choose_backend
from .barlow_twins import barlow_twins_loss, barlow_twins_loss_ref
from .dino_loss import DINOLoss, dino_loss, dino_loss_ref, teacher_temp_schedule
from .ibot import ibot_patch_loss, ibot_patch_loss_ref, iBOTPatchLoss
from .info_nce import (
    MoCoQueue,
    info_nce_batch,
    info_nce_batch_ref,
    info_nce_queue,
    info_nce_queue_ref,
    nt_xent,
    nt_xent_ref,
)
from .mae import (
    gather_tokens,
    gather_tokens_ref,
    masked_patch_loss,
    masked_patch_loss_ref,
    patchify,
    random_masking,
    scatter_tokens,
    scatter_tokens_ref,
    unpatchify,
)
from .koleo import koleo_loss, koleo_loss_ref
from .swav import sinkhorn_knopp, sinkhorn_knopp_ref, swav_loss, swav_loss_ref
from .vicreg import vicreg_loss, vicreg_loss_ref

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "REGISTRY",
    "KernelConfig",
    "choose_backend",
    "register_kernel",
    # InfoNCE (MoCo v1/v2/v3, SimCLR)
    "MoCoQueue",
    "info_nce_batch",
    "info_nce_batch_ref",
    "info_nce_queue",
    "info_nce_queue_ref",
    "nt_xent",
    "nt_xent_ref",
    # Barlow Twins, VICReg
    "barlow_twins_loss",
    "barlow_twins_loss_ref",
    "vicreg_loss",
    "vicreg_loss_ref",
    # DINO
    "DINOLoss",
    "dino_loss",
    "dino_loss_ref",
    "teacher_temp_schedule",
    # MAE
    "gather_tokens",
    "gather_tokens_ref",
    "masked_patch_loss",
    "masked_patch_loss_ref",
    "patchify",
    "random_masking",
    "scatter_tokens",
    "scatter_tokens_ref",
    "unpatchify",
    # SwAV
    "sinkhorn_knopp",
    "sinkhorn_knopp_ref",
    "swav_loss",
    "swav_loss_ref",
    # DINOv2
    "iBOTPatchLoss",
    "ibot_patch_loss",
    "ibot_patch_loss_ref",
    "koleo_loss",
    "koleo_loss_ref",
]
