"""Multi-head self-attention with three interchangeable backends, chosen per call.

    out = softmax(q kᵀ / sqrt(hd)) v          q, k, v: (B, H, N, hd) — B images, H heads,
                                              N tokens, hd = D / H head width

- ``"xformers"``: `xformers.ops.memory_efficient_attention`, when xformers imports and the
  inputs are on CUDA in fp16 / bf16 / fp32. It takes the (B, N, H, hd) layout, which is what
  the packed qkv projection produces, so no transpose is needed.
- ``"sdpa"``: `torch.nn.functional.scaled_dot_product_attention` (flash / mem-efficient /
  math kernels picked by torch); runs everywhere.
- ``"math"``: the explicit formula, the only one that can return the attention weights
  (DINO's maps). It materializes the (B, H, N, N) scores.

``"auto"`` (the default) is xformers when usable, else sdpa. ``SELFSUP_ATTN=auto|xformers|sdpa|
math`` forces a backend for every call; it is read at call time so tests can flip it. A forced
backend that cannot run the inputs falls back to sdpa with a one-time warning instead of
crashing a long run. xformers is imported lazily, once, and only for CUDA inputs: on machines
without its CUDA extensions the import is slow and noisy.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")
ENV_ATTN = "SELFSUP_ATTN"
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_xformers_ops = None  # the module once imported; False when the import failed
_warned: set[str] = set()  # keys of the one-time warnings already given
_xformers_bad: set[tuple] = set()  # (dtype, head dim) signatures xformers refused at run time


def check_backend(name: str | None, what: str = "attn") -> str:
    """Normalize a backend name; ValueError naming `what` when it is not one of BACKENDS."""
    value = (name or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{what}={name!r} is not one of {BACKENDS}")
    return value


def resolve_backend(requested: str | None) -> str:
    """``SELFSUP_ATTN`` when set, else `requested` (None means auto)."""
    env = os.environ.get(ENV_ATTN, "").strip()
    return check_backend(env, ENV_ATTN) if env else check_backend(requested)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which one-time warnings were given (tests)."""
    _warned.clear()
    _xformers_bad.clear()


def _load_xformers():
    global _xformers_ops
    if _xformers_ops is None:
        try:
            with warnings.catch_warnings():  # "can't load C++/CUDA extensions" on CPU builds
                warnings.simplefilter("ignore")
                import xformers.ops as xops
            _xformers_ops = xops
        except Exception:  # ImportError, or a broken install raising something else
            _xformers_ops = False
    return _xformers_ops or None


def _xformers_reason(q: torch.Tensor) -> str | None:
    """Why xformers cannot run these inputs, or None when it can (imports xformers lazily)."""
    if q.device.type != "cuda":
        return f"inputs are on {q.device.type}; xformers needs CUDA"
    if q.dtype not in _XFORMERS_DTYPES:
        return f"xformers does not take {q.dtype}"
    if (q.dtype, q.shape[-1]) in _xformers_bad:
        return f"xformers refused {q.dtype} with head dim {q.shape[-1]} before"
    if _load_xformers() is None:
        return "xformers does not import"
    return None


# ----------------------------------------------------------------------------- the backends
def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd)): (B, H, N, hd) x2 -> (B, H, N, N). Scale q first (smaller)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # writes B·H·N² scores
    return scores.softmax(dim=-1)  # fp32 under autocast: softmax is on its fp32 list


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The explicit formula on (B, H, N, hd); the oracle the fused backends are tested against."""
    attn = attention_weights(q, k)
    return attn.to(v.dtype) @ v


def _split_heads(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, 3·D) -> (B, N, 3, H, hd): a view, no copy."""
    b, n, three_d = qkv.shape
    return qkv.reshape(b, n, 3, num_heads, three_d // (3 * num_heads))


def attention(qkv: torch.Tensor, num_heads: int, backend: str | None = None) -> torch.Tensor:
    """Self-attention on a packed projection: (B, N, 3·D) -> (B, N, D).

    Args:
        qkv: the output of the block's qkv Linear, q | k | v along the last dim (timm's packing).
        num_heads: H; D must be a multiple of it.
        backend: "auto" | "xformers" | "sdpa" | "math" | None (auto); SELFSUP_ATTN overrides it.
    """
    b, n, three_d = qkv.shape
    if three_d % (3 * num_heads):
        raise ValueError(f"qkv width {three_d} is not 3 * num_heads ({num_heads}) * head dim")
    name = resolve_backend(backend)
    x = _split_heads(qkv, num_heads)
    if name in ("auto", "xformers"):
        q, k, v = x.unbind(2)  # (B, N, H, hd) each: xformers' native layout
        reason = _xformers_reason(q)
        if reason is None:
            try:
                return _xformers_ops.memory_efficient_attention(q, k, v).reshape(b, n, -1)
            except (NotImplementedError, ValueError) as e:  # no kernel for this signature
                _xformers_bad.add((q.dtype, q.shape[-1]))
                reason = f"xformers raised {type(e).__name__}: {str(e).splitlines()[0]}"
                name = "xformers"  # an unexpected refusal is worth a warning even in auto
        if name == "xformers":
            _warn_once(f"xformers:{reason}", f"attention backend 'xformers' cannot run these "
                       f"inputs ({reason}); falling back to 'sdpa'")
        name = "sdpa"
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each, strided views
    if name == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = attention_math(q, k, v)
    return out.transpose(1, 2).reshape(b, n, -1)


def attention_map(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The math backend's weights for a packed projection: (B, N, 3·D) -> (B, H, N, N)."""
    q, k, _ = _split_heads(qkv, num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return attention_weights(q, k)
