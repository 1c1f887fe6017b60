"""Issue 28's methods (Barlow Twins, VICReg, SwAV) and multi-crop for every method.

The presets against the papers, multi-crop (2 global + N local views) through one code path,
the two-view losses unchanged by it, DINO's recipe unchanged, SwAV's frozen prototypes, its
queue (state across a resume), and the cross-rank algebra with 2 gloo processes (Sinkhorn's
sums all-reduced; a SwAV and a Barlow Twins step on 2 ranks = 1 process on the whole batch).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

from selfsup.data.recipes import View, get_recipe
from selfsup.engine import checkpoint as ckpt
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.optim import build_optimizer
from selfsup.engine.trainer import clip_gradients, method_class, train
from selfsup.kernels.swav import sinkhorn_knopp
from selfsup.ssl import METHODS
from selfsup.ssl.byol import byol_loss
from selfsup.ssl.common import cosine_loss, crop_pairs

TINY = ["--data", "fashion-mnist-sample", "--img-size", "16", "--batch-size", "32",
        "--device", "cpu", "--data-device", "portable", "--workers", "1", "--knn-every", "-1",
        "--log-every", "1", "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "32",
        "--out-dim", "128", "--arch", "resnet_tiny"]
MULTICROP = ["byol", "simsiam", "simclr", "barlowtwins", "vicreg", "swav", "dino"]


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")


def config(method: str, *extra: str, out: Path | None = None, spe: int | None = None):
    argv = ["--method", method, *TINY, *extra] + (["--out", str(out)] if out else [])
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(method).preset)
    if spe:
        cfg.extra.update(steps_per_epoch=spe, schedule_steps=10 * spe)
    return cfg


def views_for(cfg, b: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Random images of the sizes the method's recipe produces."""
    cls = method_class(cfg.method)
    recipe = get_recipe(cfg.aug or cls.recipe, cfg.img_size, **cls.recipe_kwargs(cfg))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for s in recipe.view_sizes]


# ----------------------------------------------------------------------------- presets
def test_presets_are_the_papers():
    bt = resolve({}, METHODS["barlowtwins"].preset)
    assert (bt.optimizer, bt.blr, bt.wd, bt.proj_hidden, bt.proj_dim, bt.barlow_lambda,
            bt.warmup_epochs, bt.epochs) == ("lars", 0.2, 1.5e-6, 8192, 8192, 0.0051, 10, 1000)
    vr = resolve({}, METHODS["vicreg"].preset)
    assert (vr.optimizer, vr.blr, vr.wd, vr.proj_hidden, vr.proj_dim, vr.vicreg_weights) == \
        ("lars", 0.2, 1e-6, 8192, 8192, (25.0, 25.0, 1.0))
    sw = resolve({}, METHODS["swav"].preset)
    assert (sw.optimizer, sw.out_dim, sw.temperature, sw.sinkhorn_eps, sw.sinkhorn_iters,
            sw.queue_size, sw.queue_start_epochs, sw.freeze_last_layer_epochs, sw.n_local,
            sw.proj_hidden, sw.proj_dim) == ("lars", 3000, 0.1, 0.05, 3, 3840, 15, 1, 6,
                                             2048, 128)
    # SwAV's crops: 2 x 224 of 0.14-1 and 6 x 96 of 0.05-0.14
    r = get_recipe("swav", 224, **METHODS["swav"].recipe_kwargs(sw))
    assert r.view_sizes == [224, 224] + [96] * 6
    assert r.views[0].scale == (0.14, 1.0) and r.views[2].scale == (0.05, 0.14)


def test_projectors_are_three_layers_with_bn_and_relu():
    for name in ("barlowtwins", "vicreg"):
        m = method_class(name)(config(name, spe=5))
        kinds = [type(x).__name__ for x in m.projector]
        assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU",
                         "Linear"]
        assert m.projector[-1].bias is None and m.projector[-1].out_features == 32


def test_barlow_biases_and_bn_get_the_papers_lr():
    m = method_class("barlowtwins")(config("barlowtwins", spe=5))
    groups = m.param_groups(config("barlowtwins"))
    no_decay = [g for g in groups if g.get("lars_exclude")]
    assert no_decay and all(g["lr_scale"] == pytest.approx(0.0048 / 0.2) for g in no_decay)
    assert all("lr_scale" not in g for g in groups if not g.get("lars_exclude"))


