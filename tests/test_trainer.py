"""The trainer end to end on tiny runs: every method, resume, NaN stop, SIGTERM, bad checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as train_cli
from selfsup.engine import checkpoint as ckpt
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.trainer import NonFiniteLossError, method_class, train
from selfsup.ssl import METHODS

ROOT = Path(__file__).resolve().parents[1]
# Small everything: the committed sample, 16-px images, narrow heads, the portable loader.
TINY = ["--data", "fashion-mnist-sample", "--img-size", "16", "--batch-size", "32",
        "--device", "cpu", "--data-device", "portable", "--workers", "1", "--knn-every", "-1",
        "--log-every", "1", "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "32",
        "--queue-size", "96", "--out-dim", "128", "--n-local", "2", "--decoder-dim", "32",
        "--decoder-depth", "1"]
ARCH = {"mae": "vit_tiny", "dino": "vit_tiny", "ibot": "vit_tiny", "dinov2": "vit_tiny"}


def config(method: str, tmp_path: Path, *extra: str):
    argv = ["--method", method, "--arch", ARCH.get(method, "resnet_tiny"), *TINY,
            "--out", str(tmp_path / method), *extra]
    args = vars(build_parser().parse_args(argv))
    return resolve(args, method_class(method).preset)


def read_log(run: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    # The fused kernels are proven against their references in tests/kernels; here the
    # interpreter would only slow the loop down. One test below runs them through Triton.
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_a_few_steps(method, tmp_path):
    cfg = config(method, tmp_path, "--steps", "3")
    summary = train(cfg)
    assert summary["steps"] == 3
    rows = read_log(Path(cfg.out))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    state = ckpt.load(cfg.out)
    assert state["step"] == 3 and state["config"]["method"] == method
    assert (Path(cfg.out) / "config.json").is_file()


def test_fused_triton_kernels_drive_a_training_step(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SELFSUP_KERNELS", "triton")  # CPU: through the interpreter
    cfg = config("mocov2", tmp_path, "--steps", "2", "--batch-size", "8", "--queue-size", "16")
    assert train(cfg)["steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in read_log(Path(cfg.out)))


def test_dino_updates_center_and_teacher_lags_student(tmp_path):
    cfg = config("dino", tmp_path, "--steps", "3", "--lr", "1e-3")
    train(cfg)
    method, _, _ = ckpt.load_method(cfg.out)
    assert method.criterion.center.abs().sum() > 0
    diffs = [(p - q).abs().max().item() for p, q in
             zip(method.backbone.parameters(), method.t_backbone.parameters(), strict=True)]
    assert max(diffs) > 0  # the EMA teacher trails the student
    # evaluated and exported: the teacher (as in DINO); monitored for gradients: the student
    assert method.encoder() is method.t_backbone
    assert method.trained_encoder() is method.backbone
    rows = read_log(Path(cfg.out))
    assert all(r["teacher_entropy"] > 0 and "kl" in r for r in rows)
    assert all(r["grad_norm_first_layer"] > 0 for r in rows)


def test_mae_masks_three_quarters(tmp_path):
    cfg = config("mae", tmp_path, "--steps", "2")
    train(cfg)
    assert all(r["masked_fraction"] == pytest.approx(0.75) for r in read_log(Path(cfg.out)))
    method, _, _ = ckpt.load_method(cfg.out)
    assert method.encoder().global_pool == "avg"  # features: mean patch token, not cls


def test_mae_loss_reaches_masked_patches_only(tmp_path, monkeypatch):
    # After a trained step or two: the gradient of the loss w.r.t. the decoder's per-patch
    # prediction is exactly 0 on every visible patch and nonzero on the masked ones.
    import selfsup.ssl.mae as mae_mod

    cfg = config("mae", tmp_path, "--steps", "2", "--mask-ratio", "0.6")
    train(cfg)
    method, _, _ = ckpt.load_method(cfg.out)
    seen = {}
    real_masking = mae_mod.random_masking

    def recording_masking(*args, **kwargs):
        out = real_masking(*args, **kwargs)
        seen["mask"] = out[2]
        return out

    def keep_pred(_module, _inputs, pred):
        pred.retain_grad()
        seen["pred"] = pred

    monkeypatch.setattr(mae_mod, "random_masking", recording_masking)
    method.decoder.register_forward_hook(keep_pred)
    imgs = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    (method([imgs])["loss"] * 1.7).backward()
    mask, grad = seen["mask"].bool(), seen["pred"].grad  # (B, L), (B, L, p*p*C)
    assert mask.float().mean().item() == pytest.approx(0.6, abs=0.07)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask].abs().sum(-1) > 0)


# ----------------------------------------------------------------------------- resume
def final_weights(run: Path) -> dict:
    return ckpt.load(run)["model"]


def test_resume_gives_identical_weights(tmp_path):
    # The schedule comes from --epochs, so 6 straight and 3 + 3 share it exactly.
    common = ("--epochs", "1", "--shuffle-bn")
    straight = config("mocov2", tmp_path / "a", "--steps", "6", *common)
    train(straight)
    first = config("mocov2", tmp_path / "b", "--steps", "3", *common)
    train(first)
    second = config("mocov2", tmp_path / "b", "--steps", "6", "--resume", "auto", *common)
    summary = train(second)
    assert summary["steps"] == 6
    a, b = final_weights(Path(straight.out)), final_weights(Path(second.out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ckpt.load(second.out)["step"] == 6


def test_channels_last_trains_the_same_weights_in_nhwc(tmp_path):
    # The same 3 BYOL steps in NCHW and NHWC: equal weights up to the convolutions' summation
    # order, and the NHWC run really keeps its conv weights channels-last.
    nchw = config("byol", tmp_path / "a", "--steps", "3")
    train(nchw)
    nhwc = config("byol", tmp_path / "b", "--steps", "3", "--channels-last")
    train(nhwc)
    a, b = final_weights(Path(nchw.out)), final_weights(Path(nhwc.out))
    convs = [k for k, v in b.items() if v.dim() == 4]
    assert convs and all(b[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not all(a[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_cifar_stem_flag_picks_the_resnet_stem(tmp_path):
    # Default at <= 64 px: the 3x3 stride-1 stem without max-pool; --no-cifar-stem keeps the
    # ImageNet 7x7/2 stem + max-pool (4x fewer positions from layer1 on). ViTs refuse the flag.
    stems = {}
    for flag in ([], ["--no-cifar-stem"], ["--cifar-stem"]):
        cfg = config("byol", tmp_path / (flag[0] if flag else "default"), "--img-size", "28",
                     *flag)
        enc = method_class(cfg)(cfg).backbone
        stems[tuple(flag)] = (enc.conv1.kernel_size, enc.conv1.stride, type(enc.maxpool).__name__)
    assert stems[()] == stems[("--cifar-stem",)] == ((3, 3), (1, 1), "Identity")
    assert stems[("--no-cifar-stem",)] == ((7, 7), (2, 2), "MaxPool2d")
    cfg = config("byol", tmp_path / "s", "--img-size", "28", "--no-cifar-stem", "--steps", "2")
    assert train(cfg)["steps"] == 2
    assert json.loads((Path(cfg.out) / "config.json").read_text())["cifar_stem"] is False
    vit = config("mae", tmp_path / "v", "--cifar-stem")
    with pytest.raises(ValueError, match="--cifar-stem applies to ResNets only"):
        method_class(vit)(vit)


# ----------------------------------------------------------------------------- failures
def test_nan_loss_stops_with_a_diagnostic_checkpoint(tmp_path, monkeypatch):
    cfg = config("simclr", tmp_path, "--steps", "5")
    cls = METHODS["simclr"]
    real = cls.forward
    calls = {"n": 0}

    def poisoned(self, views):
        out = real(self, views)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(cls, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 2 of method simclr with lr") as e:
        train(cfg)
    diag = Path(cfg.out) / "diagnostic-step2.pt"
    assert str(diag) in str(e.value)
    assert ckpt.load(diag)["step"] == 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SELFSUP_KERNELS": "torch", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--method", "simclr", "--arch",
           "resnet_tiny", *TINY, "--steps", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            log = out / "log.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never logged two steps")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    assert "received SIGTERM" in stdout
    step = ckpt.load(out)["step"]
    assert 2 <= step < 100000


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    rc = train_cli.main(["--method", "byol", "--arch", "resnet_tiny", *TINY, "--steps", "1",
                         "--out", str(run), "--resume", "auto"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "checkpoint.pt" in err


def test_resume_refuses_another_method(tmp_path, capsys):
    cfg = config("byol", tmp_path, "--steps", "1")
    train(cfg)
    rc = train_cli.main(["--method", "simclr", "--arch", "resnet_tiny", *TINY, "--steps", "2",
                         "--out", cfg.out, "--resume", "auto"])
    assert rc == 2 and "trained with --method byol" in capsys.readouterr().err


def test_bad_method_name_is_rejected(capsys):
    with pytest.raises(ValueError, match="--method must be one of"):
        method_class("mocov9")


def test_knn_monitor_beyond_the_cpu_budget_is_skipped_with_a_message(tmp_path, monkeypatch,
                                                                       capsys):
    from selfsup.engine import trainer

    monkeypatch.setattr(trainer, "KNN_CPU_BUDGET_FLOP", 1e6)  # far below any real encoder
    cfg = config("byol", tmp_path, "--steps", "1", "--knn-every", "0")
    summary = train(cfg)
    assert "knn_skipped" in summary and "knn_trained" not in summary
    captured = capsys.readouterr()
    assert "k-NN monitor skipped" in captured.out + captured.err
    assert read_log(Path(cfg.out), "knn") == []


def test_fractional_knn_every_scores_within_the_epoch(tmp_path):
    cfg = config("simclr", tmp_path, "--steps", "7", "--knn-every", "0.1",
                 "--knn-train-size", "64", "--knn-test-size", "32")
    summary = train(cfg)
    every = max(1, round(0.1 * cfg.extra["steps_per_epoch"]))
    rows = read_log(Path(cfg.out), "knn")
    expected = [0, *range(every, 7, every), 7]
    assert [r["step"] for r in rows] == expected
    assert rows[-1]["tag"] == "trained" and summary["knn_trained"] == rows[-1]["knn_top1"]
