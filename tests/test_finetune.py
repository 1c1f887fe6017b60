"""selfsup.finetune: layer-wise lr decay, mixup / cutmix / smoothing, drop path, pooling,
checkpoints and resume, bad input. Runs on the committed Fashion-MNIST sample, tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfsup import finetune
from selfsup.data.datasets import load_dataset
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.finetune_utils import (
    Classifier,
    Mixup,
    RandomErasing,
    param_groups,
    resolve_pool,
    set_drop_path,
    smooth_targets,
    soft_cross_entropy,
)
from selfsup.engine.trainer import method_class, train
from selfsup.models import VisionTransformer, build_backbone

PRETRAIN = ["--data", "fashion-mnist-sample", "--img-size", "16", "--patch-size", "4",
            "--batch-size", "16", "--device", "cpu", "--data-device", "portable",
            "--workers", "1", "--knn-every", "-1", "--proj-hidden", "32", "--proj-dim", "16",
            "--out-dim", "64", "--n-local", "2", "--decoder-dim", "32", "--decoder-depth", "1",
            "--steps", "2"]
ROOT = Path(__file__).resolve().parents[1]
# 64 train images at batch 16: 4 steps an epoch
TUNE = ["--train-size", "64", "--test-size", "48", "--batch-size", "16", "--device", "cpu",
        "--data-device", "portable", "--workers", "1", "--log-every", "1"]


@pytest.fixture(autouse=True)
def portable_paths(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def pretrained(tmp_path_factory, method: str, arch: str):
    out = tmp_path_factory.mktemp(method) / "run"
    argv = ["--method", method, "--arch", arch, *PRETRAIN, "--out", str(out)]
    train(resolve(vars(build_parser().parse_args(argv)), method_class(method).preset))
    return out


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    return pretrained(tmp_path_factory, "mae", "vit_tiny")


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
    return pretrained(tmp_path_factory, "byol", "resnet_tiny")


def tune(argv, capsys):
    rc = finetune.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tiny_vit(**kw):
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=5, num_heads=2, **kw)


# ----------------------------------------------------------------------------- layer decay
def test_layer_decay_gives_each_block_its_exact_scale():
    depth, decay = 5, 0.75
    model = Classifier(tiny_vit(pos_embed="learned"), 10, "avg")
    scale = {id(p): g["lr_scale"] for g in param_groups(model, decay) for p in g["params"]}
    wd = {id(p): g["apply_wd"] for g in param_groups(model, decay) for p in g["params"]}
    seen = set()
    assert not model.encoder.norm.weight.requires_grad  # avg pool: fc_norm replaces it
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name.startswith("encoder.norm."), name
            continue
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            want = decay ** (depth + 1)  # layer 0
        elif name.startswith("encoder.blocks."):
            want = decay ** (depth - int(name.split(".")[2]))  # block i: layer i + 1
        else:  # fc_norm, head (and the final norm under cls pooling)
            want = 1.0
        assert scale[id(p)] == want, name
        seen.add(round(scale[id(p)], 12))
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed"))
        assert wd[id(p)] is not no_wd, name
    assert len(seen) == depth + 2  # embedding, 5 blocks, head: all distinct
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.encoder.blocks[-1].mlp.fc1.weight)] == 0.75
    assert scale[id(model.encoder.blocks[0].attn.qkv.weight)] == 0.75 ** 5


def test_the_step_applies_the_scaled_lr_and_decay_only_where_due():
    model = Classifier(tiny_vit(), 10, "cls")
    s = dict(layer_decay=0.5, wd=0.05, optimizer="adamw", betas=[0.9, 0.999], seed=0,
             clip_grad=None)
    opt = finetune.build_optimizer(model, s)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    augment = (RandomErasing(0.0), Mixup(10, 0.0, 0.0, 0.0))
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    finetune.train_step(model, opt, scaler, augment, x, y, 1e-3, s, 0, None)
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 * g["lr_scale"]
        assert g["weight_decay"] == (0.05 if g["apply_wd"] else 0.0)
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == [0.5 ** k for k in range(6, -1, -1)]


def test_resnet_and_probe_have_no_layer_decay():
    net = build_backbone("resnet_tiny", img_size=16, cifar_stem=True)
    assert {g["lr_scale"] for g in param_groups(Classifier(net, 10, "resnet"), 0.75)} == {1.0}
    probe = Classifier(tiny_vit(), 10, "cls", probe=True)
    groups = param_groups(probe, 0.75)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert sum(len(g["params"]) for g in groups) == 2  # the head's weight and bias only
    with pytest.raises(ValueError, match="--layer-decay"):
        param_groups(probe, 0.0)


# ----------------------------------------------------------------------------- mixup / cutmix
def constant_batch(b=6, size=8):
    vals = torch.arange(1, b + 1, dtype=torch.float32) * 10  # image i is all 10 (i + 1)
    return vals.view(b, 1, 1, 1).expand(b, 3, size, size).clone(), vals


def test_label_smoothing_targets_and_loss_match_torch():
    y = torch.tensor([0, 3, 9, 3])
    t = smooth_targets(y, 10, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t[torch.arange(4), y], torch.full((4,), 0.9 + 0.01))
    assert torch.allclose(t[0, 1:], torch.full((9,), 0.01))
    logits = torch.randn(4, 10, dtype=torch.float64)
    ref = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, t), ref, atol=1e-6)
    x = torch.randn(4, 3, 8, 8)
    xo, to = Mixup(10, 0.0, 0.0, 0.1)(x, y, np.random.default_rng(0))  # smoothing only
    assert torch.equal(xo, x) and torch.equal(to, t)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_label_mass_is_lambda(seed):
    x, vals = constant_batch()
    y = torch.arange(6)
    xo, t = Mixup(10, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.0)(
        x, y, np.random.default_rng(seed))
    lam = (xo[0, 0, 0, 0] - vals[-1]) / (vals[0] - vals[-1])  # pixel = lam a + (1 - lam) b
    assert 0 < lam < 1
    assert torch.allclose(xo, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    for i in range(6):
        assert torch.isclose(t[i, i], lam, atol=1e-6)
        assert torch.isclose(t[i, 5 - i], 1 - lam, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_label_mass_is_the_pasted_area(seed):
    x, vals = constant_batch(size=16)
    y = torch.arange(6)
    xo, t = Mixup(10, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.1)(
        x, y, np.random.default_rng(seed))
    for i in range(6):
        pasted = (xo[i, 0] == vals[5 - i]).float().mean()  # the partner's pixels
        assert torch.equal(xo[i, 1], xo[i, 0])  # one box across the channels
        assert ((xo[i, 0] == vals[i]) | (xo[i, 0] == vals[5 - i])).all()
        want = (1 - pasted) * smooth_targets(y[i:i + 1], 10, 0.1) + pasted * smooth_targets(
            y[5 - i:6 - i], 10, 0.1)
        assert torch.allclose(t[i], want[0], atol=1e-6)
        assert torch.isclose(t[i].sum(), torch.tensor(1.0))


def test_mixup_and_cutmix_switch_per_batch_and_prob_zero_mixes_nothing():
    x, vals = constant_batch(size=16)
    y = torch.arange(6)
    mix = Mixup(10, 0.8, 1.0, 0.1, switch_prob=0.5)
    kinds = []
    for seed in range(200):
        xo, _ = mix(x, y, np.random.default_rng(seed))
        # cutmix keeps pure pixels of image 0; mixup blends every pixel (lam in (0, 1))
        pure = ((xo[0, 0] == vals[0]) | (xo[0, 0] == vals[-1])).all().item()
        kinds.append(pure)
    assert 70 <= sum(kinds) <= 130  # about half of each, from fixed seeds
    off = Mixup(10, 0.8, 1.0, 0.1, prob=0.0)
    xo, t = off(x, y, np.random.default_rng(0))
    assert torch.equal(xo, x) and torch.equal(t, smooth_targets(y, 10, 0.1))
    with pytest.raises(ValueError, match="--mixup"):
        Mixup(10, -1.0, 1.0)
    with pytest.raises(ValueError, match="--smoothing"):
        Mixup(10, 0.8, 1.0, smoothing=1.0)


def test_random_erasing_replaces_one_box_per_chosen_image():
    x = torch.zeros(64, 3, 16, 16)
    out = RandomErasing(1.0)(x, np.random.default_rng(0))
    assert torch.equal(x, torch.zeros_like(x))  # the input is not modified in place
    fractions = []
    for img in out:
        changed = img != 0  # noise is never exactly 0
        assert torch.equal(changed[0], changed[1]) and torch.equal(changed[0], changed[2])
        rows, cols = changed[0].any(1).nonzero(), changed[0].any(0).nonzero()
        box = torch.zeros_like(changed[0])
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.equal(changed[0], box)  # one solid rectangle
        fractions.append(changed[0].float().mean().item())
    assert 1 / 256 <= min(fractions) and max(fractions) <= 0.45  # area 0.02-1/3, rounded
    assert 0.5 < abs(out[out != 0]).std() < 1.5  # N(0, 1) noise
    some = RandomErasing(0.25)(x, np.random.default_rng(1))
    n = sum(bool((img != 0).any()) for img in some)
    assert 5 <= n <= 30  # about a quarter of 64
    assert RandomErasing(0.0)(x, np.random.default_rng(0)) is x
    with pytest.raises(ValueError, match="--reprob"):
        RandomErasing(1.5)


# ----------------------------------------------------------------------------- drop path
def test_drop_path_rates_match_the_vit_and_act_in_train_only():
    built = tiny_vit(drop_path=0.3)
    torch.manual_seed(0)
    net = tiny_vit()
    rates = set_drop_path(net, 0.3)
    assert rates == [b.drop_path.p for b in built.blocks] and rates[-1] == 0.3 and rates[0] == 0
    torch.manual_seed(0)
    plain = Classifier(tiny_vit(), 10, "cls", head_init_std=1.0)
    model = Classifier(net, 10, "cls", head_init_std=1.0)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 16, 16)
    plain.eval()
    ref = plain(x)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # a fresh stochastic depth draw per forward
    assert not torch.allclose(a, ref)
    plain.train()
    assert torch.equal(plain(x), ref)  # rate 0: training mode changes nothing
    model.eval()
    assert torch.allclose(model(x), ref, atol=1e-6)  # off at eval
    with pytest.raises(ValueError, match="--drop-path"):
        set_drop_path(build_backbone("resnet_tiny", img_size=16), 0.1)


# ----------------------------------------------------------------------------- pooling
def test_pooling_follows_the_pretraining_method():
    vit = tiny_vit()
    assert resolve_pool("auto", "mae", vit) == "avg"
    for method in ("dino", "mocov3", "byol"):
        assert resolve_pool("auto", method, vit) == "cls"
    assert resolve_pool("cls", "mae", vit) == "cls"
    res = build_backbone("resnet_tiny", img_size=16)
    assert resolve_pool("auto", "byol", res) == "resnet"
    with pytest.raises(ValueError, match="--pool avg applies to ViTs only"):
        resolve_pool("avg", "byol", res)

    x = torch.randn(3, 3, 16, 16)
    avg = Classifier(vit, 10, "avg").eval()
    nn_ = torch.nn
    assert isinstance(avg.fc_norm, nn_.LayerNorm)
    with torch.no_grad():
        h = vit._run_blocks(vit._embed(x), vit.blocks)
        assert torch.allclose(avg.features(x), avg.fc_norm(h[:, 1:].mean(1)))
        cls = Classifier(vit, 10, "cls").eval()
        assert cls.fc_norm is None
        vit.global_pool = "token"
        assert torch.allclose(cls.features(x), vit(x), atol=1e-6)  # the normed cls token


def test_mae_run_fine_tunes_with_avg_pool_and_byol_resnet_with_its_pool(mae_run, byol_run,
                                                                          tmp_path, capsys):
    rc, out, _ = tune(["--checkpoint", mae_run, "--out", tmp_path / "mae", "--steps", "2",
                       *TUNE], capsys)
    assert rc == 0, out
    assert "pool avg" in out and out.strip().splitlines()[-1].startswith("finetune_top1 ")
    state = torch.load(tmp_path / "mae" / "checkpoint.pt", weights_only=True)
    assert "fc_norm.weight" in state["model"]
    assert state["finetune"]["drop_path_per_block"][-1] == 0.1

    rc, out, _ = tune(["--checkpoint", byol_run, "--out", tmp_path / "byol", "--steps", "2",
                       *TUNE], capsys)
    assert rc == 0, out
    acc = float(out.strip().splitlines()[-1].split()[-1])
    assert 0.0 <= acc <= 1.0
    state = torch.load(tmp_path / "byol" / "checkpoint.pt", weights_only=True)
    s = state["finetune"]
    assert (s["pool"], s["optimizer"], s["layer_decay"], s["mixup"]) == ("resnet", "sgd", 1.0, 0)
    assert not any(k.startswith("fc_norm") for k in state["model"])


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_loads_with_weights_only_and_rebuilds_the_classifier(mae_run, tmp_path,
                                                                         capsys):
    rc, out, _ = tune(["--checkpoint", mae_run, "--out", tmp_path, "--steps", "1", *TUNE],
                      capsys)
    assert rc == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and state["config"]["method"] == "mae"
    assert {"model", "optimizer", "scaler", "rng", "finetune"} <= set(state)
    net = VisionTransformer(img_size=16, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    Classifier(net, 10, "avg").load_state_dict(state["model"])  # strict: every key matches


def test_resume_continues_the_same_run(mae_run, tmp_path, capsys):
    """4 steps at once == 2 steps, stop, then resume for the rest (bit for bit on CPU)."""
    common = ["--checkpoint", mae_run, "--epochs", "1", "--warmup-steps", "1", "--blr", "1e-2",
              *TUNE]
    # run a also scores the test split mid-way: evaluating must not change what it trains
    rc, out_a, _ = tune([*common, "--out", tmp_path / "a", "--eval-every", "0.5"], capsys)
    assert rc == 0 and "[eval] step 2: top-1" in out_a
    rc, _, _ = tune([*common, "--out", tmp_path / "b", "--steps", "2"], capsys)
    assert rc == 0
    half = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert half["step"] == 2
    rc, out_b, _ = tune([*common, "--out", tmp_path / "b", "--resume", "auto"], capsys)
    assert rc == 0
    assert "resumed from" in out_b and "at step 2" in out_b
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert not torch.equal(a["model"]["head.weight"], half["model"]["head.weight"])
    assert out_a.strip().splitlines()[-1] == out_b.strip().splitlines()[-1]


def test_schedule_length_follows_steps_and_epochs():
    s = dict(steps=None, epochs=100, warmup_epochs=5.0, warmup_steps=None)
    assert finetune.schedule_lengths(s, 10, False) == (1000, 1000, 50)
    s["steps"] = 300  # alone: the schedule is 300 steps, the warm-up keeps its 5%
    assert finetune.schedule_lengths(s, 10, False) == (300, 300, 15)
    assert finetune.schedule_lengths(s, 10, True) == (1000, 300, 50)  # with --epochs: a stop
    s["warmup_steps"] = 7
    assert finetune.schedule_lengths(s, 10, False) == (300, 300, 7)


def test_linear_probe_trains_the_head_only(mae_run, tmp_path, capsys):
    rc, out, _ = tune(["--checkpoint", mae_run, "--out", tmp_path, "--linear-probe",
                       "--steps", "2", *TUNE], capsys)
    assert rc == 0, out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    src = torch.load(mae_run / "checkpoint.pt", weights_only=True)["model"]
    for k, v in state["model"].items():
        if k.startswith("encoder."):
            assert torch.equal(v, src["backbone." + k[len("encoder."):]]), k
    assert state["finetune"]["optimizer"] == "lars" and state["finetune"]["mixup"] == 0
    assert "head.1.weight" in state["model"]  # BatchNorm (no affine) then the linear layer


def test_random_init_starts_from_the_untrained_encoder(mae_run, tmp_path, capsys):
    rc, out, _ = tune(["--checkpoint", mae_run, "--out", tmp_path, "--random-init",
                       "--linear-probe", "--steps", "1", *TUNE], capsys)
    assert rc == 0 and "from random init" in out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    src = torch.load(mae_run / "checkpoint.pt", weights_only=True)["model"]
    k = "blocks.0.attn.qkv.weight"
    assert not torch.equal(state["encoder." + k], src["backbone." + k])


# ----------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(mae_run, byol_run, tmp_path, capsys):
    rc, _, err = tune(["--checkpoint", tmp_path / "nope", *TUNE], capsys)
    assert rc == 2 and "checkpoint not found" in err
    rc, _, _ = tune(["--checkpoint", byol_run, "--out", tmp_path / "r", "--steps", "1", *TUNE],
                    capsys)
    assert rc == 0
    # a fine-tuning checkpoint where a pretraining run belongs
    rc, _, err = tune(["--checkpoint", tmp_path / "r", *TUNE], capsys)
    assert rc == 2 and "is a fine-tuning checkpoint" in err
    # resuming a ResNet fine-tuning with a ViT pretraining run: the wrong arch
    rc, _, err = tune(["--checkpoint", mae_run, "--out", tmp_path / "r", "--resume", "auto",
                       *TUNE], capsys)
    assert rc == 2 and "arch 'resnet_tiny'" in err and "'vit_tiny'" in err
    rc, _, err = tune(["--checkpoint", byol_run, "--drop-path", "0.1", *TUNE], capsys)
    assert rc == 2 and "--drop-path applies to ViTs only" in err
    rc, _, err = tune(["--checkpoint", byol_run, "--pool", "cls", *TUNE], capsys)
    assert rc == 2 and "--pool cls applies to ViTs only" in err
    rc, _, err = tune(["--checkpoint", mae_run, "--crop-scale", "0.5", "2", *TUNE], capsys)
    assert rc == 2 and "--crop-scale" in err
    rc, _, err = tune(["--checkpoint", mae_run, "--layer-decay", "1.5", *TUNE], capsys)
    assert rc == 2 and "--layer-decay" in err
    images = load_dataset("fashion-mnist-sample", "test").images[:4]
    for split in ("train", "test"):  # one class: nothing to classify
        (tmp_path / "folder" / split / "only").mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / "folder" / split / "only" / f"{i}.png")
    rc, _, err = tune(["--checkpoint", mae_run, "--data", tmp_path / "folder", *TUNE], capsys)
    assert rc == 2 and ">= 2 classes" in err


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.dist
def test_torchrun_two_processes_fine_tune(mae_run, tmp_path):
    """DDP over 2 gloo ranks: the shards train one model (the bypassed final norm, frozen,
    leaves DDP no unused parameter), rank 0 alone logs, saves and scores."""
    out = tmp_path / "ddp"
    env = {**os.environ, "SELFSUP_KERNELS": "torch", "SELFSUP_ATTN": "sdpa",
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfsup.finetune", "--checkpoint", str(mae_run), "--steps", "2",
           "--out", str(out), *TUNE]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("finetune_top1") == 1
    assert r.stdout.strip().splitlines()[-1].startswith("finetune_top1 ")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    s = state["finetune"]
    assert state["step"] == 2 and s["world_size"] == 2
    assert s["peak_lr"] == 5e-4 * 16 * 2 / 256  # lr scales with the global batch
    assert s["steps_per_epoch"] == 2  # 64 images / (16 x 2 ranks)
    rows = [ln for ln in (out / "log.jsonl").read_text().splitlines() if '"train"' in ln]
    assert len(rows) == 2


# ----------------------------------------------------------------------------- host syncs
READS = ("item", "__float__", "__int__", "__bool__", "tolist")


def test_host_reads_only_at_check_steps(byol_run, tmp_path, capsys, monkeypatch):
    # issue 23.2: 20 steps; every value read back to Python (Tensor.item, __float__, __int__,
    # __bool__, tolist, on the main thread) is counted and charged to the step whose
    # train_step ran last. Only check steps (each --log-every-th and the last) may read: one
    # read for the NaN / signal check, one for the loss that is logged.
    import threading

    reads, at = [], {"step": None}
    main = threading.main_thread()

    def counted(real):
        def f(*args, **kwargs):
            if threading.current_thread() is main:
                reads.append(at["step"])
            return real(*args, **kwargs)
        return f

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    real_step = finetune.train_step

    def step_marked(*args, **kwargs):
        at["step"] = args[8]  # the step index
        return real_step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", step_marked)
    real_eval = finetune.evaluate

    def eval_marked(*args, **kwargs):  # the final scoring reads its predictions: not a step's
        at["step"] = "eval"
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate", eval_marked)
    for every in (10, 5):
        reads.clear()
        rc, out, err = tune(["--checkpoint", byol_run, "--out", tmp_path / str(every),
                             "--steps", "20", *TUNE, "--log-every", every], capsys)
        assert rc == 0, err
        per_step = {i: reads.count(i) for i in range(20)}
        checks = {i for i in range(20) if (i + 1) % every == 0}
        assert {i: n for i, n in per_step.items() if n} == dict.fromkeys(checks, 2), per_step
        rows = [json.loads(x) for x in (tmp_path / str(every) / "log.jsonl").read_text()
                .splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(every, 21, every))


def poison_loss(monkeypatch, at_step: int) -> None:
    """The loss of step `at_step` (0-based) is NaN, the others untouched."""
    real, calls = finetune.soft_cross_entropy, {"n": 0}

    def poisoned(logits, target):
        loss = real(logits, target)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == at_step + 1 else loss

    monkeypatch.setattr(finetune, "soft_cross_entropy", poisoned)


def test_nan_is_caught_at_the_next_check_naming_its_step(byol_run, tmp_path, capsys,
                                                         monkeypatch):
    poison_loss(monkeypatch, 7)
    rc, _, err = tune(["--checkpoint", byol_run, "--out", tmp_path / "a", "--steps", "20",
                       *TUNE, "--log-every", "10"], capsys)
    assert rc == 2
    assert "non-finite loss first at step 7 " in err and "check of step 9" in err, err
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    # a checkpoint step is a check too: none is written past an unchecked NaN
    poison_loss(monkeypatch, 4)
    rc, _, err = tune(["--checkpoint", byol_run, "--out", tmp_path / "b", "--steps", "20",
                       *TUNE, "--log-every", "10", "--ckpt-every", "3"], capsys)
    assert rc == 2 and "first at step 4 " in err and "check of step 5" in err, err
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 3
