"""The device prefetcher (issue 23.4): same batches, same order, errors surface, pinning.

The CUDA path (pinned memory, side stream) cannot run here; its host half (pin_views with
pin=True, non_blocking copies) is driven with a fake pin_memory, and the trainer runs with
and without prefetching to prove what it trains on is unchanged.
"""

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from selfsup.engine import trainer
from selfsup.engine.prefetch import DevicePrefetcher
from selfsup.engine.trainer import train
from selfsup.ssl import METHODS
from test_trainer import config, final_weights


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def batches(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"disk gone at batch {i}")
        g = torch.Generator().manual_seed(i)
        yield [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)], \
            torch.tensor([i, i])


def prefetcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "selfsup-device-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_the_loader_batches_in_order(depth):
    got = list(DevicePrefetcher(batches(7), torch.device("cpu"), depth=depth))
    want = list(batches(7))
    assert len(got) == 7
    for (gv, gl), (wv, wl) in zip(got, want, strict=True):
        assert torch.equal(gl, wl) and all(torch.equal(a, b) for a, b in zip(gv, wv, strict=True))


@pytest.mark.parametrize("depth", [0, 2])
def test_a_loader_error_reaches_the_consumer_at_its_batch(depth):
    seen = []
    with pytest.raises(OSError, match="disk gone at batch 3"):
        for _views, labels in DevicePrefetcher(batches(6, fail_at=3), "cpu", depth=depth):
            seen.append(int(labels[0]))
    assert seen == [0, 1, 2]
    assert not prefetcher_threads()


def test_leaving_early_stops_the_thread():
    for i, _ in enumerate(DevicePrefetcher(batches(50), "cpu", depth=2)):
        if i == 1:
            break
    assert not prefetcher_threads()


def test_pinned_path_pins_each_cpu_view_and_copies_non_blocking(monkeypatch):
    # pin_memory needs CUDA; a fake one records what would be pinned, and Tensor.to records
    # the copies (non_blocking=True is only asynchronous from pinned memory).
    pinned, copies = [], []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda t: pinned.append(tuple(t.shape)) or t.clone())
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t: False)

    def to(t, *args, **kwargs):
        copies.append(kwargs.get("non_blocking"))
        return real_to(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    out = list(DevicePrefetcher(batches(3), "cpu", depth=2, pin=True,
                                memory_format=torch.channels_last))
    assert pinned == [(2, 3, 4, 4), (2, 3, 2, 2)] * 3
    assert copies == [True] * 6
    assert all(v.is_contiguous(memory_format=torch.channels_last) for vs, _ in out for v in vs)


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="prefetch depth must be an int >= 0"):
        DevicePrefetcher(batches(1), "cpu", depth=-1)


@pytest.mark.parametrize("loader", ["portable", "dali-cpu"])
def test_training_sees_the_same_batches_with_and_without_prefetch(loader, tmp_path,
                                                                  monkeypatch):
    if loader.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    cls = METHODS["simsiam"]
    real = cls.forward
    seen: list[str] = []

    def recording(self, views):
        h = hashlib.sha256()
        for v in views:
            h.update(v.detach().contiguous().numpy().tobytes())
        seen.append(h.hexdigest())
        return real(self, views)

    monkeypatch.setattr(cls, "forward", recording)
    runs = {}
    for depth in (0, 2):
        seen.clear()
        cfg = config("simsiam", tmp_path / str(depth), "--steps", "6", "--prefetch",
                     str(depth), "--accum-steps", "2", "--batch-size", "16",
                     "--data-device", loader)
        train(cfg)
        runs[depth] = (list(seen), final_weights(Path(cfg.out)))
    assert len(runs[0][0]) == 12 and len(set(runs[0][0])) == 12
    assert runs[2][0] == runs[0][0]
    for k, w in runs[0][1].items():
        assert torch.equal(runs[2][1][k], w), k


def test_a_loader_error_stops_training_with_that_error(tmp_path, monkeypatch):
    original = trainer.make_train_loader

    class Failing:
        def __init__(self, real):
            self.real = real

        def __len__(self):
            return len(self.real)

        def __iter__(self):
            for i, batch in enumerate(self.real):
                if i == 2:
                    raise OSError("disk gone at batch 2")
                yield batch

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(trainer, "make_train_loader", lambda *a, **k: Failing(original(*a, **k)))
    with pytest.raises(OSError, match="disk gone at batch 2"):
        train(config("simsiam", tmp_path, "--steps", "5"))
    assert not prefetcher_threads()
