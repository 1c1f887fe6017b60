"""Block-wise masking of patch grids (BEiT, Bao et al. 2022; iBOT; DINOv2), drawn on the host.

Per image: with probability `probability` it is masked at all; its ratio r ~ U[lo, hi] sets the
target n = round(r·N) of the N = H·W patches. Rectangles are thrown until n is reached:

    area  ~ U[min_block, min(max_block, n - masked)]     (patches; BEiT min_num_patches = 4)
    log(aspect) ~ U[log 0.3, log 1/0.3]                  h = round(sqrt(area·aspect)), w = ...
    a rectangle is kept if it fits the grid, covers >= min_block patches and adds 1..(n - masked)
    new ones (overlaps allowed); 10 failed throws in a row end the block phase

and the remainder (fewer than min_block left, or no rectangle fits) is topped up with random
unmasked patches, so every masked image has exactly n masked patches (iBOT stops short instead,
DINOv2 tops up; an exact count keeps the per-image loss weights what the ratio says).

The result is a (n_images, H·W) bool CPU tensor (True = masked, row-major patch order as the
patch embedding emits them), so nothing here touches the accelerator: the method moves it with
non_blocking and gathers the masked rows without a device->host sync.

Randomness is a `random.Random` seeded from a string of integers (`mask_rng(seed, rank, step,
micro)`): the masks of a step depend only on the run's seed, the rank, the optimizer step and
the micro-batch, so a resumed run draws the masks the uninterrupted run would have, with no
state to checkpoint. (Python's Random, not a torch.Generator: the loop draws a few scalars per
rectangle, ~0.1 us each in Python against ~5 us per torch call.)
"""

from __future__ import annotations

import math
import random

import torch


def mask_rng(*key: int) -> random.Random:
    """A Random determined by the integers in `key` (e.g. seed, rank, step, micro-batch)."""
    return random.Random(":".join(str(int(k)) for k in key))  # str seeds hash with sha512


def draw_blocks(h: int, w: int, n: int, rng: random.Random, *, min_block: int = 4,
                max_block: int | None = None, aspect: tuple[float, float] = (0.3, 1 / 0.3),
                tries: int = 10) -> tuple[list[bool], list[tuple[int, int, int, int]]]:
    """Rectangles on an h x w grid until n patches are masked or none fits: (flat mask of
    h·w bools, [(top, left, height, width)] of the rectangles kept). Never exceeds n."""
    mask = [False] * (h * w)
    rects: list[tuple[int, int, int, int]] = []
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    count = 0
    while n - count >= min_block:
        cap = n - count if max_block is None else min(max_block, n - count)
        if cap < min_block:
            break
        for _ in range(tries):
            area = rng.uniform(min_block, cap)
            ar = math.exp(rng.uniform(log_lo, log_hi))
            bh, bw = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if bh * bw < min_block or bh > h or bw > w:
                continue
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            new = [r * w + c for r in range(top, top + bh) for c in range(left, left + bw)
                   if not mask[r * w + c]]
            if 0 < len(new) <= n - count:
                for i in new:
                    mask[i] = True
                count += len(new)
                rects.append((top, left, bh, bw))
                break
        else:  # `tries` throws in a row added nothing: the grid is too full for blocks
            break
    return mask, rects


def block_mask(h: int, w: int, n: int, rng: random.Random, **kw) -> list[bool]:
    """Exactly n of h·w patches masked: draw_blocks, then a random top-up (module doc)."""
    if not 0 <= n <= h * w:
        raise ValueError(f"n must be in [0, {h * w}] masked patches, got {n}")
    mask, _ = draw_blocks(h, w, n, rng, **kw)
    short = n - sum(mask)
    if short:
        free = [i for i, m in enumerate(mask) if not m]
        for i in rng.sample(free, short):
            mask[i] = True
    return mask


class BlockMasking:
    """masks(n_images, rng) -> (n_images, H·W) bool CPU tensor (module doc).

    Args:
        grid: (H, W) patch grid of the masked crops.
        ratio: (lo, hi) range of the per-image mask ratio (iBOT / DINOv2: 0.1, 0.5).
        probability: the chance an image is masked at all (iBOT's pred_ratio 0 / 0.3 pick:
            0.5; DINOv2's mask_sample_probability 0.5). The others get an all-False row.
        stratified: DINOv2's draw, exactly int(n_images · probability) masked images with
            ratios spread over [lo, hi] (one per linspace bin), in a shuffled order; False
            (iBOT): each image independently.
        min_block, max_block, aspect: the rectangles (BEiT: 4, None = what is left, 0.3..1/0.3).
    """

    def __init__(self, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5), *,
                 probability: float = 0.5, stratified: bool = False, min_block: int = 4,
                 max_block: int | None = None,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> None:
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1:
            raise ValueError(f"grid must be two sizes >= 1, got {tuple(grid)}")
        lo, hi = (float(r) for r in ratio)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"ratio must be 0 <= MIN <= MAX <= 1 (--mask-ratio-range), "
                             f"got {lo} {hi}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1] (--mask-probability), "
                             f"got {probability}")
        if min_block < 1 or (max_block is not None and max_block < min_block):
            raise ValueError(f"min_block must be >= 1 and max_block None or >= min_block, "
                             f"got {min_block}, {max_block}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be 0 < MIN <= MAX, got {aspect}")
        self.grid, self.ratio, self.probability = (h, w), (lo, hi), float(probability)
        self.stratified = stratified
        self.block_kw = dict(min_block=min_block, max_block=max_block, aspect=tuple(aspect))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def ratios(self, n_images: int, rng: random.Random) -> list[float]:
        """Per image the mask ratio, 0.0 for an image left unmasked."""
        lo, hi = self.ratio
        if not self.stratified:
            return [rng.uniform(lo, hi) if rng.random() < self.probability else 0.0
                    for _ in range(n_images)]
        k = int(n_images * self.probability)
        edges = [lo + (hi - lo) * i / k for i in range(k + 1)] if k else []
        out = [rng.uniform(edges[i], edges[i + 1]) for i in range(k)] + [0.0] * (n_images - k)
        rng.shuffle(out)
        return out

    def __call__(self, n_images: int, rng: random.Random) -> torch.Tensor:
        h, w = self.grid
        rows = [block_mask(h, w, round(r * h * w), rng, **self.block_kw) if r > 0
                else [False] * (h * w) for r in self.ratios(n_images, rng)]
        return torch.tensor(rows, dtype=torch.bool).reshape(n_images, h * w)
