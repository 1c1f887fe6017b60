"""--compile (issue 23.1, the trainer's part): torch.compile'd backbone and heads train.

Three steps compiled against three eager steps from the same seed, for a ResNet method
(SimSiam) and a ViT method (MAE, whose encoder entry is forward_features). CPU inductor
compiles take ~1-2 minutes cold on 2 cores (cached afterwards), so this stays at two runs.
"""

import math
from pathlib import Path

import pytest
import torch

from selfsup.engine import checkpoint as ckpt
from selfsup.engine import trainer
from selfsup.engine.trainer import train
from test_trainer import config, read_log


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


@pytest.mark.parametrize("method,compiled", [("simsiam", {"backbone", "projector", "predictor"}),
                                             ("mae", {"backbone", "decoder"})])
def test_compiled_training_matches_eager(method, compiled, tmp_path, monkeypatch):
    seen = {}
    real = trainer.compile_modules

    def recording(m):
        seen["names"] = real(m)
        seen["modules"] = {n: getattr(m, n) for n in seen["names"]}
        return seen["names"]

    monkeypatch.setattr(trainer, "compile_modules", recording)
    runs = {}
    for flag in ([], ["--compile"]):
        cfg = config(method, tmp_path / (flag[0][2:] if flag else "eager"), "--steps", "3",
                     "--batch-size", "8", *flag)
        assert train(cfg)["steps"] == 3
        runs[bool(flag)] = ([r["loss"] for r in read_log(Path(cfg.out))], ckpt.load(cfg.out))
    assert compiled <= set(seen["names"])
    assert all(mod._compiled_call_impl is not None for mod in seen["modules"].values())
    eager, comp = runs[False], runs[True]
    assert all(math.isfinite(v) for v in comp[0]) and len(comp[0]) == 3
    assert comp[0][0] == pytest.approx(eager[0][0], rel=1e-4, abs=1e-5)  # same weights, data
    assert comp[0] == pytest.approx(eager[0], rel=1e-2, abs=1e-3)  # then fp reassociation
    # the checkpoint is the eager one's: same keys (no _orig_mod. prefix), close weights
    assert comp[1]["model"].keys() == eager[1]["model"].keys()
    for k, w in eager[1]["model"].items():
        if w.is_floating_point():
            torch.testing.assert_close(comp[1]["model"][k], w, rtol=1e-3, atol=1e-4, msg=k)
