"""--accum-steps N (issue 23.3): N micro-batches of B per optimizer step.

For a loss that is a mean over independent samples (MAE, with the masks fixed) the step is
the step of one batch of N x B. Methods with batch statistics or in-batch negatives see
B images at a time and differ by design (docs/training.md).
"""

import copy
import math
from pathlib import Path

import pytest
import torch

import selfsup.ssl.mae as mae_mod
from selfsup.data import load_dataset
from selfsup.engine import checkpoint as ckpt
from selfsup.engine.step import NonFiniteWatch, forward_backward
from selfsup.engine.trainer import method_class, train
from selfsup.ssl import METHODS
from test_trainer import config, final_weights, read_log

B, N = 4, 3


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def build(name: str, tmp_path: Path):
    torch.manual_seed(0)
    cfg = config(name, tmp_path)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=10)
    return method_class(name)(cfg)


def sgd_step(method, micro_batches) -> dict:
    """One optimizer step over the micro-batches: the parameters after it."""
    opt = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    opt.zero_grad(set_to_none=True)
    out = forward_backward(method, scaler, micro_batches, step=0,
                           watch=NonFiniteWatch(torch.device("cpu")), amp_dtype=None,
                           device_type="cpu")
    opt.step()
    method.on_step_end(0, 10)
    return {"loss": out["loss"], "params": {k: v.detach().clone()
                                            for k, v in method.named_parameters()}}


def fixed_masks(monkeypatch, n_images: int, n_patches: int, ratio: float) -> None:
    """random_masking hands out rows of one precomputed draw for n_images, in order, so
    one batch of N*B and N micro-batches of B see the same mask on each image."""
    torch.manual_seed(7)
    full = mae_mod.random_masking(n_images, n_patches, ratio, device="cpu")
    pos = {"at": 0}

    def masking(b, length, mask_ratio, device=None):
        assert (length, mask_ratio) == (n_patches, ratio)
        lo = pos["at"]
        pos["at"] = (lo + b) % n_images
        return tuple(t[lo:lo + b] for t in full)

    monkeypatch.setattr(mae_mod, "random_masking", masking)


def micro(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [[v[i * B:(i + 1) * B] for v in views] for i in range(N)]


def test_mae_micro_batches_give_the_big_batch_step(tmp_path, monkeypatch):
    method = build("mae", tmp_path)
    other = copy.deepcopy(method)
    fixed_masks(monkeypatch, N * B, method.backbone.num_patches, method.mask_ratio)
    imgs = torch.randn(N * B, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    big = sgd_step(method, [[imgs]])
    acc = sgd_step(other, micro([imgs]))
    torch.testing.assert_close(acc["loss"], big["loss"], rtol=1e-6, atol=1e-7)
    moved = 0
    for k, p in big["params"].items():
        torch.testing.assert_close(acc["params"][k], p, rtol=1e-5, atol=1e-7, msg=k)
        moved += int(not torch.equal(p, dict(build("mae", tmp_path).named_parameters())[k]))
    assert moved > len(big["params"]) // 2  # the step really changed the weights


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_in_batch_negatives_and_batchnorm_differ_by_design(name, tmp_path):
    # SimCLR's negatives are the other images of the micro-batch, and BatchNorm normalizes
    # by the micro-batch's statistics: N x B accumulated is not one batch of N x B.
    method = build(name, tmp_path)
    other = copy.deepcopy(method)
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(N * B, 3, 16, 16, generator=g) for _ in range(2)]
    big, acc = sgd_step(method, [views]), sgd_step(other, micro(views))
    assert not torch.allclose(acc["loss"], big["loss"], rtol=1e-3)
    diff = max((acc["params"][k] - p).abs().max().item() for k, p in big["params"].items())
    assert diff > 1e-4


def test_accum_schedules_count_optimizer_steps(tmp_path, monkeypatch):
    counts = {"forward": 0, "on_step_end": []}
    cls = METHODS["simsiam"]
    real_fwd, real_end = cls.forward, cls.on_step_end

    def forward(self, views):
        counts["forward"] += 1
        assert len(views[0]) == 8  # micro-batches of --batch-size
        return real_fwd(self, views)

    def on_step_end(self, step, total):
        counts["on_step_end"].append((step, total))
        return real_end(self, step, total)

    monkeypatch.setattr(cls, "forward", forward)
    monkeypatch.setattr(cls, "on_step_end", on_step_end)
    cfg = config("simsiam", tmp_path, "--batch-size", "8", "--accum-steps", str(N),
                 "--epochs", "1", "--steps", "4", "--blr", "0.05")
    summary = train(cfg)
    assert summary["steps"] == 4
    images = len(load_dataset("fashion-mnist-sample", "train"))
    per_epoch = images // 8 // N  # optimizer steps: whole groups of N micro-batches
    assert cfg.extra["steps_per_epoch"] == per_epoch == cfg.extra["schedule_steps"]
    assert counts["forward"] == 4 * N
    assert counts["on_step_end"] == [(s, per_epoch) for s in range(4)]
    assert cfg.peak_lr(1) == pytest.approx(0.05 * 8 * N / 256)  # the effective batch
    rows = read_log(Path(cfg.out))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["epoch"] == pytest.approx(1 / per_epoch)


def test_resume_with_accum_gives_identical_weights(tmp_path):
    common = ("--epochs", "1", "--accum-steps", "2", "--batch-size", "16")
    straight = config("simsiam", tmp_path / "a", "--steps", "4", *common)
    train(straight)
    first = config("simsiam", tmp_path / "b", "--steps", "2", *common)
    train(first)
    second = config("simsiam", tmp_path / "b", "--steps", "4", "--resume", "auto", *common)
    assert train(second)["steps"] == 4
    a, b = final_weights(Path(straight.out)), final_weights(Path(second.out))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ckpt.load(second.out)["config"]["accum_steps"] == 2


def test_moco_queue_takes_every_micro_batch_keys(tmp_path):
    method = build("mocov2", tmp_path)
    ptr = int(method.queue.ptr)
    views = [torch.randn(N * B, 3, 16, 16) for _ in range(2)]
    sgd_step(method, micro(views))
    assert int(method.queue.ptr) == (ptr + N * B) % method.queue.size


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_bad_accum_steps_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="--accum-steps must be an int >= 1"):
        train(config("simsiam", tmp_path, "--accum-steps", bad, "--steps", "1"))
