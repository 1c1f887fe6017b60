"""Compile every Triton kernel the checks and timings need, in parallel, before they run.

A fresh GPU machine has an empty Triton cache, and compiling about a hundred kernel
specializations (op x dtype x shape class) one after another would take minutes of the
budget. So the kernels section starts with N processes on the same GPU. Each one runs its
share of the cases' Triton paths once, forward and backward, with no references and no
timing. Triton caches the compiled kernels on disk, keyed by source, constants, dtypes and
argument divisibility. The checks and timings that follow then load them in milliseconds. An
error here is only printed: the check of the same case reports it properly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import bench, kernels
from .common import Case, Context

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_check.py"
SHARE_OF_SECTION = 0.6  # at most this much of the kernels section's budget


def tasks(dry_run: bool) -> list[tuple]:
    ks = [("kernels", *t) for t in kernels.warm_tasks()]
    bs = [("bench", cid) for cid in bench.CASES]
    # the interpreter compiles nothing: the dry run only proves the path, with one of each
    return ks[:1] + bs[:1] if dry_run else ks + bs


def run_share(ctx: Context, index: int, count: int) -> int:
    """This process's share (every count-th task from index); returns the failures."""
    failed = 0
    for i, task in enumerate(tasks(ctx.dry_run)):
        if i % count != index:
            continue
        try:
            if task[0] == "kernels":
                kernels.warm(ctx, *task[1:])
            else:
                bench.warm(ctx, task[1])
        except Exception:  # noqa: BLE001 - the real check reports it
            failed += 1
            print(f"warm-up {task}: {traceback.format_exc(limit=2)[-400:]}", flush=True)
    return failed


def warm_up(ctx: Context, procs: int) -> dict:
    left = (ctx.section_end or time.time() + 100) - time.time()
    limit = max(10.0, min(120.0, SHARE_OF_SECTION * left))
    cmd = [sys.executable, str(SCRIPT)] + ["--dry-run"] * ctx.dry_run
    t0 = time.time()
    running = [subprocess.Popen(cmd + ["--warm", f"{i}/{procs}"], env=dict(os.environ))
               for i in range(procs)]
    killed = 0
    for p in running:
        try:
            p.wait(timeout=max(0.1, t0 + limit - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            killed += 1
    codes = [p.returncode for p in running]
    n = len(tasks(ctx.dry_run))
    # 0: all compiled, 1: some task raised (its check reports why), -9: stopped at the limit;
    # anything else: the process itself broke
    broken = [c for c in codes if c not in (0, 1, -9)]
    return {"status": "error" if broken else "ok", "procs": procs, "tasks": n,
            "limit_s": round(limit, 1),
            "killed_at_limit": killed, "exit_codes": codes,
            **({"error": f"warm-up processes exited with {broken}"} if broken else {}),
            "note": f"{procs} processes compiled the Triton kernels of {n} cases"
                    + (f"; {killed} stopped at the {limit:.0f} s limit" if killed else "")}


def case(ctx: Context) -> Case:
    procs = 1 if ctx.dry_run else max(1, min(8, (os.cpu_count() or 2) // 2))
    return Case("warm-up", lambda: warm_up(ctx, procs), timeout=150.0, min_s=5.0,
                meta={"op": "(parallel Triton compile)"})
