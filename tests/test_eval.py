"""selfsup.eval: the two protocols pool as the method does, progress with img/s and ETA, the
default subset and --full, autocast choice."""

import io

import pytest
import torch

from selfsup import eval as eval_cli
from selfsup.data import build_loader, load_fashion_mnist_sample
from selfsup.models import build_backbone


@pytest.fixture(autouse=True)
def portable_paths(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize("n_tune", [0, 1, 2])
def test_tuned_features_equal_the_frozen_encoder_for_both_poolings(pool, n_tune):
    """The review finding (MAE): --tune-blocks took the cls token while the frozen probe
    (encoder()) averages the patch tokens. feature(tuned(prefix(x))) must be encoder(x)."""
    torch.manual_seed(0)
    enc = build_backbone("vit_tiny", img_size=16, patch_size=4).eval()
    enc.global_pool = pool
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    enc = enc.double()
    prefix, _, feature = eval_cli.split_encoder(enc, n_tune)
    with torch.no_grad():
        torch.testing.assert_close(feature(prefix(x)), enc(x), rtol=1e-12, atol=1e-12)
        # the check can fail: the other pooling gives other features
        other = "token" if pool == "avg" else "avg"
        assert (feature(prefix(x)) - build_ref(enc, x, other)).abs().max() > 1e-3


def build_ref(enc, x, pool):
    tokens = enc.forward_features(x)
    return tokens[:, 1:].mean(1) if pool == "avg" else tokens[:, 0]


def test_tuned_features_equal_the_frozen_resnet():
    torch.manual_seed(0)
    enc = build_backbone("resnet_tiny", cifar_stem=True).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for n in range(5):
        prefix, _, feature = eval_cli.split_encoder(enc, n)
        with torch.no_grad():
            torch.testing.assert_close(feature(prefix(x)), enc(x), rtol=1e-12, atol=1e-12)


def test_mae_method_pools_by_average_and_eval_follows():
    from selfsup.engine.config import resolve
    from selfsup.engine.trainer import method_class

    cfg = resolve({"method": "mae", "arch": "vit_tiny", "img_size": 16, "patch_size": 4,
                   "decoder_dim": 32, "decoder_depth": 1}, method_class("mae").preset)
    enc = method_class("mae")(cfg).encoder().eval()
    assert enc.global_pool == "avg"
    x = torch.randn(2, 3, 16, 16)
    prefix, _, feature = eval_cli.split_encoder(enc, 1)
    with torch.no_grad():
        torch.testing.assert_close(feature(prefix(x)), enc(x))


def test_progress_reports_images_rate_and_eta():
    data = load_fashion_mnist_sample("test")
    loader = build_loader(data, "eval", 100, device="portable", drop_last=False, img_size=8)
    out = io.StringIO()
    n = sum(len(y) for _, y in eval_cli.progress(loader, "test features", out, every=0.0))
    lines = out.getvalue().strip().splitlines()
    assert n == 500 and len(lines) == 5
    assert lines[0].startswith("test features: 100/500 images, ") and " img/s, ETA " in lines[0]
    assert lines[-1].startswith("test features: 500/500 images") and lines[-1].endswith("ETA 0s")


def test_default_subset_and_full(monkeypatch):
    seen = {}

    class Args:
        data = test_data = knn_data = None
        unlabeled = False
        train_size = test_size = None
        full = False
        batch_size = 64
        data_device = "portable"

    from selfsup.engine.config import Config

    cfg = Config(data="fashion-mnist-sample", img_size=8)
    monkeypatch.setattr(eval_cli, "DEFAULT_TRAIN_SIZE", 300)
    monkeypatch.setattr(eval_cli, "DEFAULT_TEST_SIZE", 100)
    tr, te, n_cls, note = eval_cli.loaders(cfg, Args)
    seen["default"] = (tr.num_samples, te.num_samples)
    assert "300 of 2000 train" in note and "--full" in note and n_cls == 10
    Args.full = True
    tr, te, _, note = eval_cli.loaders(cfg, Args)
    assert (tr.num_samples, te.num_samples) == (2000, 500) and "--full" not in note
    Args.full, Args.train_size, Args.test_size = False, 0, 50
    tr, te, _, _ = eval_cli.loaders(cfg, Args)
    assert (tr.num_samples, te.num_samples) == (2000, 50)
    assert seen["default"] == (300, 100)


def test_negative_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["knn", "--checkpoint", "x", "--train-size", "-1"])
    assert "--train-size must be >= 0" in capsys.readouterr().err