def test_bad_method_flags_are_value_errors():
    with pytest.raises(ValueError, match="--vicreg-weights"):
        method_class("vicreg")(config("vicreg", "--vicreg-weights", "1", "2", spe=5))
    with pytest.raises(ValueError, match="--barlow-lambda"):
        method_class("barlowtwins")(config("barlowtwins", "--barlow-lambda", "-1", spe=5))
    with pytest.raises(ValueError, match="--sinkhorn-eps"):
        method_class("swav")(config("swav", "--sinkhorn-eps", "0", spe=5))
    with pytest.raises(ValueError, match="--local-crops: --method mocov2 takes no local"):
        method_class("mocov2").recipe_kwargs(config("mocov2", "--local-crops", "2"))
    with pytest.raises(ValueError, match="--local-crops must be an int >= 0"):
        method_class("byol").recipe_kwargs(config("byol", "--local-crops", "-1"))


# ----------------------------------------------------------------------------- multi-crop
def test_crop_pairs():
    assert crop_pairs(2, symmetric=False) == [(0, 1), (1, 0)]
    assert crop_pairs(2, symmetric=True) == [(0, 1)]
    assert crop_pairs(4, symmetric=True) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert len(crop_pairs(8, symmetric=False)) == 14
    with pytest.raises(ValueError, match="2 global views"):
        crop_pairs(1, symmetric=True)


@pytest.mark.parametrize("name", MULTICROP)
def test_each_multicrop_method_trains_with_local_crops(name, tmp_path):
    extra = ["--local-crops", "2", "--local-crop-scale", "0.1", "0.3"]
    if name == "dino":
        extra += ["--arch", "vit_tiny"]
    cfg = config(name, *extra, "--steps", "2", out=tmp_path / name)
    kw = method_class(name).recipe_kwargs(cfg)
    assert kw["n_local"] == 2 and kw["local_scale"] == (0.1, 0.3)
    recipe = get_recipe(cfg.aug or method_class(name).recipe, 16, **kw)
    assert recipe.view_sizes == [16, 16, 8, 8]
    summary = train(cfg)
    assert summary["steps"] == 2
    state = ckpt.load(cfg.out)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                      if v.is_floating_point())


def test_local_crops_change_the_loss_and_reach_the_gradient():
    # the local views are in the loss: their pixels get a gradient through the encoder
    for name in ("byol", "simsiam", "simclr", "barlowtwins", "vicreg", "swav"):
        cfg = config(name, "--local-crops", "2", spe=5)
        torch.manual_seed(0)
        m = method_class(name)(cfg).train()
        views = [v.requires_grad_() for v in views_for(cfg)]
        assert len(views) == 4
        m(views)["loss"].backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in views), name


def test_multicrop_methods_default_to_two_views_and_ignore_n_local():
    # --n-local is DINO's / SwAV's; the others take local views only with --local-crops
    for name in ("byol", "simsiam", "simclr", "barlowtwins", "vicreg"):
        assert method_class(name).recipe_kwargs(config(name, "--n-local", "4")) == {}
    assert method_class("swav").recipe_kwargs(config("swav"))["n_local"] == 6
    assert method_class("swav").recipe_kwargs(config("swav", "--local-crops", "3"))[
        "n_local"] == 3


def test_two_view_losses_are_unchanged_by_multicrop():
    # the generalised forwards against the two-view formulas, bit for bit
    for name in ("byol", "simsiam", "simclr"):
        cfg = config(name, spe=5)
        torch.manual_seed(0)
        m = method_class(name)(cfg).eval()  # eval: BN running stats stay put between calls
        v1, v2 = views_for(cfg)
        with torch.no_grad():
            got = m([v1, v2])["loss"]
            z1, z2 = m.projector(m.backbone(v1)), m.projector(m.backbone(v2))
            if name == "byol":
                t1 = m.t_projector(m.t_backbone(v1))
                t2 = m.t_projector(m.t_backbone(v2))
                want = byol_loss(m.predictor(z1), t2) + byol_loss(m.predictor(z2), t1)
            elif name == "simsiam":
                want = (cosine_loss(m.predictor(z1), z2) / 2
                        + cosine_loss(m.predictor(z2), z1) / 2)
            else:
                from selfsup.kernels import nt_xent

                want = nt_xent(z1, z2, m.temperature)
        assert torch.equal(got, want), name


