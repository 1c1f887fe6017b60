"""Issue 25.3's quality row: MAE fine-tuned vs linear probe vs random init, at equal budget.

    python bench/finetune_quality.py             # pretrain (or reuse), then every run
    python bench/finetune_quality.py --table     # the markdown table of the recorded results
    python bench/finetune_quality.py --scale 0.05  # a smoke run (writes nothing under bench/)

1. Pretrain MAE with bench/quality.py's "mae" row (= train.py's demo recipe: ViT-tiny, patch 4,
   16-px Fashion-MNIST, 520 x 128, about 6 CPU minutes). A finished run in --out is reused,
   with the figures recorded when it ran.
2. From that checkpoint, at two budgets (100 and 300 steps of 128: 0.2 and 0.64 epoch), the
   same steps, batch and data for every row of a budget, scored on Fashion-MNIST's full 10k
   test split (see RUNS for the flags and why):
   - fine-tuned: selfsup.finetune's ViT recipe (AdamW, layer decay 0.75, drop path 0.1,
     smoothing 0.1, 5% warm-up, cosine) at a peak lr of 1e-3, crops 0.5-1, no mixing;
   - fine-tuned, no layer decay: the same with --layer-decay 1.0, i.e. exactly the random-init
     row's recipe, so the pair isolates what the pretrained weights bring;
   - linear probe: `--linear-probe` (frozen encoder, BN + linear), AdamW at lr 1e-3;
   - random init: the fine-tuning from the untrained encoder, without layer decay;
   - at 300 steps only: the paper recipe as it stands (blr 5e-4, mixup / cutmix / erasing,
     crops 0.2-1), and the probe on 0.2-1 crops.
   CPU time is the process's user + sys time at one torch thread (the machine is shared;
   wall time depends on the neighbours).
Results: bench/results/finetune.json and finetune.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402  (bench/quality.py: the MAE pretraining row, CPU clock, threads)

BUDGETS, BATCH = (100, 300), 128  # steps; the last is the main budget
COMMON = ["--batch-size", str(BATCH), "--device", "cpu", "--workers", "1", "--log-every", "50",
          "--seed", "0"]
# The three compared rows share a recipe sized for 300 steps (0.64 epoch): the head's peak lr
# 1e-3 and crops of 0.5-1 for all three, no mixup / cutmix / erasing for the two fine-tunings.
# The paper's recipe as it stands, run first, is kept as its own row: its blr 5e-4 (lr 2.5e-4
# at batch 128) is sized for 100 epochs, and in 300 steps under mixup, cutmix and erasing it
# hardly moves the zero-init head (loss 2.30 -> 2.04, 41.8%); and a probe trained on 0.2-1
# crops of a 16-px image (4-px squares at the low end) scored 53.3% on whole test images.
SHORT = ["--lr", "1e-3", "--crop-scale", "0.5", "1.0"]
NO_MIXING = ["--mixup", "0", "--cutmix", "0", "--reprob", "0"]
RUNS = {  # name -> extra flags after --checkpoint RUN --steps N
    "fine-tuned": SHORT + NO_MIXING,
    # AdamW (selfsup.eval linear's probe): MAE's LARS (eta 0.001) at blr 0.1 moves a weight by
    # ~lr * 0.001 of its norm a step, made for batch 16384; at batch 128 that is 5e-5 a step,
    # and 300 steps barely leave the init.
    "linear probe": SHORT + ["--linear-probe", "--optimizer", "adamw"],
    # no layer decay from random init: it presumes pretrained lower layers (MAE's from-scratch
    # baseline has none either)
    "random init": SHORT + NO_MIXING + ["--random-init", "--layer-decay", "1.0"],
    "fine-tuned, no layer decay": SHORT + NO_MIXING + ["--layer-decay", "1.0"],
    "fine-tuned, paper recipe": ["--crop-scale", "0.2", "1.0"],
    "linear probe, crops 0.2-1": ["--crop-scale", "0.2", "1.0", "--linear-probe",
                                  "--optimizer", "adamw", "--lr", "1e-3"],
}
MAIN_BUDGET_ONLY = ("fine-tuned, paper recipe", "linear probe, crops 0.2-1")


def pretrain(out: Path, scale: float) -> tuple[dict, Path]:
    """(the pretraining row, its run folder); a finished run is reused (smoke runs too)."""
    record = out / "pretrain.json"
    if record.exists() and (out / "mae" / "checkpoint.pt").exists():
        return {**json.loads(record.read_text()), "reused": True}, out / "mae"
    root = out if scale == 1.0 else out / "smoke"  # a smoke run never replaces the real one
    row = quality.run_one("mae", scale, root)
    if scale == 1.0:
        record.write_text(json.dumps(row, indent=1) + "\n")
    return row, root / "mae"


def run_one(name: str, ckpt: Path, steps: int, out: Path) -> dict:
    from selfsup.finetune import build_parser, run

    argv = ["--checkpoint", str(ckpt), "--steps", str(steps), *COMMON, *RUNS[name],
            "--out", str(out / f"{name.replace(' ', '-').replace(',', '')}-{steps}")]
    cpu0, wall0 = quality.cpu_seconds(), time.perf_counter()
    summary = run(build_parser().parse_args(argv))
    cpu, wall = quality.cpu_seconds() - cpu0, time.perf_counter() - wall0
    if "interrupted" in summary:
        raise SystemExit(f"{name}: interrupted ({summary['interrupted']}), nothing recorded")
    s = summary["settings"]
    return dict(name=name, top1=round(summary["top1"], 4), steps=summary["steps"],
                batch=s["batch_size"], cpu_s=round(cpu, 1), wall_s=round(wall, 1),
                trained_params="head only" if s["linear_probe"] else "all",
                optimizer=s["optimizer"], peak_lr=s["peak_lr"], layer_decay=s["layer_decay"],
                command="python -m selfsup.finetune " + " ".join(argv))


def code_version() -> str:
    """HEAD, and whether the (shared) working tree had uncommitted changes when this ran."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no",
                                      "selfsup").splitlines()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def table(result: dict) -> str:
    p = result["pretrain"]
    lines = [f"MAE pretraining: {p['arch']}, {p['steps']} x {p['batch']} steps, "
             f"{p['cpu_s'] / 60:.1f} CPU min, 20-NN {100 * p['knn_random']:.1f}% (random "
             f"init) -> {100 * p['knn_trained']:.1f}% (`{p['command']}`).", "",
             "| from the MAE checkpoint | steps × batch | trained | top-1 (10k test) "
             "| CPU time | wall |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['steps']} × {r['batch']} | {r['trained_params']} | "
                     f"{100 * r['top1']:.2f}% | {r['cpu_s'] / 60:.1f} min | "
                     f"{r['wall_s'] / 60:.1f} min |")
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in result["rows"]]
    return "\n".join(lines)


