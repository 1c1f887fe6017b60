"""Compile every registered Triton kernel for real GPUs, with no GPU present, and report.

    python -m selfsup.kernels.report                    # sm_80 + sm_90, write the markdown report
    python -m selfsup.kernels.report --check --json r.json   # the CI gate: exit 1 on any error

For each kernel x configuration x architecture this compiles PTX and a cubin with Triton's own
ahead-of-time path (`triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`), then reads:

- registers, stack and local (spill) bytes from ``cuobjdump --dump-resource-usage``;
- dynamic shared memory from Triton's metadata (cuobjdump only sees static shared memory);
- MMA / WGMMA instructions (HMMA, HGMMA, ...) in the SASS from ``nvdisasm``;
- theoretical occupancy from registers, shared memory and warps per block.

It must run without TRITON_INTERPRET (under the interpreter `@triton.jit` yields an
InterpretedFunction that cannot be compiled), so it re-executes itself with a clean
environment when that variable is set.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (80, 90)
# Per-SM limits used for theoretical occupancy (CUDA occupancy calculator values).
SM_LIMITS = {
    80: dict(regs=65536, warps=64, blocks=32, smem=167936, smem_block=166912, name="A100"),
    90: dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block=232448, name="H100"),
}
MMA_OPCODES = ("HGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "QGMMA", "IGMMA")


@dataclass
class Row:
    kernel: str
    config: str
    arch: int
    ok: bool
    default: bool = False
    hot: bool = True
    num_warps: int = 0
    num_stages: int = 0
    regs: int = 0
    stack: int = 0  # bytes of stack frame: > 0 means spills or a local array
    local: int = 0
    shared: int = 0  # dynamic shared memory requested by Triton, bytes
    mma: str = ""  # MMA opcodes found in the SASS, e.g. "HMMA" or "HGMMA"
    occupancy: float = 0.0  # active warps / max warps per SM
    spill_note: str = ""
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> float:
    """Theoretical occupancy: resident warps per SM over the maximum (64)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated in units of 256 per warp
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    by_smem = lim["smem"] // (shared + 1024) if shared else lim["blocks"]  # 1 KB reserved/block
    if shared > lim["smem_block"]:
        return 0.0
    blocks = min(by_regs, by_warps, by_smem, lim["blocks"])
    return blocks * num_warps / lim["warps"]


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    found = sorted({op for op in MMA_OPCODES if re.search(rf"\b{op}\b", sass)})
    usage["mma"] = ",".join(found)  # type: ignore[assignment]
    return usage


