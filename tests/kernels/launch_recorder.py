"""A launch recorder: which (kernel, dtypes, constexpr config) does real code launch?

The static report (`python -m selfsup.kernels.report`) compiles the configurations each kernel
file *registers*. That proves something about a GPU run only if the launchers pick exactly
those. `LaunchRecorder` wraps every registered ``@triton.jit`` function where the kernel
modules reference it, records each launch's pointer dtypes, constexprs, ``num_warps`` and
``num_stages``, then runs the launch as usual (the interpreter on CPU). `unregistered` lists
the recorded launches no registered configuration describes.

"CUDA-shaped": launchers must choose the same constexprs under the interpreter as on a GPU.
Knobs that exist only for the interpreter (e.g. an fp32 upcast of bf16 `tl.dot` operands,
which the interpreter computes wrongly) are named in a kernel module's
``INTERPRETER_CONSTEXPRS`` dict, ``{name: value a GPU launch uses}``; the recorder writes the
GPU value into its record, so the record is what a CUDA launch would be.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from selfsup.kernels import REGISTRY
from selfsup.kernels._registry import KernelConfig, KernelEntry, _jit_fn

TRITON_DEFAULT_WARPS = 4
TRITON_DEFAULT_STAGES = 3  # triton's CUDA default when a launch passes no num_stages

_PTR_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
              torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
              torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


@dataclass(frozen=True)
class Launch:
    kernel: str
    pointers: tuple[tuple[str, str], ...]  # (argument, "*bf16")
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        ptrs = ", ".join(f"{a}={t}" for a, t in self.pointers)
        const = ", ".join(f"{a}={v}" for a, v in self.constexprs)
        return (f"{self.kernel} [{ptrs}] [{const}] num_warps={self.num_warps} "
                f"num_stages={self.num_stages}")


@dataclass
class LaunchRecorder:
    launches: set[Launch] = field(default_factory=set)
    _patched: list[tuple[Any, str, Any]] = field(default_factory=list)

    def __enter__(self) -> LaunchRecorder:
        by_id = {id(e.fn): e for e in REGISTRY.values()}
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("selfsup.kernels") or mod is None:
                continue
            gpu_values = getattr(mod, "INTERPRETER_CONSTEXPRS", {})
            for attr, value in list(vars(mod).items()):
                entry = by_id.get(id(value))
                if entry is not None:
                    self._patched.append((mod, attr, value))
                    setattr(mod, attr, _Recording(value, entry, self, gpu_values))
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, attr, value in reversed(self._patched):
            setattr(mod, attr, value)
        self._patched.clear()

    def unregistered(self) -> list[Launch]:
        return sorted((x for x in self.launches if not any(
            matches(x, REGISTRY[x.kernel], c) for c in REGISTRY[x.kernel].configs)),
            key=Launch.describe)


class _Recording:
    """Stands in for a jit function: `kernel[grid](...)` records, then launches."""

    def __init__(self, fn: Any, entry: KernelEntry, rec: LaunchRecorder, gpu: dict) -> None:
        self.fn, self.entry, self.rec, self.gpu = fn, entry, rec, gpu
        self.params = list(inspect.signature(_jit_fn(fn).fn).parameters)

    def __getitem__(self, grid: Any):
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.rec.launches.add(self._record(args, kwargs))
            return self.fn[grid](*args, **kwargs)

        return launch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)

    def _record(self, args: tuple, kwargs: dict) -> Launch:
        bound = dict(zip(self.params, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in self.params})
        sig = self.entry.signature
        ptrs = tuple((a, "*" + _PTR_TYPES[v.dtype]) for a, v in bound.items()
                     if sig[a].startswith("*") and isinstance(v, torch.Tensor))
        const = tuple((a, self.gpu.get(a, bound[a])) for a in sig
                      if sig[a] == "constexpr" and a in bound)
        return Launch(self.entry.name, ptrs, const,
                      int(kwargs.get("num_warps", TRITON_DEFAULT_WARPS)),
                      int(kwargs.get("num_stages", TRITON_DEFAULT_STAGES)))


def matches(launch: Launch, entry: KernelEntry, cfg: KernelConfig) -> bool:
    """Whether registered `cfg` compiles exactly what `launch` ran."""
    sig, _ = entry.resolved_signature(cfg)
    return (all(sig[a] == t for a, t in launch.pointers)
            and all(a in cfg.constexprs and _same(cfg.constexprs[a], v)
                    for a, v in launch.constexprs)
            and cfg.num_warps == launch.num_warps and cfg.num_stages == launch.num_stages)


def config_from_launch(launch: Launch, label: str = "recorded") -> KernelConfig:
    """The KernelConfig that registers exactly `launch` (e.g. to print what is missing)."""
    entry = REGISTRY[launch.kernel]
    types: dict[str, str] = {}
    for arg, typ in launch.pointers:
        want = entry.signature[arg]
        if "{" in want:  # "*{dt}" -> dt = "bf16"
            types[want[want.index("{") + 1:want.index("}")]] = typ[1:]
    return KernelConfig(label, dict(launch.constexprs), types=types,
                        num_warps=launch.num_warps, num_stages=launch.num_stages)


def _same(a: Any, b: Any) -> bool:
    # tl.dtype constexprs (e.g. CDT=tl.float32) compare by name; the rest by value
    if hasattr(a, "primitive_bitwidth") or hasattr(b, "primitive_bitwidth"):
        return str(a) == str(b)
    return a == b
