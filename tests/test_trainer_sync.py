"""The loop never waits for the device between checks (issue 23.2), and still stops on NaN.

Host syncs are counted by patching every Tensor method that reads a value back to Python
(item, __float__, __int__, __bool__, tolist) and torch.distributed.all_reduce, on the main
thread only (the loader's threads build CPU batches; they never wait for the GPU).
"""

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from selfsup.engine import checkpoint as ckpt
from selfsup.engine.step import NonFiniteWatch, read_scalars
from selfsup.engine.trainer import NonFiniteLossError, train
from selfsup.ssl import METHODS
from test_trainer import config, read_log

READS = ("item", "__float__", "__int__", "__bool__", "tolist")


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


@pytest.fixture
def sync_counter(monkeypatch):
    calls = []
    main = threading.main_thread()

    def counted(name, real):
        def f(*args, **kwargs):
            if threading.current_thread() is main:
                calls.append(name)
            return real(*args, **kwargs)
        return f

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(tdist, "all_reduce", counted("all_reduce", tdist.all_reduce))
    return calls


def test_host_reads_scale_with_log_intervals_not_steps(tmp_path, sync_counter):
    # SimSiam (SGD, no queue, no temperature): what is counted is the loop's own reads.
    # 20 steps: 2 intervals at --log-every 10, 4 at 5. Per interval: one read for the
    # NaN/signal check, one for the logs; plus one .tolist() of each host-side schedule
    # (lr, wd: CPU tensors turned into Python lists once, never indexed per step).
    counts = {}
    for every in (10, 5):
        sync_counter.clear()
        cfg = config("simsiam", tmp_path / str(every), "--steps", "20", "--log-every",
                     str(every))
        assert train(cfg)["steps"] == 20
        counts[every] = len(sync_counter)
        rows = read_log(Path(cfg.out))
        assert [r["step"] for r in rows] == list(range(every, 21, every))
    assert counts[10] <= 2 * 2 + 2, counts  # at most 2 intervals' worth (+ the schedules)
    assert counts[5] - counts[10] == 2 * (4 - 2), counts  # 2 more intervals, 2 reads each


def poison(monkeypatch, method: str, at_step: int) -> None:
    """The loss of optimizer step `at_step` (0-based) is NaN, the others untouched."""
    cls = METHODS[method]
    real = cls.forward
    calls = {"n": 0}

    def poisoned(self, views):
        out = real(self, views)
        if calls["n"] == at_step:
            out["loss"] = out["loss"] * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(cls, "forward", poisoned)


def test_nan_at_step_7_stops_at_the_next_check_naming_step_7(tmp_path, monkeypatch):
    poison(monkeypatch, "simsiam", 7)
    cfg = config("simsiam", tmp_path, "--steps", "20", "--log-every", "10")
    with pytest.raises(NonFiniteLossError, match=r"first at step 7 of method simsiam") as e:
        train(cfg)
    # found at the check of step 9 (the 10th), before that step's update
    diag = Path(cfg.out) / "diagnostic-step9.pt"
    assert str(diag) in str(e.value) and "do not resume from it" in str(e.value)
    state = ckpt.load(diag)
    assert state["step"] == 9 and state["nonfinite_first_step"] == 7
    assert not (Path(cfg.out) / ckpt.CHECKPOINT_NAME).exists()  # no "good" checkpoint
    assert read_log(Path(cfg.out)) == []  # the first log row would have been step 10


def test_a_checkpoint_is_never_written_past_an_unchecked_nan(tmp_path, monkeypatch):
    # --ckpt-every 3 with --log-every 10: the step before each checkpoint is a check too.
    poison(monkeypatch, "simsiam", 4)
    cfg = config("simsiam", tmp_path, "--steps", "20", "--log-every", "10",
                 "--ckpt-every", "3")
    with pytest.raises(NonFiniteLossError, match=r"first at step 4 .*check of step 5"):
        train(cfg)
    assert ckpt.load(cfg.out)["step"] == 3  # the last good one (saved after step index 2)


def test_watch_keeps_the_first_bad_step_on_the_device():
    watch = NonFiniteWatch(torch.device("cpu"))
    for step, value in enumerate([1.0, 2.0, float("inf"), 3.0, float("nan"), 4.0]):
        watch.observe(torch.tensor(value), step)
    assert watch.check(False) == (2, False)
    clean = NonFiniteWatch(torch.device("cpu"))
    clean.observe(torch.ones(3), 0)
    assert clean.check(True) == (None, True)


def test_read_scalars_reads_every_tensor_log_at_once(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or real(t))
    logs = read_scalars({"loss": torch.tensor(1.5), "dim": 32.0, "flag": True,
                         "std": torch.tensor([0.25]), "vec": torch.ones(3), "n": 2})
    assert logs == {"loss": 1.5, "dim": 32.0, "std": 0.25, "n": 2.0}
    assert list(logs) == ["loss", "dim", "std", "n"] and len(calls) == 1
