"""Vision Transformer (Dosovitskiy et al. 2021) with timm's module and state_dict names.

    image (B, C, H, W) -> patch_embed.proj (p x p conv, stride p) -> tokens (B, L, D),
    L = (H/p)(W/p) -> prepend cls_token -> + pos_embed (1, 1+L, D) -> blocks -> norm
    Block: x += attn(norm1(x)); x += mlp(norm2(x))   (pre-norm, LayerNorm eps 1e-6, GELU, r 4)

Names follow timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), so weights move both ways with no key
mapping. The configs are one table, `ARCHS` (gpt-fast's `transformer_configs` shape);
`VisionTransformer.from_name("vit_b", patch_size=8)` builds one.

Position embeddings: fixed 2D sin-cos (MAE, MoCo v3), kept as a buffer so it is still in the
state_dict, or learned (DINO). An image whose patch grid differs from the built one (DINO's
local crops) gets the sin-cos table recomputed exactly for its grid, or the learned table
resized bicubically (cls row kept).

DINOv2 options. Token layout inside the blocks, R = `registers` (Darcet et al. 2023):

    [cls | reg_0 .. reg_{R-1} | patch_0 .. patch_{L-1}]     (B, 1 + R + L, D)

pos_embed stays (1, 1 + L, D): the cls row and the patch rows; registers carry no position
(they are position-free scratch tokens). Registers are dropped again after the final norm, so
forward_features / get_last_selfattention hand every consumer (MAE's decoder, DINO's cls, the
probe pooling, the attention pictures) the register-free [cls | patches] layout it had
before; `keep_registers=True` asks for them. `layer_scale=v` (CaiT, Touvron et al. 2021)
multiplies each residual branch by a learned per-channel gamma initialised to v before it is
added: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))). timm/DINOv2 names: `reg_token`
(1, R, D), `blocks.N.ls1.gamma`, `blocks.N.ls2.gamma`; with the defaults (0, None) neither
exists and the model is today's, bit for bit.

iBOT / DINOv2 masked image modelling: built with `mask_token=True` the model has a learned
`mask_token` (1, 1, D) (zeros at init, as iBOT's and DINOv2's), and forward_features(x,
mask=M) with M (B, L) bool (True = masked) puts it in place of the masked patch embeddings
BEFORE the position embedding is added, so a masked token still knows where it is (iBOT's
order). Without the flag there is no such key, and mask=None is today's path, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import gather_tokens
from .attention import attention, attention_map, check_backend


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# Head-less parameter counts at 224 px (timm adds D·1000 + 1000 for its ImageNet head).
ARCHS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(16, 192, 12, 3),  # 5.5M
    "vit_small": ViTConfig(16, 384, 12, 6),  # 21.7M
    "vit_base": ViTConfig(16, 768, 12, 12),  # 85.8M
    "vit_large": ViTConfig(16, 1024, 24, 16),  # 303.3M
    "vit_huge": ViTConfig(14, 1280, 32, 16),  # 630.8M (MAE's ViT-H/14)
    # DINOv2's patch-14 family (Oquab et al. 2023, Table 17). ViT-g here has a plain GELU MLP
    # of ratio 4; DINOv2's released g uses SwiGLU, whose weights therefore do not load.
    "vit_small14": ViTConfig(14, 384, 12, 6),
    "vit_base14": ViTConfig(14, 768, 12, 12),
    "vit_large14": ViTConfig(14, 1024, 24, 16),
    "vit_giant14": ViTConfig(14, 1536, 40, 24),
}
ALIASES = {"vit_t": "vit_tiny", "vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large",
           "vit_h": "vit_huge", "vit_s14": "vit_small14", "vit_b14": "vit_base14",
           "vit_l14": "vit_large14", "vit_g14": "vit_giant14"}
POS_EMBEDS = ("sincos", "learned")
INITS = ("xavier", "trunc_normal")


# ----------------------------------------------------------------------------- position tables
def sincos_pos_embed(dim: int, grid: tuple[int, int], *, cls_token: bool = True,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos table (1, [1+] gh·gw, dim); the cls row is zeros.

    Token r·gw + c (row-major, as the patches come out of the conv) gets
    [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)] with ω_i = 10000^(-i / (dim/4)), i < dim/4:
    the layout MAE and MoCo v3 use. Computed in float64, then cast.
    """
    if dim % 4:
        raise ValueError(f"embed dim must be a multiple of 4 for 2D sin-cos, got {dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                                torch.arange(gw, dtype=torch.float64, device=device),
                                indexing="ij")
    c = cols.reshape(-1, 1) * omega  # (L, dim/4)
    r = rows.reshape(-1, 1) * omega
    table = torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1)  # (L, dim)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table])
    return table.unsqueeze(0).to(dtype)


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int],
                     new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a learned (1, 1+gh·gw, D) table to another grid; the cls row is kept."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, *old_grid, d).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) with one p x p, stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"images must be (B, C, H, W) with H and W multiples of the patch "
                             f"size {self.patch_size}, got shape {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 backend: str | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} must be a multiple of num_heads {num_heads}")
        self.num_heads, self.backend = num_heads, check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qkv.packed_maps = 3  # q | k | v: read by init_transformer_
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return self.proj(attention(self.qkv(x), self.num_heads, self.backend))

    def weights(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, N)
        return attention_map(self.qkv(x), self.num_heads)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's whole residual branch with probability p (training)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)  # rescaled so the expectation is unchanged


