"""`make gpu-check --dry-run`: the whole GPU check on CPU at tiny shapes, so the few minutes a
GPU is lent cannot be lost to a typo (scripts/gpu_check.py, docs/gpu-check.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfsup.ssl import METHODS

ROOT = Path(__file__).resolve().parents[1]
OPS = ("info_nce_queue", "info_nce_batch", "nt_xent", "dino_loss", "gather_tokens",
       "scatter_tokens", "masked_patch_loss")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    md, js = out / "cpu-dry-run.md", out / "cpu-dry-run.json"
    assert md.is_file() and js.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, md.read_text(), json.loads(js.read_text())


def test_runs_and_writes_every_section(dry_run):
    proc, md, data = dry_run
    # 0: all passed, 1: some case failed (named in the report); 2 or a crash: the script broke
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    for heading in ("## Summary", "## (a) Kernel correctness", "## (b) Kernel timings",
                    "## (c) Training", "## Problems"):
        assert heading in md
    assert set(data["plan"]) == {"kernels", "bench", "train"}
    for section, ids in data["plan"].items():
        for cid in ids:  # nothing was lost to the budget, a timeout or a crash
            status = data["results"][section][cid]["status"]
            assert status not in ("not run", "skipped", "timeout", "crashed", "error"), (
                section, cid, data["results"][section][cid])


def test_every_kernel_is_checked_in_every_dtype(dry_run):
    _, md, data = dry_run
    rows = data["results"]["kernels"]
    for op in OPS:
        for dtype in ("fp32", "bf16", "fp16"):
            for shape in ("odd", "prod"):
                r = rows[f"{op}/{dtype}/{shape}"]
                assert r["status"] in ("pass", "fail")
                assert r["checks"][0]["name"] == "value" and len(r["checks"]) >= 2  # + grads
                if dtype == "fp32":  # the interpreter computes fp32 exactly like a GPU
                    assert r["status"] == "pass", r
            assert f"| {op} | {dtype} | odd:" in md


def test_every_kernel_is_timed_beside_naive_and_floor(dry_run):
    _, md, data = dry_run
    rows = data["results"]["bench"]
    timed_ops = {cid.split("/")[0] for cid in rows if cid != "ceilings"}
    assert timed_ops == set(OPS)
    for cid, r in rows.items():
        if cid == "ceilings":
            continue
        paths = {(t["path"], t["pass"]) for t in r["timings"] if t.get("us", 0) > 0}
        assert paths == {(p, q) for p in ("triton", "torch", "naive")
                         for q in ("fwd", "fwd+bwd")}, r
        assert all(f["us"] > 0 for f in r["floor"].values())
        assert f"| {cid} | triton | fwd+bwd |" in md


def test_every_method_trains_on_both_archs(dry_run):
    _, md, data = dry_run
    rows = data["results"]["train"]
    archs = {cid.split("/", 2)[2] for cid in rows if cid.startswith("eager/")}
    assert len(archs) == 2
    for method in METHODS:
        for arch in archs:
            eager = rows[f"eager/{method}/{arch}"]
            assert eager["status"] in ("ok", "n/a"), eager
            if eager["status"] == "ok":
                assert eager["img_s"] > 0 and eager["steps"] == 2
            else:  # only a ViT-only method (MAE, iBOT, DINOv2) may refuse, on the ResNet
                assert "resnet" in arch and "ViT" in eager["note"], eager
            compiled = rows[f"compile/{method}/{arch}"]  # one runs where train.py has it
            assert compiled["status"] in ("ok", "n/a", "not available", "dry-run skip"), compiled
            assert f"| {method} | {arch} | eager |" in md
            assert f"| {method} | {arch} | compile |" in md
    assert {cid for cid in rows if cid.startswith("loader/")}


def test_supervisor_survives_a_crash_and_a_hang(tmp_path):
    """A case that kills its worker is recorded as crashed and the next worker goes on; a
    case that hangs is killed at the deadline; the report is still written (exit code 1)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               GPU_CHECK_FAULT="kernels/info_nce_queue/fp32/odd=crash,"
                               "kernels/info_nce_queue/fp16/odd=hang")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                           "--sections", "kernels", "--budget", "25", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    rows = data["results"]["kernels"]
    assert rows["info_nce_queue/fp32/odd"]["status"] == "crashed"
    assert "exit code 7" in rows["info_nce_queue/fp32/odd"]["reason"]
    assert rows["info_nce_queue/bf16/odd"]["status"] == "pass"  # ran in the second worker
    assert rows["info_nce_queue/fp16/odd"]["status"] == "timeout"
    assert rows["masked_patch_loss/fp16/prod"]["status"] == "not run"
    assert data["run"]["worker_starts"] == 2
    assert data["run"]["wall_s"] < 60  # the 25 s budget, two worker starts, the report
    assert "crashed" in (tmp_path / "cpu-dry-run.md").read_text()
