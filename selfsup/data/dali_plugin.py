"""The fused CPU view operator (csrc/view_op.cc): built on first use, cached, loaded into DALI.

DALI CPU pipelines use it when it loads (dali.py); otherwise they keep DALI's stock operators,
which compute the same view (see view_op.cc for what differs: one rounding in the blur,
a triangle antialias). It is compiled for this machine with the system C++ compiler against
DALI's headers (nvidia.dali.sysconfig) and the CUDA runtime headers, which DALI's headers
include even for CPU code: $CUDA_HOME, /usr/local/cuda*, or Triton's bundled copy where that
is complete (it needs CCCL's <nv/target>).

The shared object is cached under $SELFSUP_CACHE (default ~/.cache/selfsup), keyed by the
source, DALI's version, the compiler, the flags and this CPU's instruction-set flags (it is
built with -march=native), and written atomically, so concurrent processes never load a
half-written file. SELFSUP_DALI_PLUGIN=0 keeps the stock operators. `make install` builds
it ahead of time: python -c "from selfsup.data import dali_plugin; print(dali_plugin.build())"
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "view_op.cc"
# -ffp-contract=off: no fused multiply-add, so every machine rounds the same way
FLAGS = ["-std=c++20", "-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-w"]


class PluginError(RuntimeError):
    """The fused operator could not be built or loaded (the message says why)."""


def enabled() -> bool:
    """False when SELFSUP_DALI_PLUGIN=0 (read at every pipeline build)."""
    return os.environ.get("SELFSUP_DALI_PLUGIN", "1") != "0"


def _cuda_includes() -> list[str]:
    """Include dirs with the CUDA runtime headers and CCCL's <nv/target> (cuda_fp16.h, which
    DALI's float16.h includes, needs it; CUDA 13 keeps it under include/cccl)."""
    cands = [os.path.join(os.environ[k], "include") for k in ("CUDA_HOME", "CUDA_PATH")
             if os.environ.get(k)]
    cands += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"))]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                  "include"))
    except ImportError:
        pass
    for c in cands:
        if not os.path.isfile(os.path.join(c, "cuda_runtime_api.h")):
            continue
        dirs = [c] + [d for d in (os.path.join(c, "cccl"),) if os.path.isdir(d)]
        if any(os.path.isfile(os.path.join(d, "nv", "target")) for d in dirs):
            return dirs
    raise PluginError("no CUDA runtime headers with CCCL's nv/target found (DALI's headers "
                      f"include them even for CPU code; looked in {cands}); set CUDA_HOME to "
                      "a CUDA toolkit")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise PluginError("no C++ compiler found (set CXX, or install g++)")
    try:
        ver = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise PluginError(f"C++ compiler {cxx!r} does not run: {e}") from None
    return cxx, ver


def build() -> Path:
    """Compile the operator if no cached build matches; returns the shared object's path."""
    import nvidia.dali as dali
    from nvidia.dali import sysconfig

    cxx, ver = _compiler()
    inc = [f for d in _cuda_includes() for f in ("-isystem", d)]
    cmd_tail = [*sysconfig.get_compile_flags(), *inc, *FLAGS]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), dali.__version__, ver, *cmd_tail,
                                    _cpu_flags(), sys.platform]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SELFSUP_CACHE", Path.home() / ".cache" / "selfsup"))
    out = cache / f"selfsup_dali_view-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [cxx, str(SOURCE), "-o", tmp, *cmd_tail, *sysconfig.get_link_flags()]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise PluginError(f"compiling {SOURCE.name} failed ({cxx}):\n{r.stderr[-3000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def load() -> bool:
    """Build (if needed) and load the operator into DALI, once per process.

    True when `fn.selfsup_view` is usable; False, with one warning naming the reason, when
    it cannot be built or loaded: DALI CPU pipelines then use DALI's stock operators."""
    return _load(build)


def _load(make) -> bool:
    try:
        path = make()
        from nvidia.dali import plugin_manager

        plugin_manager.load_library(str(path))
        return True
    except (PluginError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"selfsup: the fused DALI CPU view operator is unavailable ({e}); DALI "
                      "CPU pipelines use DALI's stock operators, which are slower",
                      stacklevel=3)
        return False
