#!/usr/bin/env python3
"""`make gpu-check`: the whole system measured in one short run on a CUDA machine.

    PYTHONPATH=. python3 scripts/gpu_check.py [--out DIR] [--budget SECONDS]
    PYTHONPATH=. python3 scripts/gpu_check.py --dry-run --out /tmp/gc   # CPU, ~1 minute

Sections, in order, each with a share of the time budget (unused time passes on):
  kernels  every selfsup.kernels op on its Triton path vs float64, fp32 / bf16 / fp16;
  bench    the ops at ROOFLINE.md's production shapes: triton / portable / naive, floors;
  train    20 steps of every method on ViT-S/16 and ResNet-50 in bf16, eager (+ --compile).
Writes DIR/<gpu-name>.md, DIR/<gpu-name>.json and DIR/<gpu-name>.log (default DIR:
bench/results/gpu). Exit code: 0 all ran cases passed, 1 something failed, 2 nothing ran.

How it stays inside the budget: one worker process runs every case (so Triton's compiled
kernels and the measured ceilings are shared); this supervisor watches it through a state
file, kills it when a case outlives its hard limit, its section's budget or the global
deadline, records that case as timed out and restarts the worker on the remaining cases
(also after a crash, e.g. an illegal memory access that poisons the CUDA context). The
report is written from whatever finished. See docs/gpu-check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # selfsup and gpucheck, also without PYTHONPATH=.

SECTIONS = {"kernels": 0.30, "bench": 0.20, "train": 0.50}  # shares of the budget
BUDGET_S, DRY_BUDGET_S = 450.0, 150.0  # the GPU run must end inside 8 minutes
GRACE_S = 10.0  # a case may overrun its section's budget by this much before it is killed
MAX_STARTS = 10  # worker starts: the first, then one per crash or killed case


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: tiny shapes, Triton under TRITON_INTERPRET=1, 2 steps")
    p.add_argument("--out", type=Path, help="report folder (default bench/results/gpu; "
                   "the dry run: a new temporary folder)")
    p.add_argument("--budget", type=float, help=f"seconds for everything (default {BUDGET_S:g}"
                   f", dry run {DRY_BUDGET_S:g})")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--commit", help="the commit to name when the checkout has no .git")
    p.add_argument("--no-replay", action="store_true",
                   help="train on the portable loader's live batches (CPU-bound on a GPU)")
    # internal: the worker's side of the protocol
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--killed", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--warm", help=argparse.SUPPRESS)  # "I/N": a compile warm-up process
    args = p.parse_args(argv)
    args.sections = [s for s in SECTIONS if s in args.sections.split(",")]
    if not args.sections:
        p.error(f"--sections must name some of {', '.join(SECTIONS)}")
    return args


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)  # atomic: the supervisor never reads half a file


# ============================================================================ worker
FAULT_ENV = "GPU_CHECK_FAULT"  # tests only: "SECTION/CASE=crash|hang,..." proves the supervisor


def _inject_fault(key: str) -> None:
    faults = dict(x.rsplit("=", 1) for x in os.environ.get(FAULT_ENV, "").split(",") if "=" in x)
    if faults.get(key) == "crash":
        os._exit(7)  # as a segfault or an abort would: no row, no state update
    if faults.get(key) == "hang":
        time.sleep(3600)


def worker(args) -> int:
    import torch
    from gpucheck import bench, kernels, train, warmup
    from gpucheck.common import Context, environment, error_row, fatal_cuda_error

    state = read_json(args.state)
    state["running"] = None  # a killed predecessor's case is the supervisor's to record
    killed = read_json(args.killed)
    if not args.dry_run and not torch.cuda.is_available():
        state["fatal"] = "no CUDA device is visible (use --dry-run on a CPU machine)"
        write_json(args.state, state)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    if args.dry_run:  # many tiny ops: one thread is several times faster on a busy machine
        torch.set_num_threads(1)
    ctx = Context(args.dry_run, device, results=state.setdefault("results", {}))
    builders = {"kernels": lambda c: kernels.cases(c, warmup.case(c)), "bench": bench.cases,
                "train": lambda c: train.cases(c, replay=not args.no_replay)}
    sections = {s: builders[s](ctx) for s in args.sections}
    state["plan"] = {s: [c.id for c in cases] for s, cases in sections.items()}
    state.setdefault("meta", environment(ctx, args.commit))
    deadlines = state.setdefault("section_deadline", {})
    write_json(args.state, state)
    for i, (name, cases) in enumerate(sections.items()):
        if name not in deadlines:  # a restarted worker keeps the first start's budget
            now = time.time()
            share = SECTIONS[name] / sum(SECTIONS[s] for s in args.sections[i:])
            deadlines[name] = now + share * max(0.0, args.deadline - now)
        end = ctx.section_end = min(deadlines[name], args.deadline)
        rows = state["results"].setdefault(name, {})
        for case in cases:
            if case.id in rows or case.id in killed.get(name, {}):
                continue
            start = time.time()
            if start + case.min_s > end:
                why = ("the global deadline" if end >= args.deadline
                       else f"the {name} section's time budget")
                rows[case.id] = case.meta | {"status": "skipped", "reason": f"{why} was spent"}
                continue
            state["running"] = {"section": name, "case": case.id, "started": start,
                                "timeout": case.timeout}
            write_json(args.state, state)
            fatal = False
            _inject_fault(f"{name}/{case.id}")
            try:
                row = case.run()
                row.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                row, fatal = error_row(e), fatal_cuda_error(e)
            rows[case.id] = case.meta | row | {"seconds": round(time.time() - start, 2)}
            state["running"] = None
            write_json(args.state, state)
            if fatal:  # the CUDA context is gone: the supervisor restarts a fresh worker
                return 3
        write_json(args.state, state)
    state["finished"] = True
    write_json(args.state, state)
    return 0


# ============================================================================ supervisor
def _line(section: str, cid: str, r: dict) -> str:
    status = r.get("status", "?")
    extra = ""
    if section == "bench" and r.get("timings"):
        t = next((t for t in r["timings"] if t["path"] == "triton" and t["pass"] == "fwd+bwd"
                  and "us" in t), None)
        if t:
            extra = f" triton fwd+bwd {t['us']:.4g} µs ({t['pct_floor']:.3g}% of floor)"
    elif section == "train" and r.get("img_s"):
        extra = f" {r['img_s']:.0f} img/s"
    elif r.get("error") or r.get("reason"):
        extra = f" {(r.get('error') or r.get('reason'))[:160]}"
    return f"[{section}] {cid}: {status} ({r.get('seconds', 0):.1f} s){extra}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its own process group
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def watch(proc, state_path: Path, deadline: float, shown: set) -> str | None:
    """Wait for the worker; kill it when a case overruns. Returns why it was killed."""
    while True:
        rc = proc.poll()
        state = read_json(state_path)
        for section, rows in state.get("results", {}).items():
            for cid, r in rows.items():
                if (section, cid) not in shown:
                    shown.add((section, cid))
                    print(_line(section, cid, r), flush=True)
        if rc is not None:
            return None
        now, run = time.time(), state.get("running")
        why = None
        if now > deadline:
            why = "stopped at the global deadline"
        elif run:
            sect_end = state.get("section_deadline", {}).get(run["section"], deadline)
            if now > run["started"] + run["timeout"]:
                why = f"timed out: ran past its hard limit of {run['timeout']:.0f} s"
            elif now > sect_end + GRACE_S:
                why = f"stopped: ran past the {run['section']} section's time budget"
        if why:
            _kill(proc)
            return why
        time.sleep(0.5)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def supervise(args) -> int:
    t0 = time.time()
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S)
    deadline = t0 + budget
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if args.dry_run
                       else ROOT / "bench" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-state-"))
    state_path, killed_path, log_path = work / "state.json", work / "killed.json", work / "log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    if args.dry_run:  # CPU tensors through the interpreter, even on a machine with a GPU
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env["OMP_NUM_THREADS"] = "1"
    elif env.pop("TRITON_INTERPRET", None):
        print("gpu-check: unset TRITON_INTERPRET for the worker (it would interpret the "
              "kernels on the CPU)", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--state", str(state_path),
           "--killed", str(killed_path), "--deadline", str(deadline),
           "--sections", ",".join(args.sections)]
    cmd += ["--dry-run"] * args.dry_run + ["--no-replay"] * args.no_replay
    cmd += ["--commit", args.commit] if args.commit else []
    killed: dict = {}
    shown: set = set()
    starts = 0
    with open(log_path, "ab") as log:
        while starts < MAX_STARTS and time.time() < deadline - 3:
            starts += 1
            before = sum(len(r) for r in read_json(state_path).get("results", {}).values())
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
            why = watch(proc, state_path, deadline, shown)
            state = read_json(state_path)
            if state.get("finished") or state.get("fatal"):
                break
            run = state.get("running")
            if run:  # the case in flight when the worker stopped
                log.flush()
                reason = why or (f"the worker died (exit code {proc.returncode}) during this "
                                 f"case; log tail: {_tail(log_path, 600)}")
                killed.setdefault(run["section"], {})[run["case"]] = reason
                write_json(killed_path, killed)
                print(f"[{run['section']}] {run['case']}: {reason[:200]}", flush=True)
            elif sum(len(r) for r in state.get("results", {}).values()) == before or why:
                break  # no progress (e.g. an import error), or the deadline
    state = read_json(state_path)
    if not state.get("plan") and not state.get("fatal"):
        state["fatal"] = f"the worker failed before planning; log tail: {_tail(log_path)}"
    results = state.setdefault("results", {})
    for section, ids in state.get("plan", {}).items():
        rows = results.setdefault(section, {})
        for cid in ids:
            if cid in killed.get(section, {}):
                reason = killed[section][cid]
                status = "timeout" if reason.startswith(("timed out", "stopped")) else "crashed"
                rows[cid] = rows.get(cid, {}) | {"status": status, "reason": reason}
            elif cid not in rows:
                rows[cid] = {"status": "not run",
                             "reason": "the global deadline came first"
                             if time.time() >= deadline - 3 else "the worker stopped early"}
    from gpucheck import report

    run_info = {"command": shlex.join([Path(sys.executable).name, *sys.argv]),
                "wall_s": time.time() - t0, "budget_s": budget, "worker_starts": starts,
                "dry_run": args.dry_run}
    md, js = report.write(out, state, run_info)
    log_dst = md.with_suffix(".log")
    log_dst.write_bytes(log_path.read_bytes())
    print(f"gpu-check: wrote {md}, {js} and {log_dst} in {time.time() - t0:.0f} s", flush=True)
    if state.get("fatal"):
        print(f"gpu-check: {state['fatal'][:2000]}", file=sys.stderr)
        return 2
    bad = [s for rows in results.values() for s in (r.get("status") for r in rows.values())
           if s in report.BAD]
    return 1 if bad else 0


def warm(args) -> int:
    """One compile warm-up process (gpucheck/warmup.py): its share of the Triton paths."""
    import torch
    from gpucheck import warmup
    from gpucheck.common import Context

    if args.dry_run:
        torch.set_num_threads(1)
    index, count = (int(x) for x in args.warm.split("/"))
    ctx = Context(args.dry_run, torch.device("cpu" if args.dry_run else "cuda"))
    return 1 if warmup.run_share(ctx, index, count) else 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.warm:
        return warm(args)
    if args.worker:
        return worker(args)
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
