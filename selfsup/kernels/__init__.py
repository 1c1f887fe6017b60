"""Fused kernels for self-supervised learning, importable on their own.

Each op family lives in one file and offers three paths, picked per call by
`choose_backend` (``SELFSUP_KERNELS=triton|torch|ref`` forces one):

- Triton kernels on CUDA (and on CPU under ``TRITON_INTERPRET=1`` for testing);
- a portable chunked torch path with a custom autograd.Function;
- a plain-torch ``*_ref`` written like the paper, the test oracle.

Works without CUDA and without triton installed.
"""

from ._registry import REGISTRY, KernelConfig, register_kernel
from ._triton import HAS_TRITON
from ._utils import BACKENDS, choose_backend

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "REGISTRY",
    "KernelConfig",
    "choose_backend",
    "register_kernel",
]
