"""Engine parts that need no model: config, schedules, optimizers, checkpoints, monitors."""

import json
import math
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.engine import checkpoint as ckpt
from selfsup.engine import schedules
from selfsup.engine.config import Config, build_parser, resolve
from selfsup.engine.monitors import CollapseMonitor, first_layer, grad_norm, knn_classify
from selfsup.engine.optim import LARS, build_optimizer


# ----------------------------------------------------------------------------- config
def test_cli_precedence_defaults_preset_cli():
    cli = vars(build_parser().parse_args(["--lr", "0.5", "--arch", "vit_tiny"]))
    assert cli == {"lr": 0.5, "arch": "vit_tiny"}  # unset flags stay absent

    def preset(arch):
        assert arch == "vit_tiny"
        return {"lr": 0.1, "temperature": 0.2, "optimizer": "adamw"}

    cfg = resolve(cli, preset)
    assert cfg.lr == 0.5  # cli beats preset
    assert cfg.temperature == 0.2 and cfg.optimizer == "adamw"  # preset beats default
    assert cfg.batch_size == Config().batch_size  # default
    assert cfg.extra["cli_keys"] == ["arch", "lr"]


def test_cli_types_and_choices():
    p = build_parser()
    a = vars(p.parse_args(["--no-norm-pix", "--betas", "0.9", "0.95", "--steps", "7",
                           "--precision", "bf16"]))
    assert a == {"norm_pix": False, "betas": [0.9, 0.95], "steps": 7, "precision": "bf16"}
    with pytest.raises(SystemExit):
        p.parse_args(["--optimizer", "adam"])


def test_config_round_trips_through_json(tmp_path):
    cfg = resolve({"betas": [0.9, 0.95]})
    cfg.save(tmp_path / "c.json")
    import json

    back = Config.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert back == cfg and back.betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="unknown config keys"):
        Config.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="preset sets unknown"):
        resolve({}, lambda arch: {"not_a_field": 1})


def test_peak_lr_scales_with_global_batch():
    cfg = Config(blr=0.03, batch_size=64)
    assert cfg.peak_lr(world_size=4) == pytest.approx(0.03)
    assert Config(lr=0.7).peak_lr(8) == 0.7


# ----------------------------------------------------------------------------- schedules
def test_cosine_with_warmup():
    s = schedules.cosine(1.0, 0.0, 110, warmup=10)
    assert len(s) == 110
    assert s[9] == pytest.approx(1.0) and s[0] == pytest.approx(0.1)
    assert s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.0, abs=1e-12)
    assert torch.all(s[10:][1:] <= s[10:][:-1])  # monotone decay after warm-up
    assert s[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 99)))


def test_momentum_schedule():
    from selfsup.ssl.common import momentum_at

    assert momentum_at(0.996, 0, 100) == pytest.approx(0.996)
    assert momentum_at(0.996, 99, 100) == pytest.approx(1.0)
    assert 0.996 < momentum_at(0.996, 50, 100) < 1.0
    with pytest.raises(ValueError, match="total"):
        schedules.cosine(1, 0, 0)


# ----------------------------------------------------------------------------- optimizers
def test_lars_trust_ratio_and_exclusion():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    b = nn.Parameter(torch.randn(4))
    opt = LARS([{"params": [w], "weight_decay": 0.1},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=1.0, momentum=0.0, eta=0.001)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt.step()
    d = gw + 0.1 * w0
    expect = w0 - 0.001 * w0.norm() / d.norm() * d
    torch.testing.assert_close(w.detach(), expect)
    torch.testing.assert_close(b.detach(), b0 - gb)  # excluded: plain SGD step


def test_build_optimizer_no_decay_groups():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    from selfsup.ssl.common import split_decay

    groups = split_decay(m.named_parameters())
    for name in ("sgd", "adamw", "lars"):
        opt = build_optimizer(groups, Config(optimizer=name, wd=0.5))
        wds = sorted(g["weight_decay"] for g in opt.param_groups)
        assert wds == [0.0, 0.5]
        assert sum(len(g["params"]) for g in opt.param_groups) == 4
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(groups, Config(optimizer="adam"))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_rng(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = {"model": {"w": torch.randn(3)}, "config": Config().to_dict(), "step": 5,
             "rng": ckpt.rng_state()}
    ckpt.save(state, tmp_path / "run" / "checkpoint.pt")
    a = (torch.rand(2), np.random.rand(2), random.random())
    back = ckpt.load(tmp_path / "run")  # a run folder resolves to its checkpoint.pt
    ckpt.set_rng_state(back["rng"])
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["step"] == 5
    assert not list((tmp_path / "run").glob("*.tmp"))  # the temp file was renamed away


def test_corrupt_or_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    ckpt.save({"model": {"w": torch.zeros(1000)}, "config": {}}, good)
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError, match="truncated.pt"):
        ckpt.load(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt"):
        ckpt.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a selfsup checkpoint"):
        ckpt.load(foreign)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil(), "config": {}}, p)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt"):
        ckpt.load(p)
    assert "pwned" not in capsys.readouterr().out


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    p = tmp_path / "checkpoint.pt"
    ckpt.save({"model": {"w": torch.ones(2)}, "config": {}}, p)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a lambda cannot pickle
        ckpt.save({"model": {"w": torch.ones(2)}, "config": {}, "bad": lambda: 0}, p)
    assert torch.equal(ckpt.load(p)["model"]["w"], torch.ones(2))
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- monitors
def test_knn_classify_weighted_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.8, 0.2]])
    assert knn_classify(train, labels, test, k=2).tolist() == [0, 1, 0]
    # with k = all, the exp(sim / 0.07) weights still favour the close class
    assert knn_classify(train, labels, test, k=4).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="empty"):
        knn_classify(train[:0], labels[:0], test)


