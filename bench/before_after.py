"""Portable CPU paths before vs after issue 22: 1-thread fwd+bwd medians, old and new in one run.

Issue 22 asks that the portable (SELFSUP_KERNELS=torch) CPU paths stay at least as fast as
before its GPU work. This script times the old and the new `selfsup.kernels` side by side:

    .venv/bin/python bench/before_after.py                 # every family, writes the report
    .venv/bin/python bench/before_after.py --only dino --rounds 5 --out -

How it stays fair on a small shared machine:
- the old code is a git worktree of BEFORE (default f49325f, the reviewed commit and the parent
  of the first issue-22 kernel change); it is created if missing;
- old and new each run in their own long-lived worker process (the two trees cannot share one
  interpreter: both are the package `selfsup`), with PYTHONPATH pointing at their tree,
  SELFSUP_KERNELS=torch and torch.set_num_threads(1); each worker reports which file it
  imported, and the driver checks it;
- only one worker computes at a time, and rounds INTERLEAVE them (old, new, then new, old, ...),
  so a load spike from another process hits both sides about equally. Each round times the same
  number of calls on both sides; the report gives each side's median over all calls, the ratio
  of the medians, and the spread (25th-75th percentile) of the per-round ratios new/old, which
  compare calls taken seconds apart. Times are CPU time of the worker process
  (time.process_time: with one thread, the work itself; wall time also counts the seconds the
  scheduler gave the core to someone else, which on a shared 2-core machine swamps small
  cases); wall-clock medians are reported beside them. A case is flagged SLOWER when the
  ratio exceeds 1.05 and even the 25th percentile of the per-round ratios is above 1 (slower
  in most rounds, not noise).

Shapes are the CPU rows of bench_info_nce.py, bench_dino_loss.py and bench_mae.py; inputs are
built from fixed seeds in each worker, identical for old and new. fp32 everywhere, and bf16
rows for the InfoNCE and DINO shapes the old portable path also ran in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "f49325f"

# name: (family, params). Families are built in the worker by build_step().
CASES = {
    "info_nce queue N64 C128 K4096": ("queue", dict(n=64, c=128, k=4096)),
    "info_nce queue N256 C128 K65536": ("queue", dict(n=256, c=128, k=65536)),
    "info_nce batch 128x512 C256": ("batch", dict(n=128, m=512, c=256)),
    "info_nce batch 1024x4096 C256": ("batch", dict(n=1024, m=4096, c=256)),
    "nt_xent 2N512 C128": ("nt_xent", dict(n=256, c=128)),
    "nt_xent 2N4096 C128": ("nt_xent", dict(n=2048, c=128)),
    "nt_xent 2N8192 C128": ("nt_xent", dict(n=4096, c=128)),
    "info_nce queue N256 C128 K65536 bf16": ("queue", dict(n=256, c=128, k=65536,
                                                           dtype="bfloat16")),
    "nt_xent 2N4096 C128 bf16": ("nt_xent", dict(n=2048, c=128, dtype="bfloat16")),
    "dino small B8 2+4 K4096": ("dino", dict(b=8, g=2, loc=4, k=4096)),
    "dino B64 2+10 K65536": ("dino", dict(b=64, g=2, loc=10, k=65536)),
    "dino B64 2+10 K65536 bf16": ("dino", dict(b=64, g=2, loc=10, k=65536, dtype="bfloat16")),
}
# bench_mae.py's shapes: (B, L, D, Dd, patch, image side)
MAE_SHAPES = {"tiny": (4, 49, 192, 128, 4, 28), "mae-l": (64, 196, 1024, 512, 16, 224),
              "mae-h": (64, 256, 1280, 512, 14, 224)}
for _shape in MAE_SHAPES:
    for _op in ("gather", "scatter", "loss", "pipeline"):
        CASES[f"mae {_op} {_shape}"] = ("mae", dict(op=_op, shape=_shape))
# PatchEmbed's real layout: conv (B, D, h, w) -> flatten(2).transpose(1, 2), a strided view.
for _shape in ("mae-l", "mae-h"):
    CASES[f"mae gather {_shape} patch-embed layout"] = ("mae", dict(op="gather", shape=_shape,
                                                                    layout="bdl"))


# ----------------------------------------------------------------------------- worker side

def _info_nce_step(kind, p):
    import torch
    import torch.nn.functional as F

    from selfsup.kernels import info_nce_batch, info_nce_queue, nt_xent

    dtype = getattr(torch, p.get("dtype", "float32"))
    g = torch.Generator().manual_seed(0)

    def rows(n):
        return torch.randn(n, p["c"], generator=g).to(dtype)

    if kind == "queue":
        args = [rows(p["n"]).requires_grad_(True), rows(p["n"]),
                F.normalize(rows(p["k"]).float(), dim=1).to(dtype)]
        fn, temp = info_nce_queue, 0.2
    elif kind == "batch":
        args = [rows(p["n"]).requires_grad_(True), rows(p["m"])]
        fn, temp = info_nce_batch, 0.2
    else:
        args = [rows(p["n"]).requires_grad_(True), rows(p["n"]).requires_grad_(True)]
        fn, temp = nt_xent, 0.1
    wrt = [a for a in args if a.requires_grad]

    def step():
        torch.autograd.grad(fn(*args, temp), wrt)

    return step


def _dino_step(p):
    import torch

    from selfsup.kernels import DINOLoss

    dtype = getattr(torch, p.get("dtype", "float32"))
    b, g, k = p["b"], p["g"], p["k"]
    v = g + p["loc"]
    torch.manual_seed(0)
    s = (torch.randn(v * b, k) * 2).to(dtype).requires_grad_(True)
    t = torch.randn(g * b, k).to(dtype)
    crit = DINOLoss(k)

    def step():  # the trainer's call: loss, stats and center EMA, then backward
        s.grad = None
        crit(s, t).backward()

    return step


def _mae_step(p):
    import torch

    from selfsup.kernels import mae as M

    b, length, d, dd, patch, side = MAE_SHAPES[p["shape"]]
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = M.random_masking(b, length, 0.75)
    lk = ids_keep.shape[1]
    c = 3 if side > 32 else 1
    op = p["op"]
    if op == "gather":
        if p.get("layout") == "bdl":
            x = torch.randn(b, d, length).requires_grad_(True)
            leaf, x_in = x, None
        else:
            leaf = x_in = torch.randn(b, length, d, requires_grad=True)
        pos = torch.randn(1, length, d, requires_grad=True)
        up = torch.randn(b, lk, d)

        def step():
            xin = leaf.transpose(1, 2) if x_in is None else x_in
            torch.autograd.grad(M.gather_tokens(xin, ids_keep, pos), [leaf, pos], up)

        return step
    if op == "scatter":
        xv = torch.randn(b, 1 + lk, dd, requires_grad=True)
        tok = torch.randn(1, 1, dd, requires_grad=True)
        pos = torch.randn(1, 1 + length, dd, requires_grad=True)
        up = torch.randn(b, 1 + length, dd)

        def step():
            out = M.scatter_tokens(xv, ids_restore, tok, pos, n_prefix=1)
            torch.autograd.grad(out, [xv, tok, pos], up)

        return step
    imgs = torch.randn(b, c, side, side)
    pred = torch.randn(b, length, patch * patch * c, requires_grad=True)
    if op == "loss":
        def step():
            loss = M.masked_patch_loss(pred, imgs, mask, patch, norm_pix=True)
            torch.autograd.grad(loss, [pred])

        return step
    # bench_mae.py's pipeline: masking, encoder gather, decoder scatter, loss, fwd+bwd
    x = torch.randn(b, length, d, requires_grad=True)
    pos = torch.randn(1, length, d)
    x_dec = torch.randn(b, 1 + lk, dd, requires_grad=True)
    tok = torch.randn(1, 1, dd, requires_grad=True)
    dec_pos = torch.randn(1, 1 + length, dd)
    g_enc, g_dec = torch.randn(b, lk, d), torch.randn(b, 1 + length, dd)

    def step():
        keep, restore, m = M.random_masking(b, length, 0.75)
        enc = M.gather_tokens(x, keep, pos)
        dec = M.scatter_tokens(x_dec, restore, tok, dec_pos, n_prefix=1)
        loss = M.masked_patch_loss(pred, imgs, m, patch, norm_pix=True)
        torch.autograd.grad([loss, enc, dec], [x, x_dec, tok, pred],
                            [torch.ones_like(loss), g_enc, g_dec])

    return step


def build_step(family, params):
    if family in ("queue", "batch", "nt_xent"):
        return _info_nce_step(family, params)
    if family == "dino":
        return _dino_step(params)
    return _mae_step(params)


def worker() -> None:
    """JSON lines on stdin/stdout: setup <case> | time <n> | quit."""
    os.environ["SELFSUP_KERNELS"] = "torch"
    import torch

    torch.set_num_threads(1)
    import selfsup.kernels as K

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the pipe
    step = None

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"file": K.__file__, "torch": torch.__version__, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "setup":
                step = None
                step = build_step(*CASES[msg["case"]])
                step()  # warm-up: allocator, lazy init
                reply({"ok": True})
            elif msg["cmd"] == "time":
                times, cpu = [], []
                for _ in range(msg["n"]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    cpu.append(time.process_time() - c0)
                    times.append(time.perf_counter() - t0)
                reply({"ok": True, "times": times, "cpu": cpu})
            else:
                return
        except Exception as e:  # the old tree may lack a feature (e.g. a dtype): report it
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"[:300]})


# ----------------------------------------------------------------------------- driver side

class Worker:
    def __init__(self, tree: Path, label: str):
        env = dict(os.environ, PYTHONPATH=str(tree), SELFSUP_KERNELS="torch",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)
        self.label = label
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=str(tree))
        self.info = self._read()
        if not self.info["file"].startswith(str(tree)):
            raise RuntimeError(f"{label} imported {self.info['file']}, not from {tree}")

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label} worker died")
        return json.loads(line)

    def ask(self, **msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


def _q(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(f * (len(xs) - 1) + 0.5))]


def measure(case, old: Worker, new: Worker, rounds: int, budget_s: float) -> dict:
    for w in (old, new):
        r = w.ask(cmd="setup", case=case)
        if not r["ok"]:
            return {"case": case, "error": f"{w.label}: {r['error']}"}
    # calls per round: about budget_s of work per side, same n for both
    probe = [w.ask(cmd="time", n=1)["times"][0] for w in (old, new)]
    n = max(1, min(50, round(budget_s / max(probe))))
    got = {(w, key): [] for w in ("old", "new") for key in ("times", "cpu")}
    ratios = []
    for r in range(rounds):
        pair = (old, new) if r % 2 == 0 else (new, old)
        this = {w.label: w.ask(cmd="time", n=n) for w in pair}
        for w in ("old", "new"):
            for key in ("times", "cpu"):
                got[w, key] += this[w][key]
        ratios.append(statistics.median(this["new"]["cpu"]) /
                      statistics.median(this["old"]["cpu"]))
    med = {k: statistics.median(v) * 1e6 for k, v in got.items()}
    ratio = med["new", "cpu"] / med["old", "cpu"]
    lo, hi = _q(ratios, 0.25), _q(ratios, 0.75)
    return {"case": case, "old_us": med["old", "cpu"], "new_us": med["new", "cpu"],
            "old_wall_us": med["old", "times"], "new_wall_us": med["new", "times"],
            "ratio": ratio, "wall_ratio": med["new", "times"] / med["old", "times"],
            "round_ratio_q25": lo, "round_ratio_q75": hi, "calls_per_side": n * rounds,
            "slower": ratio > 1.05 and lo > 1.0}


def ensure_worktree(commit: str, path: Path) -> Path:
    if not (path / "selfsup" / "kernels").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                       check=True)
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", commit], check=True,
                          capture_output=True, text=True).stdout.strip()
    if head != want:
        raise SystemExit(f"{path} is at {head}, not {commit}: remove it or pass --worktree")
    return path


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                          text=True).stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows, metas) -> str:
    """Markdown for `rows`; `metas` describes the run(s) they came from (one per run)."""
    lines = [
        "# Portable CPU paths before vs after issue 22 (1 thread, fwd+bwd)",
        "",
        "Generated by `bench/before_after.py` (method in its docstring): old and new",
        "`selfsup.kernels` in two worker processes, SELFSUP_KERNELS=torch, "
        "torch.set_num_threads(1),",
        "interleaved rounds (old/new, new/old, ...), the same number of calls per side per "
        "round.",
        "µs: median CPU time per call (process_time); ratio = new / old (< 1: faster now).",
        "round ratios: 25th-75th percentile of the per-round new/old ratios. "
        "SLOWER = ratio > 1.05",
        "and the 25th percentile > 1. Wall-clock medians beside them (noisy on a shared "
        "machine).",
        "",
        *(f"- run {i + 1} ({', '.join(meta.get('cases', ['all cases']))}): {meta['machine']}; "
          f"before `{meta['before']}`, after `{meta['after']}`; torch {meta['torch']}, "
          f"python {meta['python']}; {meta['rounds']} rounds; {meta['date']}; "
          f"load average at start {meta['load']}" for i, meta in enumerate(metas)),
        "",
        "| case | old µs | new µs | ratio | round ratios | wall old / new µs (ratio) | "
        "calls/side | verdict |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | | | | not run: {r['error']} |")
            continue
        verdict = "SLOWER" if r["slower"] else ("faster" if r["ratio"] < 0.95 else "same")
        lines.append(
            f"| {r['case']} | {r['old_us']:,.0f} | {r['new_us']:,.0f} | {r['ratio']:.3f} | "
            f"{r['round_ratio_q25']:.3f}-{r['round_ratio_q75']:.3f} | "
            f"{r['old_wall_us']:,.0f} / {r['new_wall_us']:,.0f} ({r['wall_ratio']:.2f}) | "
            f"{r['calls_per_side']} | "
            f"{verdict} |")
    return "\n".join(lines) + "\n"


def _write(text: str, out: str) -> None:
    if out == "-":
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", default=BEFORE, help="old commit (default %(default)s)")
    ap.add_argument("--worktree", type=Path, default=Path("/tmp/selfsup-before"))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget", type=float, default=0.3,
                    help="seconds of calls per side per round (default %(default)s)")
    ap.add_argument("--only", action="append", default=[],
                    help="case name substring (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/cpu/before_after.md"),
                    help="markdown path, '-' prints it")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="no timing: render the report from earlier --json runs (partial runs "
                         "with --only combine; a later file's case replaces an earlier one's)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        rows = {r["case"]: r for run in runs for r in run["rows"]}
        order = [c for c in CASES if c in rows] + [c for c in rows if c not in CASES]
        return _write(report([rows[c] for c in order], [run["meta"] for run in runs]),
                      args.out)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    tree = ensure_worktree(args.before, args.worktree)
    cases = [c for c in CASES if not args.only or any(o in c for o in args.only)]
    old, new = Worker(tree, "old"), Worker(ROOT, "new")
    rows = []
    try:
        for case in cases:
            row = measure(case, old, new, args.rounds, args.budget)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        old.close()
        new.close()
    dirty = " (+ uncommitted changes)" if _git("status", "--porcelain", "--", "selfsup") else ""
    meta = {"machine": f"{_cpu_model()}, {os.cpu_count()} cores",
            "before": f"{_git('rev-parse', '--short', args.before)} ({tree})",
            "after": f"{_git('rev-parse', '--short', 'HEAD')}{dirty}",
            "torch": new.info["torch"], "python": platform.python_version(),
            "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": load, "cases": args.only or ["all cases"]}
    _write(report(rows, [meta]), args.out)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