class LayerScale(nn.Module):
    """x * gamma, a learned per-channel scale of a residual branch (CaiT). Starting it small
    makes each block near-identity at init, which is what lets deep ViTs train stably."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block. The class name is what FSDP wrapping looks for."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qkv_bias: bool = True, drop_path: float = 0.0, attn: str | None = None,
                 layer_scale: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn)
        # Identity when off: no extra keys, no extra op, so the default block is unchanged
        self.ls1 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity() if layer_scale is None else LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def init_transformer_(module: nn.Module) -> None:
    """MAE/timm-style init, applied with `module.apply`: xavier-uniform linears, zero biases,
    LayerNorm 1/0. The packed qkv weight (3D, D) is three D x D maps (MoCo v3 initializes it
    so), so its xavier bound uses fan_out D, not 3D."""
    if isinstance(module, nn.Linear):
        fan_out = module.out_features // getattr(module, "packed_maps", 1)
        bound = math.sqrt(6.0 / (module.in_features + fan_out))
        nn.init.uniform_(module.weight, -bound, bound)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_trunc_normal_(module: nn.Module) -> None:
    """DINO/timm-style init, applied with `module.apply`: linears trunc-normal std 0.02, zero
    biases, LayerNorm 1/0. The cut is DINO's: at +-2 absolute (100 std), so in effect a
    plain normal."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- the model
