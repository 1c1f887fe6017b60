"""The foundation: packaging, the two README commands, CI script, kernel dispatch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from selfsup.kernels import _utils
from selfsup.kernels._utils import (
    check_same_device,
    check_same_dtype,
    check_temperature,
    check_tensor,
    choose_backend,
)

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- packaging
def test_stdlib_ssl_not_shadowed_from_repo_root():
    r = run_py("import ssl; ssl.SSLContext; print(ssl.__file__)")
    assert r.returncode == 0, r.stderr
    assert "selfsup" not in r.stdout


def test_no_script_entry_points_inside_ssl_package():
    # Running a file of selfsup/ssl as a script would shadow the stdlib's ssl.
    for f in (ROOT / "selfsup" / "ssl").glob("*.py"):
        assert "__main__" not in f.read_text(), f"{f} has a __main__ block"


def test_pyproject_declares_the_agreed_dependencies():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"])
    assert "torch>=2.13,<2.15" in deps
    assert "triton>=3.6,<3.10" in deps and "platform_machine == 'x86_64'" in deps
    extras = meta["project"]["optional-dependencies"]
    assert {"dali", "xformers", "test"} <= set(extras)
    assert any("nvidia-dali-cuda120" in d for d in extras["dali"])
    ini = meta["tool"]["pytest"]["ini_options"]
    assert "tests" in ini["testpaths"]
    assert any(m.startswith("slow:") for m in ini["markers"])


def test_readme_quick_start_has_exactly_two_commands_and_ci_calls_the_test_one():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    block = readme[start:].split("```")[1]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines()[1:]
                if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci


def test_test_runner_fails_when_no_test_is_collected(tmp_path):
    # pytest exits 5 when nothing is collected; our runner must turn that into a failure.
    (tmp_path / "test_empty.py").write_text("x = 1\n")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), sys.executable,
                        str(tmp_path), "-p", "no:cacheprovider", "-q"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "collected no tests" in r.stderr


# ----------------------------------------------------------------------------- kernels import
def test_kernels_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, selfsup.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "from selfsup.kernels._utils import have_triton; assert not have_triton()\n"
        "assert k.choose_backend(torch.zeros(2)) == 'torch'\n"
        "import os; os.environ['SELFSUP_KERNELS'] = 'triton'\n"
        "try:\n"
        "    k.choose_backend(torch.zeros(2)); raise SystemExit('no error')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "print('ok')\n"
    )
    r = run_py(code, env={"TRITON_INTERPRET": "1", "SELFSUP_KERNELS": ""})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


# ----------------------------------------------------------------------------- dispatch
def test_backend_defaults_to_triton_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(3)
    expected = "triton" if _utils.have_triton() else "torch"
    assert choose_backend(x) == expected
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend(x) == "torch"


@pytest.mark.parametrize("name", ["torch", "ref"])
def test_backend_can_be_forced(monkeypatch, name):
    monkeypatch.setenv("SELFSUP_KERNELS", name)
    assert choose_backend(torch.zeros(3)) == name


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_backend(torch.zeros(3))


def test_unknown_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SELFSUP_KERNELS"):
        choose_backend(torch.zeros(3))


# ----------------------------------------------------------------------------- validation
def test_check_tensor_names_the_argument():
    with pytest.raises(ValueError, match="queue must be 2-D"):
        check_tensor("queue", torch.zeros(3), ndim=2)
    with pytest.raises(ValueError, match="q must have dtype"):
        check_tensor("q", torch.zeros(3, 3, dtype=torch.int64), ndim=2)
    with pytest.raises(ValueError, match="k must be a torch.Tensor"):
        check_tensor("k", [1.0, 2.0])
    assert check_tensor("q", torch.zeros(2, 2), ndim=(2, 3)).shape == (2, 2)


def test_check_device_and_dtype_list_every_input():
    a, b = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="q on cpu, k on meta"):
        check_same_device(q=a, k=b)
    with pytest.raises(ValueError, match="k is torch.float16"):
        check_same_dtype(q=a, k=a.half())
    assert check_same_dtype(q=a, k=None) == torch.float32


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "x", torch.ones(2)])
def test_check_temperature_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="temperature"):
        check_temperature("temperature", bad)


def test_check_temperature_accepts_scalars():
    assert check_temperature("t", 0.04) == pytest.approx(0.04)
    assert check_temperature("t", torch.tensor(0.2)) == pytest.approx(0.2)


def test_dist_helpers_are_identity_without_a_process_group():
    from selfsup import dist

    x = torch.arange(4.0, requires_grad=True)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_gather_with_grad(x) is x
    assert torch.equal(dist.all_reduce_mean(x.detach().clone()), x.detach())


# ----------------------------------------------------------------------------- GPU dispatch
def _fake_cuda(dtype=torch.float32, device="cuda"):
    """A tensor that reports a CUDA device without a GPU (FakeTensorMode: metadata only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(4, 8, dtype=dtype, device=device)


def test_float64_cuda_tensors_take_the_portable_path(monkeypatch):
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _utils.have_triton():
        pytest.skip("triton is not installed")
    assert choose_backend(_fake_cuda(torch.float32)) == "triton"
    assert choose_backend(_fake_cuda(torch.float64)) == "torch"
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="float64 CUDA"):
        choose_backend(_fake_cuda(torch.float64))


def test_a_caller_reason_sends_triton_inputs_to_the_portable_path(monkeypatch):
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(3)
    assert choose_backend(x, unsupported="C=1024 > 512") == "torch"
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="C=1024 > 512"):
        choose_backend(x, unsupported="C=1024 > 512")


def test_interpreting_cuda_tensors_warns_once(monkeypatch):
    if not _utils.have_triton():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("SELFSUP_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _utils._warn_interpreting_cuda.cache_clear()
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        assert choose_backend(_fake_cuda()) == "triton"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_backend(_fake_cuda())  # the second time: silent


def test_device_guard_enters_the_tensors_device(monkeypatch):
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with _utils.device_guard(_fake_cuda(device="cuda:1")):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _utils.device_guard(torch.zeros(2)):  # CPU: no CUDA call at all
        pass
    assert len(entered) == 1


def test_tf32_setting_is_read_from_the_new_api_per_call():
    code = (
        "import torch\n"
        "from selfsup.kernels._utils import fp32_matmul_allows_tf32 as f\n"
        "assert f() is False\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "assert f() is True\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "assert f() is False\n"
        "torch.backends.cuda.matmul.fp32_precision = 'none'\n"
        "torch.backends.fp32_precision = 'tf32'\n"
        "assert f() is True  # inherited from the global setting\n"
        "print('ok')\n"
    )
    r = run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_tf32_setting_follows_the_legacy_flag_too():
    code = (
        "import torch\n"
        "from selfsup.kernels._utils import fp32_matmul_allows_tf32 as f\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "assert f() is True\n"
        "torch.backends.cuda.matmul.allow_tf32 = False\n"
        "assert f() is False\n"
        "print('ok')\n"
    )
    r = run_py(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
