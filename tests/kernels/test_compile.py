"""The compile gate: every registered Triton kernel compiles for sm_80 and sm_90.

The interpreter proves the math but accepts code the real compiler rejects and hides registers
and spills. `python -m selfsup.kernels.report --check` compiles every kernel x configuration x
architecture ahead of time (no GPU needed). It must run without TRITON_INTERPRET, so these
tests drive it in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from selfsup.kernels import REGISTRY  # noqa: E402
from selfsup.kernels.report import unregistered_kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Op families whose kernels must be present (one file each in selfsup/kernels).
KERNEL_MODULES = ("selfsup.kernels.info_nce", "selfsup.kernels.dino_loss", "selfsup.kernels.mae")


def report(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "selfsup.kernels.report", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_every_jit_function_is_registered():
    assert unregistered_kernels("selfsup.kernels") == []


def test_each_kernel_family_registers_kernels():
    for module in KERNEL_MODULES:
        names = [n for n in REGISTRY if n.startswith(module + ".")]
        assert names, f"{module} registers no kernels"
        for n in names:
            assert any(c.default for c in REGISTRY[n].configs), f"{n}: no default config"


def test_the_registration_check_can_fail():
    sys.path.insert(0, str(HERE))
    before = dict(REGISTRY)
    try:
        assert unregistered_kernels("_gate_fixtures") == ["_gate_fixtures.not_registered"]
    finally:
        sys.path.remove(str(HERE))
        # Importing the fixtures registered the broken kernels in this process: forget them,
        # so the real gate below expects only the package's kernels.
        REGISTRY.clear()
        REGISTRY.update(before)


def test_all_registered_kernels_compile_for_sm80_and_sm90(tmp_path):
    out_json, out_md = tmp_path / "rows.json", tmp_path / "report.md"
    r = report("--check", "--json", str(out_json), "--out", str(out_md))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    expected = {(n, c.label, a) for n, e in REGISTRY.items() for c in e.configs for a in (80, 90)}
    assert {(r["kernel"], r["config"], r["arch"]) for r in rows} == expected
    assert all(r["ok"] for r in rows)
    hot_defaults = [r for r in rows if r["hot"] and r["default"]]
    assert all(not (r["stack"] or r["local"]) or r["spill_note"] for r in hot_defaults)
    md = out_md.read_text()
    assert md.count("\n| ") == len(rows) + 1  # header + one row per kernel x config x arch


def test_broken_kernels_fail_the_gate(tmp_path):
    r = report("--module", "_gate_fixtures", "--only", "_gate_fixtures", "--check",
               "--json", str(tmp_path / "rows.json"), "--out", str(tmp_path / "r.md"),
               timeout=600)
    assert r.returncode == 1
    rows = {(x["kernel"].split(".")[-1], x["arch"]): x
            for x in json.loads((tmp_path / "rows.json").read_text())}
    for arch in (80, 90):
        assert "must be of type tl.constexpr" in rows["arange_not_constexpr", arch]["error"]
        assert "same dtype" in rows["dot_mixed_dtypes", arch]["error"]
        spill = rows["dot_spills", arch]
        assert spill["ok"] and spill["stack"] > 0  # compiles, but spills
    assert "SPILL _gate_fixtures.dot_spills" in r.stderr
    assert "COMPILE ERROR _gate_fixtures.arange_not_constexpr" in r.stderr
