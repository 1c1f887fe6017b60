"""SSL heads: projection / prediction MLPs, the DINO head, the MAE decoder.

- `MLP`: Linear [-> BN] -> ReLU for every hidden layer, then Linear [-> BN]. A Linear that feeds
  a BN has no bias (the BN's shift makes it redundant). Covers MoCo v1 (1 layer) / v2 (2, no
  BN), SimSiam's projector (3, BN, last BN without affine) and predictor, MoCo v3, BYOL, SimCLR.
- `DINOHead` (Caron et al. 2021): 3-layer GELU MLP -> 256 bottleneck -> L2-normalize ->
  weight-normalized linear (no bias) to K outputs. The weight norm is written out (`weight_g`,
  `weight_v`, as in DINO's checkpoints) rather than a torch hook or parametrization, so deep
  copies, EMA over `parameters()` and FSDP see two plain parameters in a fixed order.
- `MAEDecoder` (He et al. 2022): embed to the decoder width, put the mask token at the removed
  positions and unshuffle (`selfsup.kernels.scatter_tokens`), add the fixed sin-cos table, run
  transformer blocks, predict p·p·C pixels per patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import scatter_tokens
from .vit import Block, init_transformer_, sincos_pos_embed


class MLP(nn.Sequential):
    """num_layers Linear layers; hidden width `hidden_dim`. (B, in_dim) -> (B, out_dim).

    Args:
        bn: BatchNorm1d after every hidden Linear.
        last_bn: BatchNorm1d after the last Linear too (SimSiam, MoCo v3).
        last_bn_affine: whether that last BN learns a scale and shift (SimSiam: False).
        bias: whether a Linear that feeds no BN has a bias (MoCo v3's MLPs have none).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, *,
                 bn: bool = True, last_bn: bool = False, last_bn_affine: bool = True,
                 bias: bool = True) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=bias and not bn))
            if bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=bias and not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


class WeightNormLinear(nn.Module):
    """y = x Wᵀ with W = g · v / ||v|| per output row (Salimans & Kingma 2016); no bias.

    weight_g (out, 1), weight_v (out, in): the names and shapes of torch's weight_norm(dim=0),
    so DINO checkpoints load as they are.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_dim, out_dim
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02, a=-0.04, b=0.04)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """(B, in_dim) -> (B, out_dim) logits (before DINO's temperature)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = True,
                 use_bn: bool = False) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers += [nn.Linear(dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers) if nlayers > 1 else layers[0]
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # norm_last_layer: rows stay unit-norm, which DINO found stabilizes training
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck) on the unit sphere
        return self.last_layer(x)


class MAEDecoder(nn.Module):
    """forward(latent (B, 1+L_keep, enc_dim), ids_restore (B, L)) -> pred (B, L, patch_dim).

    Args:
        num_patches: L of the encoder grid; grid_size (gh, gw) defaults to a square one.
        patch_dim: p·p·C, the pixels predicted per patch.
        dec_dim, depth, heads, mlp_ratio: the decoder transformer (MAE: 512, 8, 16, 4).
    """

    def __init__(self, num_patches: int, patch_dim: int, enc_dim: int, *, dec_dim: int = 512,
                 depth: int = 8, heads: int = 16, grid_size: tuple[int, int] | None = None,
                 mlp_ratio: float = 4.0, attn: str | None = None) -> None:
        super().__init__()
        if grid_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"num_patches {num_patches} is not a square; pass grid_size")
            grid_size = (side, side)
        grid_size = tuple(grid_size)
        if grid_size[0] * grid_size[1] != num_patches:
            raise ValueError(f"grid_size {grid_size} does not hold num_patches {num_patches}")
        self.num_patches, self.grid_size = num_patches, grid_size
        self.grad_checkpointing = False
        self.decoder_embed = nn.Linear(enc_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dec_dim, grid_size))
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, heads, mlp_ratio, attn=attn)
                                            for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch_dim)
        self.apply(init_transformer_)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        if ids_restore.dim() != 2 or ids_restore.shape[1] != self.num_patches:
            raise ValueError(f"ids_restore must be (B, {self.num_patches}), "
                             f"got {tuple(ids_restore.shape)}")
        x = self.decoder_embed(latent)  # (B, 1+L_keep, dec_dim)
        # (B, 1+L, dec_dim): visible tokens back in place, mask token elsewhere, + pos
        x = scatter_tokens(x, ids_restore, self.mask_token, self.decoder_pos_embed, n_prefix=1)
        for blk in self.decoder_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop the cls row