def merge(path: Path, pre: dict, rows: list[dict]) -> dict:
    """The recorded result with `rows` replacing those of the same name (in RUNS' order)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    key = lambda r: (r["name"], r["steps"])  # noqa: E731
    by_key = {key(r): {"code": old.get("code"), **r} for r in old.get("rows", [])}
    by_key.update({key(r): r for r in rows})
    rows = sorted(by_key.values(), key=lambda r: (r["steps"], list(RUNS).index(r["name"])))
    return dict(pretrain=pre, rows=rows, threads=quality.torch_threads(),
                machine=platform.processor() or platform.machine(),
                total_cpu_s=round(pre["cpu_s"] + sum(r["cpu_s"] for r in rows), 1),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "finetune-bench"))
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "finetune.json"))
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                   help="a subset: their rows replace the recorded ones")
    p.add_argument("--budgets", nargs="+", type=int, choices=BUDGETS, default=list(BUDGETS),
                   help="steps of the budgets to run")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of every run's steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only print the recorded table")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.json).read_text())))
        return 0
    quality.torch_threads(a.threads)
    code = code_version()  # at the start: what the runs below import
    out = Path(a.out)
    pre, ckpt = pretrain(out, a.scale)
    print(json.dumps(pre), flush=True)
    rows = []
    for budget in a.budgets:
        steps = max(2, round(budget * a.scale))
        for name in a.runs:
            if name in MAIN_BUDGET_ONLY and budget != BUDGETS[-1]:
                continue
            rows.append({**run_one(name, ckpt, steps,
                                   out if a.scale == 1.0 else out / "smoke"), "code": code})
            print(json.dumps(rows[-1]), flush=True)
    if a.scale != 1.0:  # smoke runs never touch the recorded results
        print(table(dict(pretrain=pre, rows=rows)))
        return 0
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = merge(path, pre, rows)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