def test_dino_recipe_is_unchanged():
    # the views DINO's recipe had before multi-crop moved into with_local_crops
    def strong(size, scale, blur_p, solarize_p=0.0):
        return View(size, scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2,
                    blur_p=blur_p, solarize_p=solarize_p, interp="cubic")

    g1, g2 = strong(224, (0.4, 1.0), 1.0), strong(224, (0.4, 1.0), 0.1, 0.2)
    assert get_recipe("dino", 224).views == (g1, g2) + (strong(96, (0.05, 0.4), 0.5),) * 8
    r = get_recipe("dino", 32, n_local=3, local_size=24, local_scale=(0.1, 0.3),
                   global_scale=(0.5, 1.0))
    assert r.views[2:] == (strong(24, (0.1, 0.3), 0.5),) * 3
    assert r.extra == dict(n_local=3, local_size=24, local_scale=(0.1, 0.3),
                           global_scale=(0.5, 1.0))
    # and the trainer asks for the same recipe keywords as before
    cfg = config("dino", "--n-local", "2", "--crop-scale", "0.5", "1.0",
                 "--local-crop-scale", "0.1", "0.3")
    assert method_class("dino").recipe_kwargs(cfg) == dict(n_local=2, global_scale=(0.5, 1.0),
                                                           local_scale=(0.1, 0.3))
    assert method_class("dino").recipe_kwargs(config("dino")) == dict(n_local=8)


# ----------------------------------------------------------------------------- SwAV
def swav_steps(cfg, n: int, seed: int = 0):
    """n optimizer steps as the trainer takes them (forward, backward, frozen groups' grads
    dropped, step, on_step_end); the prototypes after each step."""
    torch.manual_seed(seed)
    m = method_class("swav")(cfg).train()
    opt = build_optimizer(m.param_groups(cfg), cfg)
    for g in opt.param_groups:  # the trainer sets the scheduled lr each step; here constant
        g["lr"] = cfg.lr
    protos = [m.head.prototypes.weight.detach().clone()]
    for step in range(n):
        opt.zero_grad(set_to_none=True)
        m(views_for(cfg, b=8, seed=step))["loss"].backward()
        clip_gradients(opt, [p for p in m.parameters() if p.requires_grad], cfg, step, False)
        opt.step()
        m.on_step_end(step, n)
        protos.append(m.head.prototypes.weight.detach().clone())
    return m, protos


def test_swav_prototypes_frozen_for_the_first_epoch_in_steps():
    # 3 steps per epoch, --freeze-last-layer-epochs 1: steps 0-2 leave the prototypes alone
    cfg = config("swav", "--optimizer", "sgd", "--lr", "0.5", "--n-local", "1", spe=3)
    m, protos = swav_steps(cfg, 5)
    assert m.freeze_steps == 3
    for i in (1, 2, 3):
        torch.testing.assert_close(protos[i], protos[0], rtol=0, atol=1e-6)
    assert (protos[5] - protos[3]).abs().max() > 1e-4
    # re-normalised after every step: unit rows (the scores are cosines)
    torch.testing.assert_close(protos[5].norm(dim=1), torch.ones(128), rtol=0, atol=1e-6)
    assert m.param_groups(cfg)[-1]["name"] == "prototypes"


def test_swav_queue_fills_from_its_epoch_and_joins_when_full():
    # queue 16 rows, batch 8, from epoch 1 (3 steps): filled by steps 3-4, used from step 5
    cfg = config("swav", "--queue-size", "16", "--queue-start-epochs", "1", "--n-local", "0",
                 "--optimizer", "sgd", "--lr", "0.1", spe=3)
    torch.manual_seed(0)
    m = method_class("swav")(cfg).train()
    used, fills = [], []
    for step in range(6):
        out = m(views_for(cfg, b=8, seed=step))
        used.append(out["queue_used"])
        fills.append(int(m.queue_fill))
        m.on_step_end(step, 6)
    assert fills == [0, 0, 0, 8, 16, 24] and used == [0, 0, 0, 0, 0, 1.0]
    assert m.queue.abs().sum(-1).gt(0).all()  # every row written
    # the newest embeddings first: step 5's global view 0 is queue[0, :8]
    v = views_for(cfg, b=8, seed=5)
    with torch.no_grad():  # train-mode BN: the same batch statistics as that forward
        z = F.normalize(m.head.projector(m.backbone(torch.cat(v[:2]))), dim=1)
    torch.testing.assert_close(m.queue[0, :8], z[:8], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.queue[1, :8], z[8:], rtol=1e-4, atol=1e-5)


