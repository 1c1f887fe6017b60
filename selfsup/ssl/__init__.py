"""Self-supervised methods, one file each, listed in METHODS (name -> class).

Every class follows the contract in common.py (ARCHITECTURE.md): ``recipe``, ``preset(arch)``,
``forward(views) -> {"loss", **logs}``, ``param_groups(cfg)``, ``on_step_end(step, total)``,
``encoder()``. The trainer never branches on the method's name.

Never run a file of this folder as a script: that would put the folder on sys.path and shadow
the standard library's `ssl`.
"""

from .barlowtwins import BarlowTwins
from .byol import BYOL
from .dino import DINO
from .dinov2 import DINOv2
from .ibot import IBOT
from .mae import MAE
from .moco import MoCo, MoCoV1
from .mocov3 import MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV
from .vicreg import VICReg

METHODS = {
    "mocov1": MoCoV1,
    "mocov2": MoCo,
    "mocov3": MoCoV3,
    "simsiam": SimSiam,
    "byol": BYOL,
    "simclr": SimCLR,
    "dino": DINO,
    "ibot": IBOT,
    "dinov2": DINOv2,
    "mae": MAE,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
    "swav": SwAV,
}

__all__ = ["METHODS", "BarlowTwins", "BYOL", "DINO", "DINOv2", "IBOT", "MAE", "MoCo", "MoCoV1",
           "MoCoV3", "SimCLR", "SimSiam", "SwAV", "VICReg"]
