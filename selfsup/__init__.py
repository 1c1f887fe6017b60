"""selfsup: fast self-supervised visual representation learning.

Subpackages: `selfsup.kernels` (fused Triton losses and masking, importable on its own),
`selfsup.models`, `selfsup.ssl` (the methods), `selfsup.data`. Importing `selfsup` itself is
cheap; nothing heavy is imported here.
"""

__version__ = "0.1.0"
