"""Root conftest: runs before any test module imports selfsup.

Without CUDA, Triton kernels run through the interpreter. TRITON_INTERPRET must be set before
the first `@triton.jit` decorator executes, i.e. before selfsup.kernels is imported anywhere.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores on CI: keep torch from oversubscribing when pytest-xdist is not used.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))
