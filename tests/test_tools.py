"""The tools around a run: k-NN / linear evaluation, the pictures, and the weight export."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup import eval as eval_cli
from selfsup import export as export_cli
from selfsup import visualize
from selfsup.data.datasets import load_dataset
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.trainer import method_class, train
from selfsup.models import build_backbone

TINY = ["--data", "fashion-mnist-sample", "--img-size", "16", "--patch-size", "4",
        "--batch-size", "16", "--device", "cpu", "--data-device", "portable", "--workers", "1",
        "--knn-every", "-1", "--proj-hidden", "32", "--proj-dim", "16", "--out-dim", "64",
        "--n-local", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--steps", "2"]


@pytest.fixture(autouse=True)
def portable_paths(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def trained_run(tmp_path_factory, method: str, arch: str = "vit_tiny"):
    out = tmp_path_factory.mktemp(method) / "run"
    argv = ["--method", method, "--arch", arch, *TINY, "--out", str(out)]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(method).preset)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "dino")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "mae")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    images = load_dataset("fashion-mnist-sample", "test").images
    path = tmp_path_factory.mktemp("img") / "item.png"
    Image.fromarray(images[0]).save(path)
    return path


def last_number(out: str, key: str) -> float:
    line = out.strip().splitlines()[-1]
    assert line.startswith(key + " "), line
    return float(line.split()[-1])


def test_knn_eval_prints_accuracy_for_trained_and_random_init(dino_run, capsys):
    args = ["knn", "--checkpoint", str(dino_run), "--train-size", "300", "--test-size", "100",
            "--device", "cpu", "--data-device", "portable"]
    assert eval_cli.main(args) == 0
    trained = last_number(capsys.readouterr().out, "knn_top1")
    assert eval_cli.main(args + ["--random-init"]) == 0
    random_init = last_number(capsys.readouterr().out, "knn_top1")
    assert 0.0 <= trained <= 1.0 and 0.0 <= random_init <= 1.0
    assert trained > 0.2 and random_init > 0.2  # 10 classes: well above chance either way


def test_linear_probe_with_partial_fine_tuning(mae_run, capsys):
    args = ["linear", "--checkpoint", str(mae_run), "--train-size", "200", "--test-size", "100",
            "--epochs", "2", "--tune-blocks", "1", "--device", "cpu",
            "--data-device", "portable"]
    assert eval_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "1 tuned blocks" in out
    assert 0.0 <= last_number(out, "linear_top1") <= 1.0


def test_eval_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert eval_cli.main(["knn", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def check_picture(path, min_side: int) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert min(img.shape[:2]) >= min_side
    assert img.std() > 1.0, "the picture is constant"
    return img


def test_attention_picture(dino_run, image_file, tmp_path):
    out = tmp_path / "attn.png"
    assert visualize.main(["attention", "--checkpoint", str(dino_run), "--image",
                           str(image_file), "--out", str(out)]) == 0
    img = check_picture(out, 16)
    heads = build_backbone("vit_tiny", img_size=16, patch_size=4).blocks[-1].attn.num_heads
    assert img.shape[1] >= heads * 16  # the image plus one panel per head


def test_reconstruction_picture(mae_run, image_file, tmp_path):
    out = tmp_path / "recon.png"
    assert visualize.main(["reconstruction", "--checkpoint", str(mae_run), "--image",
                           str(image_file), "--out", str(out)]) == 0
    img = check_picture(out, 16)
    assert img.shape[1] >= 3 * 16  # original / masked / reconstructed


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_export_loads_back_with_identical_features(dino_run, tmp_path, fmt, capsys):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    out = tmp_path / f"vit.{fmt}"
    assert export_cli.main(["--checkpoint", str(dino_run), "--out", str(out),
                            "--format", fmt]) == 0
    assert "timm key names" in capsys.readouterr().out
    method, _, _ = export_cli.load_method(str(dino_run))
    ours = method.encoder().eval()
    fresh = build_backbone("vit_tiny", img_size=16, patch_size=4).eval()
    sd = export_cli.load_exported(out)
    assert "patch_embed.proj.weight" in sd and "cls_token" in sd  # timm names
    from selfsup.models import load_backbone_state_dict

    load_backbone_state_dict(fresh, sd)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x), rtol=0, atol=0)