def test_swav_codes_with_a_full_queue_are_sinkhorn_over_queue_and_batch():
    cfg = config("swav", "--queue-size", "8", "--queue-start-epochs", "0", spe=3)
    torch.manual_seed(0)
    m = method_class("swav")(cfg)
    b, k = 4, 128
    m.queue.copy_(F.normalize(torch.randn_like(m.queue), dim=-1))
    m.queue_fill.fill_(8)
    m._step = m._fill = None  # as after a load_state_dict
    scores, z = torch.randn(2 * b, k), F.normalize(torch.randn(2 * b, 32), dim=1)
    queue0 = m.queue.clone()
    codes = m.eval()._codes(scores, z, b)
    for a in range(2):
        s = torch.cat([queue0[a] @ m.head.prototypes.weight.T, scores[a * b:(a + 1) * b]])
        torch.testing.assert_close(codes[a], sinkhorn_knopp(s, 0.05, 3)[-b:])


def test_swav_resume_continues_the_queue(tmp_path):
    # 6 steps straight = 3 + 3 resumed, weights and queue (the queue is state)
    common = ("--epochs", "1", "--queue-size", "64", "--queue-start-epochs", "0",
              "--n-local", "1", "--freeze-last-layer-epochs", "0")
    straight = config("swav", "--steps", "6", *common, out=tmp_path / "a")
    train(straight)
    train(config("swav", "--steps", "3", *common, out=tmp_path / "b"))
    second = config("swav", "--steps", "6", "--resume", "auto", *common, out=tmp_path / "b")
    assert train(second)["steps"] == 6
    a, b = ckpt.load(straight.out)["model"], ckpt.load(second.out)["model"]
    assert a.keys() == b.keys() and "queue" in a and int(a["queue_fill"]) == 6 * 32
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- 2 gloo ranks
WORLD = 2


def _sinkhorn_rank(rank: int, init_file: str, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=WORLD)
    try:
        s = torch.load(Path(out_dir) / "scores.pt", weights_only=True)
        n = s.shape[0] // WORLD
        q = sinkhorn_knopp(s[rank * n:(rank + 1) * n], 0.05, 3)
        torch.save(q, Path(out_dir) / f"q{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, dtype):
    g = torch.Generator().manual_seed(3)
    s = F.normalize(torch.randn(14, 8, generator=g), dim=1) @ \
        F.normalize(torch.randn(37, 8, generator=g), dim=1).T
    torch.save(s.to(dtype), tmp_path / "scores.pt")
    mp.spawn(_sinkhorn_rank, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD,
             join=True)
    q = torch.cat([torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in range(WORLD)])
    whole = sinkhorn_knopp(s.to(dtype), 0.05, 3)
    torch.testing.assert_close(q, whole, rtol=1e-12 if dtype == torch.float64 else 1e-5,
                               atol=0)
    # and a rank alone would give other codes: the sums must be global
    assert not torch.allclose(sinkhorn_knopp(s[:7].to(dtype), 0.05, 3), whole[:7], rtol=1e-3)


@pytest.mark.dist
@pytest.mark.parametrize("name", ["swav", "barlowtwins"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(name, tmp_path):
    # tests/test_distributed.py's harness: DDP on 2 gloo ranks, half the batch each
    import test_distributed as td

    ranks = td.run_two_ranks(name, tmp_path)
    single = td.single_process(name)
    for r in ranks:
        torch.testing.assert_close(r["loss_mean"], single["loss"], rtol=1e-5, atol=1e-6)
    for r in ranks:  # DDP averaged: every rank holds the global gradient
        assert r["grads"].keys() == single["grads"].keys()
        for k, g in single["grads"].items():
            # fp32 summation order: Barlow Twins' gradients reach ~40, so the absolute
            # tolerance scales with each tensor's largest entry
            atol = 1e-6 * max(1.0, g.abs().max().item())
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=atol, msg=k)
    assert math.isfinite(single["loss"].item())
