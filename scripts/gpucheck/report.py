"""The report: bench/results/gpu/<gpu>.md (tables) and <gpu>.json (every number)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import slug

BAD = ("fail", "error", "timeout", "crashed")


def _f(x, fmt="{:.3g}", none="–"):
    return none if x is None else fmt.format(x)


def summary(plan: dict, results: dict) -> dict:
    """Per section: how many cases ended in each status."""
    out = {}
    for section, ids in plan.items():
        counts: dict[str, int] = {}
        for cid in ids:
            status = results.get(section, {}).get(cid, {}).get("status", "not run")
            counts[status] = counts.get(status, 0) + 1
        out[section] = counts
    return out


def _meta_table(meta: dict, run: dict) -> list[str]:
    keys = [("GPU", "gpu"), ("compute capability", "capability"), ("SMs", "sms"),
            ("GPU memory (GiB)", "gpu_memory_gib"), ("driver", "driver"), ("torch", "torch"),
            ("CUDA (torch build)", "torch_cuda"), ("triton", "triton"), ("python", "python"),
            ("numpy", "numpy"), ("date", "date_utc"), ("git commit", "commit"),
            ("fp32 matmul precision", "fp32_matmul_precision"),
            ("TRITON_INTERPRET", "TRITON_INTERPRET"), ("CPU cores", "cpu_count")]
    lines = ["| | |", "|---|---|"]
    lines += [f"| {label} | {meta[k]} |" for label, k in keys if meta.get(k) not in (None, "")]
    lines += [f"| command | `{run['command']}` |",
              f"| wall time | {run['wall_s']:.0f} s of a {run['budget_s']:.0f} s budget "
              f"({run['worker_starts']} worker start(s)) |"]
    return lines


DRY = ("", "**Dry run**: tiny stand-in shapes on the CPU (Triton interpreted), small models "
       "for 2 fp32 steps; the numbers only prove that the script runs.")


def _kernels(plan_ids, rows) -> list[str]:
    lines = ["## (a) Kernel correctness: Triton path on this device vs float64", "",
             "Rule (selfsup.kernels.testing.assert_lowp_close): max |ours − float64| ≤ "
             "2 × max |torch in this dtype − float64| + atol (fp32 5e-4, bf16 1e-2, fp16 1e-3), "
             "on the same rounded inputs; `value` is the forward output, `d x` the gradient "
             "of input x. Entries: ours / bound.", "",
             "| op | dtype | shape | upstream | status | checks (ours / bound) |",
             "|---|---|---|---|---|---|"]
    for cid in plan_ids:
        r = rows.get(cid, {})
        if cid.count("/") != 2:  # the compile warm-up
            lines.insert(4, f"{cid}: {r.get('status', 'not run')} "
                            f"({_f(r.get('seconds'), '{:.0f}')} s) {_reason(r)}")
            lines.insert(5, "")
            continue
        checks = "; ".join(f"{'✓' if c['ok'] else '✗'} {c['name']} {c['ours']:.2e} / "
                           f"{c['bound']:.2e}" for c in r.get("checks", []))
        if not checks:
            checks = _reason(r)
        op, dt, sh = cid.split("/")
        lines.append(f"| {op} | {dt} | {sh}: {r.get('shape', '')} | {r.get('upstream', '')} | "
                     f"{r.get('status', 'not run')} | {checks} |")
    return lines


def _bench(plan_ids, rows) -> list[str]:
    ceil = next((r for cid, r in rows.items() if cid == "ceilings"), {})
    m = ceil.get("measured") or {}
    lines = ["## (b) Kernel timings at the production shapes", "",
             "µs: median (triton.testing.do_bench, L2 flushed). GB/s: the floor's minimum bytes "
             "/ time. % floor: ROOFLINE floor / time. × naive: naive time / this time. "
             "peak MB: memory the call adds. fwd = loss under no_grad; fwd+bwd = forward with "
             "gradients + autograd.grad.", "",
             f"Ceilings: copy {_f(m.get('copy_gbs'), '{:.0f}')} GB/s, bf16 matmul "
             f"{_f(m.get('bf16_tflops'), '{:.0f}')} TFLOP/s, fp32 matmul "
             f"{_f(m.get('fp32_tflops'), '{:.1f}')} TFLOP/s measured "
             f"({ceil.get('note', ceil.get('status', 'not run'))}); nominal where not measured: "
             "3000 GB/s, 790 / 66.9 TFLOP/s.", "",
             "graph µs: the same call captured as a CUDA graph and replayed (no Python "
             "launch gaps: the kernels' own time); the goal is judged on it where it exists.",
             "",
             "| case | path | pass | µs | GB/s | floor µs | % floor | graph µs | graph % floor "
             "| × naive | peak MB | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cid in plan_ids:
        if cid == "ceilings":
            continue
        r = rows.get(cid, {})
        if not r.get("timings"):
            lines.append(f"| {cid} | – | – | – | – | – | – | – | – | – | – | {_reason(r)} |")
            continue
        goal = r.get("goal") or {}
        for t in r["timings"]:
            floor = r["floor"][t["pass"]]["us"]
            g = ""
            if t["path"] == "triton" and goal.get("pass") == t["pass"]:
                g = f"≤ {goal['us']:g} µs: {'met' if goal['met'] else 'missed'}"
            if "error" in t:
                lines.append(f"| {cid} | {t['path']} | {t['pass']} | error | | {floor:.3g} | | "
                             f"| | | | {t['error'][:120]} |")
                continue
            graph = _f(t.get("graph_us"), "{:.4g}")
            if "graph_error" in t:
                graph = "not capturable"
                g = (g + "; " if g else "") + "graph: " + t["graph_error"][:100].replace("|", "/")
            lines.append(f"| {cid} | {t['path']} | {t['pass']} | {t['us']:.4g} | "
                         f"{t['gbs']:.4g} | {floor:.3g} | {t['pct_floor']:.3g} | {graph} | "
                         f"{_f(t.get('graph_pct_floor'), '{:.3g}')} | "
                         f"{_f(t.get('x_naive'), '{:.3g}')} | {_f(t.get('peak_mb'), '{:.4g}')} | "
                         f"{g} |")
    return lines


def _train(plan_ids, rows) -> list[str]:
    lines = ["## (c) Training: 20 steps per method, bf16", "",
             "img/s between logged steps 5 and 20 (warm-up excluded), images = batch rows (a "
             "DINO image counts once, whatever its crops); peak GiB: "
             "torch.cuda.max_memory_allocated over the run.", "",
             "| method | arch | mode | status | img/s | peak GiB | steps timed | last loss | "
             "run s | data / note |", "|---|---|---|---|---|---|---|---|---|---|"]
    loaders = ["", "Portable loader alone (CPU augmentation, the committed sample at the run's "
               "size):", "", "| recipe | views (C, H, W) | img/s | threads | status |",
               "|---|---|---|---|---|"]
    for cid in plan_ids:
        r = rows.get(cid, {})
        if cid.startswith("loader/"):
            shapes = ["×".join(map(str, v)) for v in r.get("views", [])]
            views = " + ".join(f"{shapes.count(v)} × {v}" for v in dict.fromkeys(shapes))
            loaders.append(f"| {cid.split('/', 1)[1]} | {views} | "
                           f"{_f(r.get('img_s'), '{:.0f}')} | {r.get('threads', '')} | "
                           f"{r.get('status', 'not run')} {_reason(r)} |")
            continue
        mode, method, arch = cid.split("/", 2)
        note = r.get("data", "") if r.get("status") == "ok" else _reason(r)
        if r.get("note") and r.get("status") == "ok":
            note += f"; {r['note']}"
        lines.append(f"| {method} | {arch} | {mode} | {r.get('status', 'not run')} | "
                     f"{_f(r.get('img_s'), '{:.0f}')} | {_f(r.get('peak_gib'), '{:.2f}')} | "
                     f"{r.get('steps_timed', '–')} | {_f(r.get('final_loss'), '{:.4f}')} | "
                     f"{_f(r.get('seconds'), '{:.1f}')} | {note} |")
    return lines + loaders


def _reason(r: dict) -> str:
    text = r.get("error") or r.get("reason") or r.get("note") or ""
    return text.replace("|", "/").replace("\n", " ")[:200]


def _problems(plan, results) -> list[str]:
    lines = []
    for section, ids in plan.items():
        for cid in ids:
            r = results.get(section, {}).get(cid, {})
            if r.get("status") in BAD:
                detail = _reason(r)
                for c in r.get("checks", []):
                    if not c["ok"]:
                        detail += f" {c.get('message', '')}"
                lines.append(f"- **{section} {cid}**: {r['status']}: {detail.strip()}")
    return ["## Problems", "", *(lines or ["None."])]


def write(out: Path, state: dict, run: dict) -> tuple[Path, Path]:
    meta, plan, results = state.get("meta", {}), state.get("plan", {}), state.get("results", {})
    name = "cpu-dry-run" if meta.get("dry_run", run.get("dry_run")) else slug(meta.get("gpu", ""))
    counts = summary(plan, results)
    md = [f"# GPU check: {meta.get('gpu', 'unknown device')}", "",
          "Written by `make gpu-check` (scripts/gpu_check.py; docs/gpu-check.md).", "",
          *_meta_table(meta, run), "", "## Summary", "",
          "| section | " + " | ".join(["cases", "statuses"]) + " |", "|---|---|---|"]
    for section, c in counts.items():
        md.append(f"| {section} | {sum(c.values())} | "
                  + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + " |")
    if meta.get("dry_run", run.get("dry_run")):
        md += list(DRY)
    if state.get("fatal"):
        md += ["", f"**The worker could not run: {state['fatal']}**"]
    for section, fn in (("kernels", _kernels), ("bench", _bench), ("train", _train)):
        if section in plan:
            md += ["", *fn(plan[section], results.get(section, {}))]
    md += ["", *_problems(plan, results), ""]
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{name}.md", out / f"{name}.json"
    md_path.write_text("\n".join(md))
    json_path.write_text(json.dumps({"meta": meta, "run": run, "summary": counts, "plan": plan,
                                     "results": results}, indent=1, default=str) + "\n")
    return md_path, json_path
