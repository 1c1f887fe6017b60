"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint never runs code when loaded: it holds only tensors, numbers, strings, lists and
dicts. Contents: model (the method's state_dict: backbone, heads, EMA encoders, queue, center,
step), optimizer, scaler, step, epoch, config, and RNG states (torch, CUDA, numpy, python).
Every tool that reads checkpoints (resume, eval, visualize, export) goes through `load`.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not ours."""


def save(obj: dict, path: str | Path) -> Path:
    """Write `obj` to `path` atomically: a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder containing checkpoint.pt."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely. Raises CheckpointError with the path on any problem."""
    p = resolve_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, garbage bytes, ...
        raise CheckpointError(f"cannot load checkpoint {p}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{p} is not a selfsup checkpoint (no 'model'/'config' entries)")
    return ckpt


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every RNG the run draws from, as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_method(path: str | Path, *, random_init: bool = False,
                device: str | torch.device = "cpu"):
    """(method in eval mode, Config, raw checkpoint) for the tools that read runs.

    `random_init` builds the same method and architecture (same seed) without loading the
    trained weights: the baseline every evaluation should report next to the trained model.
    """
    from ..ssl import METHODS
    from .config import Config

    state = load(path)
    cfg = Config.from_dict(state["config"])
    if cfg.method not in METHODS:
        raise CheckpointError(f"{resolve_path(path)} names unknown method {cfg.method!r}")
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method](cfg)
    if not random_init:
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{resolve_path(path)} does not match its own config "
                                  f"({cfg.method}, {cfg.arch}): {str(e).splitlines()[0]}"
                                  ) from None
    return method.to(device).eval(), cfg, state
