"""The registry of every ``@triton.jit`` kernel and the configurations its launchers can pick.

The interpreter proves the math; it also accepts code the real compiler rejects and says
nothing about registers or spills. So every kernel is also compiled ahead of time for sm_80 and
sm_90 (`selfsup.kernels.report`, gated by tests/kernels/test_compile.py). To make that
possible each kernel file registers its kernels right after defining them::

    register_kernel(
        _info_nce_fwd_kernel,
        signature={"q_ptr": "*{dt}", "N": "i32", "BLOCK_N": "constexpr", ...},
        configs=[KernelConfig("bf16 64x64", {"BLOCK_N": 64, ...}, types={"dt": "bf16"},
                              num_warps=4, num_stages=3, default=True), ...],
    )

- ``signature`` lists every argument, in order. Pointer types may use ``{placeholders}``
  filled from each config's ``types``. ``"i32:16"`` marks an int the launcher guarantees to be
  a multiple of 16 (as a real launch would specialize it). Pointers get 16-byte alignment,
  as torch allocations do.
- ``configs`` are the production choices (block sizes, warps, stages, dtypes, flags). Mark
  the one a launcher uses by default with ``default=True``: the zero-spill goal applies there.
- ``hot=True`` for kernels on a training hot path; ``spill_note`` records why a default config
  is allowed to spill, if it must.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._triton import HAS_TRITON


@dataclass(frozen=True)
class KernelConfig:
    label: str  # short human name, e.g. "bf16 BLOCK_K=128"
    constexprs: dict[str, Any]  # values for every constexpr argument
    types: dict[str, str] = field(default_factory=dict)  # fills "{placeholders}" in signature
    num_warps: int = 4
    num_stages: int = 2
    default: bool = False  # the configuration the launcher picks by default


@dataclass
class KernelEntry:
    name: str  # "<module>.<function>"
    fn: Any  # the JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    signature: dict[str, str]
    configs: list[KernelConfig]
    hot: bool = True
    spill_note: str = ""  # why a default config may spill (empty: it must not)

    def resolved_signature(self, cfg: KernelConfig) -> tuple[dict[str, str], dict]:
        """(signature for ASTSource, attrs) for one configuration."""
        sig: dict[str, str] = {}
        attrs: dict[tuple[int, ...], list] = {}
        for i, (arg, typ) in enumerate(self.signature.items()):
            typ = typ.format(**cfg.types)
            if typ.endswith(":16"):
                typ = typ[:-3]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif typ.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            sig[arg] = typ
        return sig, attrs


REGISTRY: dict[str, KernelEntry] = {}


def kernel_name(fn: Any) -> str:
    """Registry key of a jit function: "<module>.<name>" of the Python function inside."""
    raw = _jit_fn(fn).fn
    return f"{raw.__module__}.{raw.__name__}"


def register_kernel(
    fn: Any,
    *,
    signature: dict[str, str],
    configs: list[KernelConfig],
    hot: bool = True,
    spill_note: str = "",
) -> Any:
    """Record `fn` with its production configurations; returns `fn` unchanged."""
    if not HAS_TRITON:
        return fn
    if not configs:
        raise ValueError(f"register_kernel({kernel_name(fn)}): configs must not be empty")
    arg_names = list(_jit_fn(fn).arg_names)
    if list(signature) != arg_names:
        raise ValueError(f"register_kernel({kernel_name(fn)}): signature keys {list(signature)} "
                         f"must list the kernel's arguments in order: {arg_names}")
    for cfg in configs:
        missing = [a for a, t in signature.items() if t == "constexpr" and a not in cfg.constexprs]
        if missing:
            raise ValueError(f"register_kernel({kernel_name(fn)}): config {cfg.label!r} gives no "
                             f"value for constexpr {missing}")
    name = kernel_name(fn)
    REGISTRY[name] = KernelEntry(name, fn, dict(signature), list(configs), hot, spill_note)
    return fn


def _jit_fn(fn: Any) -> Any:
    """Unwrap autotune/heuristics wrappers down to the JITFunction."""
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def is_jit_function(obj: Any) -> bool:
    """True for @triton.jit functions, in compiled or interpreted mode, wrapped or not."""
    if not HAS_TRITON:
        return False
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older layouts
        InterpretedFunction = JITFunction  # noqa: N806
    seen = obj
    for _ in range(4):
        if isinstance(seen, (JITFunction, InterpretedFunction)):
            return True
        seen = getattr(seen, "fn", None)
        if seen is None:
            return False
    return False