def compile_one(task: tuple[str, int, int, list[str]]) -> dict:
    """Compile registry[name].configs[idx] for `arch`. Runs in a worker process."""
    name, idx, arch, modules = task
    for m in modules:
        importlib.import_module(m)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._registry import REGISTRY, _jit_fn

    entry = REGISTRY[name]
    cfg = entry.configs[idx]
    row = Row(entry.name, cfg.label, arch, ok=False, default=cfg.default, hot=entry.hot,
              num_warps=cfg.num_warps, num_stages=cfg.num_stages, spill_note=entry.spill_note)
    try:
        sig, attrs = entry.resolved_signature(cfg)
        src = ASTSource(fn=_jit_fn(entry.fn), signature=sig, constexprs=dict(cfg.constexprs),
                        attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        usage = _resource_usage(k.asm["cubin"])
        row.regs, row.stack = usage.get("reg", 0), usage.get("stack", 0)
        row.local, row.mma = usage.get("local", 0), usage["mma"]
        row.shared = int(k.metadata.shared) + usage.get("shared", 0)
        row.occupancy = occupancy(arch, row.regs, row.shared, cfg.num_warps)
        row.ok = True
    except Exception as e:  # any compiler error is a gate failure, reported per row
        row.error = _summarize_error(f"{type(e).__name__}: {e}")
    return asdict(row)


def _summarize_error(msg: str) -> str:
    """Triton's CompilationError reads "at L:C:", the source, a caret, then the message:
    keep the position and the message."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    head = lines[0] if lines[0].split(": ", 1)[-1].startswith("at ") else ""
    return (f"{head} {lines[-1]}" if head and len(lines) > 1 else lines[-1])[:300]


def run(archs: tuple[int, ...], modules: list[str], only: list[str] | None,
        workers: int) -> list[dict]:
    for m in modules:
        importlib.import_module(m)
    from ._registry import REGISTRY

    names = [n for n in sorted(REGISTRY) if not only or any(n.startswith(o) for o in only)]
    tasks = [(n, i, a, modules) for n in names for i in range(len(REGISTRY[n].configs))
             for a in archs]
    if workers <= 1 or len(tasks) <= 1:
        return [compile_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_one, tasks))


def unregistered_kernels(package: str = "selfsup.kernels") -> list[str]:
    """Names of @triton.jit functions defined in `package` (or module) missing from REGISTRY."""
    import pkgutil

    from ._registry import REGISTRY, is_jit_function, kernel_name

    root = importlib.import_module(package)
    modules = [root]
    if hasattr(root, "__path__"):
        for info in pkgutil.walk_packages(root.__path__, prefix=package + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":
                modules.append(importlib.import_module(info.name))
    missing = set()
    for mod in modules:
        # device functions (`@triton.jit` helpers only called from kernels) are compiled
        # inline with their callers; a module names them in JIT_HELPERS
        helpers = set(getattr(mod, "JIT_HELPERS", ()))
        for attr, obj in vars(mod).items():
            if attr in helpers:
                continue
            if is_jit_function(obj) and kernel_name(obj).startswith(mod.__name__):
                if kernel_name(obj) not in REGISTRY:
                    missing.add(kernel_name(obj))
    return sorted(missing)


def to_markdown(rows: list[dict], triton_version: str) -> str:
    head = (f"# Static resource report (triton {triton_version})\n\n"
            "Compiled ahead of time with no GPU: `python -m selfsup.kernels.report`. "
            "`stack`/`local` > 0 means register spills (or a local array). `smem` is Triton's "
            "dynamic shared memory. `occ` is theoretical occupancy (resident warps / 64). "
            "`*` marks the launcher's default configuration.\n\n"
            "| kernel | config | sm | warps | stages | regs | stack | local | smem KB | MMA "
            "| occ | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        status = "ok" if r["ok"] else f"**error**: {r['error']}"
        if r["ok"] and (r["stack"] or r["local"]):
            status = "spills" + (f" ({r['spill_note']})" if r["spill_note"] else "")
        short = r["kernel"].rsplit(".", 2)
        kname = ".".join(short[-2:])
        body.append(
            f"| {kname} | {r['config']}{' *' if r['default'] else ''} | {r['arch']} "
            f"| {r['num_warps']} | {r['num_stages']} | {r['regs']} | {r['stack']} | {r['local']} "
            f"| {r['shared'] / 1024:.1f} | {r['mma'] or '-'} | {r['occupancy']:.2f} | {status} |")
    return head + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "selfsup.kernels.report", *argv],
                              env=env).returncode
    # Triton 3.9 warns when this is unset; "1" is what 3.9 does by default at run time.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = argparse.ArgumentParser(prog="python -m selfsup.kernels.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(SM_LIMITS))
    p.add_argument("--module", action="append", default=[],
                   help="extra module(s) that register kernels (default: selfsup.kernels)")
    p.add_argument("--only", action="append", default=None,
                   help="only kernels whose registry name starts with this prefix")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None, help="markdown path (default: "
                   "bench/results/static/<triton-version>.md); '-' prints it")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--check", action="store_true",
                   help="gate mode: exit 1 on a compile error or an unexplained hot-path spill")
    args = p.parse_args(argv)

    import triton

    modules = ["selfsup.kernels", *args.module]
    rows = run(tuple(args.arch), modules, args.only, args.workers)
    md = to_markdown(rows, triton.__version__)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.out == "-" or args.check and args.out is None:
        print(md)
    else:
        out = Path(args.out or f"bench/results/static/{triton.__version__}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md)
        print(f"wrote {out} ({len(rows)} rows)")
    errors = [r for r in rows if not r["ok"]]
    spills = [r for r in rows if r["ok"] and r["hot"] and r["default"]
              and (r["stack"] or r["local"]) and not r["spill_note"]]
    for r in errors:
        print(f"COMPILE ERROR {r['kernel']} [{r['config']}] sm_{r['arch']}: {r['error']}",
              file=sys.stderr)
    for r in spills:
        print(f"SPILL {r['kernel']} [{r['config']}] sm_{r['arch']}: stack={r['stack']} "
              f"local={r['local']} at a hot default config with no spill_note", file=sys.stderr)
    if not rows:
        print("no kernels registered", file=sys.stderr)
        return 1 if args.check else 0
    return 1 if args.check and (errors or spills) else 0


if __name__ == "__main__":
    sys.exit(main())