def test_collapse_monitor_warns_below_threshold():
    mon = CollapseMonitor(patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.update(1, {"collapse_std": 1 / math.sqrt(128), "collapse_dim": 128}) is None
    with pytest.warns(RuntimeWarning, match="COLLAPSE WARNING at step 2"):
        mon.update(2, {"collapse_std": 1e-4, "collapse_dim": 128})
    with pytest.warns(RuntimeWarning, match="teacher entropy"):
        mon.update(3, {"teacher_entropy": 1e-5})
    ln_k = math.log(65536)
    for s in range(2):
        assert mon.update(4 + s, {"loss": ln_k, "uniform_loss": ln_k}) is None
    with pytest.warns(RuntimeWarning, match="ln K"):
        mon.update(6, {"loss": ln_k, "uniform_loss": ln_k})


def test_first_layer_and_grad_norm():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert first_layer(m) is m[0]
    m[0].weight.requires_grad_(False)  # a frozen stem (MoCo v3) is skipped
    assert first_layer(m) is m[2]
    m[2].weight.grad = torch.full((2, 4), 2.0)
    m[2].bias.grad = torch.zeros(2)
    assert grad_norm(m[2].parameters()) == pytest.approx(math.sqrt(8 * 4))


def test_crop_scale_reaches_the_recipe_and_is_checked():
    from selfsup.data import get_recipe
    from selfsup.ssl import METHODS

    def cfg_for(method, *flags):
        return resolve(vars(build_parser().parse_args(["--method", method, *flags])),
                       METHODS[method].preset)

    byol = cfg_for("byol", "--crop-scale", "0.5", "1.0")
    kw = METHODS["byol"].recipe_kwargs(byol)
    assert kw == {"scale": (0.5, 1.0)}
    assert all(v.scale == (0.5, 1.0) for v in get_recipe("byol", 16, **kw).views)
    dino = METHODS["dino"].recipe_kwargs(cfg_for("dino", "--crop-scale", "0.6", "1"))
    assert dino["global_scale"] == (0.6, 1.0)
    assert METHODS["mocov2"].recipe_kwargs(cfg_for("mocov2")) == {}  # the paper's range
    with pytest.raises(ValueError, match="--crop-scale"):
        METHODS["simclr"].recipe_kwargs(cfg_for("simclr", "--crop-scale", "0.9", "0.2"))
    assert Config.from_dict(json.loads(json.dumps(byol.to_dict()))).crop_scale == (0.5, 1.0)


def test_each_collapse_warning_names_what_to_change_with_real_flags():
    # issue 26.2: a collapse names what to change; every flag it names must parse
    import re

    from selfsup.engine.config import build_parser
    from selfsup.engine.monitors import ADVICE

    mon = CollapseMonitor(patience=1)
    with pytest.warns(RuntimeWarning):
        texts = [mon.update(1, {"collapse_std": 1e-4, "collapse_dim": 128}),
                 mon.update(2, {"teacher_entropy": 1e-5}),
                 mon.update(3, {"loss": 1.0, "uniform_loss": 1.0})]
    assert [t.endswith(ADVICE[k]) for t, k in zip(texts, ("point", "one_prototype", "uniform"),
                                                    strict=True)] == [True] * 3
    options = {o for a in build_parser()._actions for o in a.option_strings}
    for text in ADVICE.values():
        flags = re.findall(r"--[a-z][a-z-]+", text)
        assert flags and set(flags) <= options, flags