class VisionTransformer(nn.Module):
    """ViT backbone without a classification head; forward(x) -> the normed cls token (B, D).

    Args:
        img_size: the size built for (int or (H, W)); other sizes work (pos interpolated).
        patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the architecture.
        pos_embed: "sincos" (fixed buffer) or "learned" (trunc-normal 0.02 parameter).
        frozen_patch_embed: MoCo v3's trick, the patch projection stays at its random init.
        attn: attention backend, "auto" | "xformers" | "sdpa" | "math" | None.
        drop_path: stochastic-depth rate of the last block (linear from 0 over depth).
        init: "xavier" (MAE / MoCo v3: xavier-uniform linears, the packed qkv as three maps,
            the patch projection as a linear map) or "trunc_normal" (DINO: linears
            trunc-normal std 0.02, the patch projection keeps torch's Conv2d default).
        registers: R register tokens after the cls token (module doc: token layout).
        layer_scale: LayerScale init value on both residual branches, or None (off).
        mask_token: a learned `mask_token` for forward_features(mask=) (module doc: iBOT).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, *, qkv_bias: bool = True, pos_embed: str = "sincos",
                 frozen_patch_embed: bool = False, attn: str | None = None,
                 drop_path: float = 0.0, init: str = "xavier", registers: int = 0,
                 layer_scale: float | None = None, mask_token: bool = False) -> None:
        super().__init__()
        if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
            raise ValueError(f"registers must be an int >= 0, got {registers!r}")
        if layer_scale is not None and not (isinstance(layer_scale, (int, float))
                                            and 0 < layer_scale < float("inf")):
            raise ValueError(f"layer_scale must be a positive float or None, got {layer_scale!r}")
        self.num_registers, self.layer_scale = registers, layer_scale
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.patch_size, self.embed_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.feature_dim = embed_dim
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = False
        # What forward() returns, as timm's `global_pool`: "token" (the cls token) or "avg"
        # (mean of the patch tokens, after the final norm).
        self.global_pool = "token"
        self._pos_cache: dict[tuple, torch.Tensor] = {}  # sin-cos tables of other grids

        device = torch.get_default_device()  # honors a `with torch.device(...)` around us
        # Build on meta, then allocate once and run our init once: torch's default init
        # followed by ours would write ViT-H's 630M weights twice (seconds of CPU each).
        with torch.device("meta"):
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            if registers:  # timm's name; absent when 0 so the state_dict is today's
                self.reg_token = nn.Parameter(torch.zeros(1, registers, embed_dim))
            if mask_token:  # DINOv2's name; absent otherwise so exports keep timm's keys
                self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            if pos_embed == "sincos":
                self.register_buffer("pos_embed", torch.zeros(1, 1 + self.num_patches, embed_dim))
            else:
                self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
            rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                              drop_path=r, attn=attn,
                                              layer_scale=layer_scale) for r in rates)
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.to_empty(device=device)
        self._init_weights()  # every parameter and buffer is written here
        if frozen_patch_embed:
            self.patch_embed.requires_grad_(False)

    @classmethod
    def from_name(cls, name: str, **kw) -> VisionTransformer:
        cfg = ARCHS[ALIASES.get(name, name)]
        kw.setdefault("patch_size", cfg.patch_size)
        return cls(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                   mlp_ratio=cfg.mlp_ratio, **kw)

    def _init_weights(self) -> None:
        if self.init == "trunc_normal":  # DINO: Linear and LayerNorm re-initialized only
            self.apply(init_trunc_normal_)
            self.patch_embed.proj.reset_parameters()
            nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
            cut = 2.0
        else:
            self.apply(init_transformer_)
            # the patch projection is a linear map of the flattened p x p x C patch
            w = self.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.proj.bias)
            nn.init.normal_(self.cls_token, std=0.02)
            cut = 0.04
        if self.num_registers:  # as the cls token: both are learned, position-free tokens
            nn.init.trunc_normal_(self.reg_token, std=0.02, a=-cut, b=cut)
        if self.has_mask_token:  # zeros, as iBOT's masked_embed and DINOv2's mask_token
            nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_value)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-cut, b=cut)
        else:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.grid_size,
                                                      device=self.pos_embed.device))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_backend(self, name: str | None) -> None:
        for blk in self.blocks:
            blk.attn.backend = check_backend(name)

    # ------------------------------------------------------------------------- pieces
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, 1+gh·gw, D) table for a patch grid (the built one is the stored table)."""
        grid = tuple(grid)
        if grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_type == "learned":  # differentiable, so never cached
            return resize_pos_embed(self.pos_embed, self.grid_size, grid)
        key = (grid, self.pos_embed.device, self.pos_embed.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_pos_embed(self.embed_dim, grid, device=key[1],
                                                    dtype=key[2])
        return self._pos_cache[key]

    @property
    def has_mask_token(self) -> bool:
        return "mask_token" in self._parameters

    def _mask_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) patch embeddings -> the mask token where mask (B, L) is True."""
        if not self.has_mask_token:
            raise ValueError("mask needs a model built with mask_token=True")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"mask must be a (B, L) = {tuple(tokens.shape[:2])} bool tensor, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        # a host mask (drawn on the CPU) is copied without waiting for the device
        mask = mask.to(tokens.device, non_blocking=True).unsqueeze(-1)
        return torch.where(mask, self.mask_token.to(tokens.dtype), tokens)

    def _tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens + pos, optionally only `ids_keep` or with the `mask`ed ones replaced
        by the mask token, with the cls token (and the registers, never masked) in front:
        (B, 1 + R + L or L_keep, D)."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)  # (B, L, D)
        if mask is not None:
            if ids_keep is not None:
                raise ValueError("pass ids_keep (MAE: drop tokens) or mask (iBOT), not both")
            tokens = self._mask_tokens(tokens, mask)  # before pos: iBOT's order
        pos = self.pos_embed_for(grid)
        if ids_keep is None:
            tokens = tokens + pos[:, 1:]
        else:  # MAE: add pos to all L, keep (B, L_keep) rows, in one fused op
            if ids_keep.dim() != 2 or ids_keep.shape[0] != tokens.shape[0]:
                raise ValueError(f"ids_keep must be (B={tokens.shape[0]}, L_keep), "
                                 f"got shape {tuple(ids_keep.shape)}")
            tokens = gather_tokens(tokens, ids_keep, pos[:, 1:])
        cls = (self.cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
        if self.num_registers:
            regs = self.reg_token.expand(tokens.shape[0], -1, -1)
            return torch.cat([cls, regs, tokens], dim=1)
        return torch.cat([cls, tokens], dim=1)

    def drop_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + R + n, D) -> (B, 1 + n, D): [cls | patches], what consumers read."""
        if not self.num_registers:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, 1 + self.num_registers:]], dim=1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1+R+L, D): patch embed + cls [+ registers] + pos, before the
        blocks (callers running blocks themselves drop the registers with drop_registers)."""
        return self._tokens(x)

    def _run_blocks(self, x: torch.Tensor, blocks) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)  # recompute in backward
            else:
                x = blk(x)
        return x

    # ------------------------------------------------------------------------- API
    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, *,
                         keep_registers: bool = False,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [, ids_keep (B, L_keep)] -> (B, 1 + L or 1 + L_keep, D) after norm;
        with keep_registers the R register rows stay, after the cls row. mask (B, L) bool
        (CPU or device): those patches enter as the mask token (module doc: iBOT)."""
        out = self.norm(self._run_blocks(self._tokens(x, ids_keep, mask), self.blocks))
        return out if keep_registers else self.drop_registers(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        tokens = self.forward_features(x)
        return tokens[:, 1:].mean(1) if self.global_pool == "avg" else tokens[:, 0]

    @torch.no_grad()
    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax weights of the last block: (B, heads, 1+L, 1+L), via the math backend.

        With registers, their rows and columns are cut out (the softmax ran over them, so a
        row then sums to less than 1): the map stays [cls | patches] x [cls | patches]."""
        h = self._run_blocks(self._embed(x), self.blocks[:-1])
        last = self.blocks[-1]
        w = last.attn.weights(last.norm1(h))
        if self.num_registers:
            keep = torch.cat([torch.zeros(1, dtype=torch.long, device=w.device),
                              torch.arange(1 + self.num_registers, w.shape[-1], device=w.device)])
            w = w[:, :, keep][:, :, :, keep]
        return w
