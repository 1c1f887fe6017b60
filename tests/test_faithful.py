"""Issue 25: the presets follow the papers' official code (review 2026-12-07-methods.md).

Each test pins one finding and fails on the behaviour before the fix."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data import dali_plugin, get_recipe
from selfsup.data import transforms as T
from selfsup.engine.config import build_parser, resolve, resolve_cli
from selfsup.engine.optim import clip_per_param_
from selfsup.engine.trainer import clip_gradients, lr_schedule, method_class, recipe_name
from selfsup.models import build_backbone
from selfsup.models.resnet import BasicBlock, Bottleneck
from selfsup.models.vit import DropPath

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--img-size", "16", "--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "32",
         "--queue-size", "64", "--out-dim", "64", "--n-local", "2"]


def config(method: str, *flags: str, arch: str = "resnet_tiny"):
    argv = ["--method", method, "--arch", arch, *flags]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(method).preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100)
    return cfg


def build(method: str, *flags: str, arch: str = "resnet_tiny"):
    torch.manual_seed(0)
    cfg = config(method, *SMALL, *flags, arch=arch)
    return method_class(method)(cfg), cfg


def train_recipe(cfg):
    cls = method_class(cfg.method)
    return get_recipe(recipe_name(cfg, cls), 224, 3, interp=cfg.interp,
                      **cls.recipe_kwargs(cfg))


# ----------------------------------------------------------------------------- DINO clipping
def grads_of(*norms: float) -> list[nn.Parameter]:
    ps = []
    for i, n in enumerate(norms):
        p = nn.Parameter(torch.zeros(7 + i))
        g = torch.randn(7 + i, dtype=torch.float64).float()
        p.grad = g * (n / g.norm())
        ps.append(p)
    return ps


def test_per_param_clip_leaves_a_tensor_under_the_bound_untouched():
    small, big = grads_of(2.9, math.sqrt(81 - 2.9 ** 2))  # global norm 9
    before = small.grad.clone()
    clip_per_param_([small, big], 3.0)
    assert torch.equal(small.grad, before)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    # the global clip (today's only mode) scales both by 3 / 9
    small, big = grads_of(2.9, math.sqrt(81 - 2.9 ** 2))
    torch.nn.utils.clip_grad_norm_([small, big], 3.0)
    assert small.grad.norm().item() == pytest.approx(2.9 / 3, rel=1e-4)


class _Opt:  # what clip_gradients reads of an optimizer
    def __init__(self, groups):
        self.param_groups = groups


def test_dino_preset_clips_each_tensor_before_cancelling_the_last_layer():
    cfg = config("dino", arch="vit_small")
    assert cfg.clip_mode == "per-param" and cfg.clip_grad == 3.0
    rest, last = grads_of(2.9, 50.0)
    opt = _Opt([dict(params=[rest]), dict(params=[last], freeze_steps=5)])
    before = rest.grad.clone()
    clip_gradients(opt, [rest, last], cfg, step=0, log_now=False)
    assert torch.equal(rest.grad, before) and last.grad is None
    # global mode (the recorded rows): cancel first, then clip the norm of what is left
    rest, last = grads_of(4.0, 50.0)
    opt = _Opt([dict(params=[rest]), dict(params=[last], freeze_steps=5)])
    cfg.clip_mode = "global"
    norm = clip_gradients(opt, [rest, last], cfg, step=0, log_now=False)
    assert norm == pytest.approx(4.0, rel=1e-5) and rest.grad.norm().item() == pytest.approx(3.0)


# ----------------------------------------------------------------------------- drop path
def drop_rates(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, DropPath)]


def test_dino_student_drops_paths_teacher_never_and_eval_is_deterministic():
    dino, cfg = build("dino", "--img-size", "16", arch="vit_tiny")
    assert cfg.drop_path == 0.1
    assert max(drop_rates(dino.backbone)) == pytest.approx(0.1)
    assert max(drop_rates(dino.t_backbone)) == 0.0
    x = torch.randn(4, 3, 16, 16)
    dino.train()
    torch.manual_seed(1)
    a = dino.backbone(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, dino.backbone(x))  # active in the trained student
    torch.manual_seed(1)
    t = dino.t_backbone(x)
    torch.manual_seed(2)
    assert torch.equal(t, dino.t_backbone(x))  # never in the teacher, even in train mode
    dino.eval()
    assert torch.equal(dino.backbone(x), dino.backbone(x))  # off at eval


def test_drop_path_is_a_backbone_argument_and_vit_only():
    vit = build_backbone("vit_tiny", img_size=16, patch_size=4, drop_path=0.2)
    assert max(drop_rates(vit)) == pytest.approx(0.2) and min(drop_rates(vit)) == 0.0
    with pytest.raises(ValueError, match="drop-path"):
        build("byol", "--drop-path", "0.1")
    with pytest.raises(ValueError, match="drop_path"):
        build_backbone("resnet18", drop_path=0.1)


# ----------------------------------------------------------------------------- DINO rest
def test_dino_resnet_uses_syncbn_under_ddp():
    from selfsup.engine.distributed import has_batchnorm

    dino, _ = build("dino")
    assert method_class("dino").sync_bn and has_batchnorm(dino)


def test_dino_norm_last_layer_and_local_crop_scale_are_flags():
    dino, _ = build("dino", "--no-norm-last-layer", arch="vit_tiny")
    assert dino.head.last_layer.weight_g.requires_grad
    dino, _ = build("dino", arch="vit_tiny")
    assert not dino.head.last_layer.weight_g.requires_grad
    r = train_recipe(config("dino", "--n-local", "2", "--local-crop-scale", "0.1", "0.3"))
    assert [v.scale for v in r.views[2:]] == [(0.1, 0.3)] * 2
    assert r.views[0].scale == (0.4, 1.0)


def test_dino_vit_init_is_trunc_normal_002():
    dino, cfg = build("dino", arch="vit_tiny")
    assert cfg.vit_init == "trunc_normal"
    w = dino.backbone.blocks[0].attn.qkv.weight  # xavier over (192 + 192): std 0.072
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    mae, _ = build("mae", arch="vit_tiny")
    assert mae.backbone.blocks[0].attn.qkv.weight.std().item() > 0.05


def test_dino_reads_its_step_without_a_device_sync():
    dino, _ = build("dino", "--img-size", "16", arch="vit_tiny")
    views = [torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 2
    dino.on_step_end(6, 100)
    assert int(dino.step) == 7
    # forward indexes the schedule with the buffer on the device (index_select: no host
    # read; tests/test_dino_sinkhorn.py compiles the forward into one graph across steps)
    out = dino(views)
    assert float(out["teacher_temp"]) == pytest.approx(float(dino.teacher_temps[7]))
    assert float(dino.teacher_temps[7]) != float(dino.teacher_temps[0])
    # a resumed run: step 7 comes back from the state dict
    fresh, _ = build("dino", "--img-size", "16", arch="vit_tiny")
    fresh.load_state_dict(dino.state_dict())
    assert float(fresh(views)["teacher_temp"]) == pytest.approx(float(dino.teacher_temps[7]))


# ----------------------------------------------------------------------------- augmentation
def test_mocov3_uses_byols_asymmetric_recipe():
    for arch, scale in (("vit_small", (0.08, 1.0)), ("resnet50", (0.2, 1.0))):
        r = train_recipe(config("mocov3", arch=arch))
        v1, v2 = r.views
        assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
        assert v1.jitter == (0.4, 0.4, 0.2, 0.1) and v1.jitter_p == 0.8 and v1.gray_p == 0.2
        assert v1.scale == v2.scale == scale


def test_simclr_recipe_has_strength_one_jitter_and_small_crops():
    v1, v2 = train_recipe(config("simclr")).views
    assert v1 == v2 and v1.scale == (0.08, 1.0) and v1.jitter == (0.8, 0.8, 0.8, 0.2)
    assert (v1.jitter_p, v1.gray_p, v1.blur_p) == (0.8, 0.2, 0.5)
    half = train_recipe(config("simclr", "--jitter-strength", "0.5")).views[0]
    assert half.jitter == (0.4, 0.4, 0.4, 0.1)


def test_dino_and_mae_crops_are_bicubic():
    for method in ("dino", "mae"):
        assert {v.interp for v in train_recipe(config(method, arch="vit_small")).views} == \
            {"cubic"}
    assert {v.interp for v in train_recipe(config("byol")).views} == {"linear"}
    r = train_recipe(config("dino", "--interp", "linear"))
    assert {v.interp for v in r.views} == {"linear"}


IDENTITY_ROW = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], np.float32)


@pytest.mark.parametrize("n_in,n_out", [(20, 12), (10, 16)])
def test_portable_bicubic_crop_is_pillows_antialiased_bicubic(n_in, n_out):
    """Keys' a = -0.5 stretched when shrinking: torch's antialiased bicubic (Pillow's), away
    from the borders (there ours repeats the edge pixel, as DALI, where torch renormalizes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, n_in, n_in, generator=g, dtype=torch.float64) * 255
    p = torch.from_numpy(np.tile(IDENTITY_ROW, (2, 1)))
    cubic = T.crop_resize(x, p, n_out, "cubic")
    ref = F.interpolate(x, size=(n_out, n_out), mode="bicubic", align_corners=False,
                        antialias=True).clamp(0, 255)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    torch.testing.assert_close(cubic[inner], ref[inner], rtol=0, atol=1e-9)
    assert (T.crop_resize(x, p, n_out) - cubic).abs().max() > 1  # not the bilinear one
    mirrored = torch.from_numpy(np.tile(IDENTITY_ROW[[0, 3, 2, 1, 4, 5, 6, 7, 8, 9, 10]],
                                        (2, 1)))
    torch.testing.assert_close(T.crop_resize(x, mirrored, n_out, "cubic"), cubic.flip(-1))


def test_pillow_path_resizes_bicubic_when_asked():
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(0).random((30, 30)) * 255).astype(np.uint8))
    p = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], np.float32)
    want = np.asarray(img.resize((12, 12), Image.BICUBIC, box=(0, 0, 30, 30),
                                 reducing_gap=None))
    assert np.array_equal(T.crop_resize_pil(img, p, 12, "cubic"), want)
    assert not np.array_equal(T.crop_resize_pil(img, p, 12), want)


def test_bicubic_views_fall_back_to_dalis_stock_graph(monkeypatch):
    pytest.importorskip("nvidia.dali")
    from selfsup.data import dali as dali_mod

    calls = []
    monkeypatch.setattr(dali_plugin, "enabled", lambda: True)
    monkeypatch.setattr(dali_plugin, "load", lambda: calls.append(1) or False)
    images = np.random.default_rng(0).integers(0, 255, (4, 20, 20, 1), dtype=np.uint8)

    def run(recipe):
        params = [np.stack([T_ID] * 4) for _ in recipe.views]
        pipe = dali_mod.build_pipeline(recipe, lambda i: (images, *params), encoded=False,
                                       src_chans=1, batch_size=4, num_threads=1,
                                       device_id=None)
        return pipe.run()

    T_ID = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0], np.float32)
    out = run(get_recipe("mae", 16, 1))  # bicubic: the fused operator is never asked for
    assert not calls
    cubic = dali_mod.to_torch(out[0], False)
    assert cubic.dtype == torch.uint8  # the stock graph's output
    run(get_recipe("mae", 16, 1, interp="linear"))
    assert calls  # a linear recipe would take the fused operator when it loads
    # the portable path computes what DALI's cubic resize does, within uint8 rounding (0.2
    # levels on average measured on Fashion-MNIST crops; DALI's linear resize is ~8 away)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    ref = T.crop_resize(x, torch.from_numpy(np.stack([T_ID] * 4)), 16, "cubic")
    assert (cubic.permute(0, 3, 1, 2).float() - ref).abs().mean() < 0.5


# ----------------------------------------------------------------------------- optimization
def test_sqrt_lr_scaling():
    cfg = config("simclr", "--lr-scaling", "sqrt", "--blr", "0.075", "--batch-size", "256")
    assert cfg.peak_lr(world_size=16) == pytest.approx(0.075 * math.sqrt(4096))  # 4.8
    assert config("simclr", "--batch-size", "256").peak_lr(16) == pytest.approx(4.8)  # 0.3*16


def test_mocov1_step_schedule_drops_at_120_and_160_of_200_epochs():
    cfg = config("mocov1", "--batch-size", "256")
    assert cfg.lr_schedule == "step" and tuple(cfg.lr_milestones) == (120.0, 160.0)
    lr = lr_schedule(cfg, cfg.peak_lr(), 2000, 10, 0)
    assert lr[1199] == pytest.approx(0.03) and lr[1200] == pytest.approx(0.003)
    assert lr[1599] == pytest.approx(0.003) and lr[1600] == pytest.approx(0.0003)
    assert lr[-1] == pytest.approx(0.0003)
    custom = config("mocov2", "--lr-schedule", "step", "--lr-milestones", "5", "--lr-gamma",
                    "0.5")
    assert lr_schedule(custom, 1.0, 100, 10, 0)[49:51].tolist() == [1.0, 0.5]
    assert config("mocov2").lr_schedule == "cosine"


def last_bn_gammas(net: nn.Module) -> list[torch.Tensor]:
    return [(m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight for m in net.modules()
            if isinstance(m, (BasicBlock, Bottleneck))]


def test_zero_init_residual_for_mocov3_and_simsiam():
    for method in ("mocov3", "simsiam"):
        m, cfg = build(method)
        assert cfg.zero_init_residual
        gammas = last_bn_gammas(m.backbone)
        assert gammas and all(bool((g == 0).all()) for g in gammas)
    m, _ = build("mocov2")
    assert all(bool((g == 1).all()) for g in last_bn_gammas(m.backbone))
    r50 = build_backbone("resnet50", zero_init_residual=True)
    assert all(bool((g == 0).all()) for g in last_bn_gammas(r50))


def test_weight_decay_on_every_parameter_where_the_official_code_has_it():
    for method in ("mocov1", "mocov2", "simsiam", "mocov3"):
        m, cfg = build(method)
        groups = m.param_groups(cfg)
        assert all(g.get("apply_wd", True) for g in groups), method
        m, cfg = build(method, "--no-decay-all")  # today's exemption, one flag away
        assert any(g.get("apply_wd", True) is False for g in m.param_groups(cfg)), method
    for method in ("byol", "simclr"):
        m, cfg = build(method)
        assert any(g.get("apply_wd", True) is False for g in m.param_groups(cfg)), method


def test_mocov3_mlps_have_no_bias():
    m, _ = build("mocov3")
    linears = [x for x in [*m.projector.modules(), *m.predictor.modules()]
               if isinstance(x, nn.Linear)]
    assert linears and all(x.bias is None for x in linears)
    m, _ = build("mocov3", "--mlp-bias")
    assert m.predictor[-1].bias is not None


def test_simsiam_projector_hidden_is_the_backbone_width():
    cfg = config("simsiam", "--img-size", "16")
    assert cfg.proj_hidden is None
    m = method_class("simsiam")(cfg)
    assert m.projector[0].out_features == m.backbone.feature_dim == 256


def test_byol_preset_is_the_official_300_epoch_one():
    cfg = config("byol")
    assert (cfg.epochs, cfg.blr, cfg.wd, cfg.ema_momentum) == (300, 0.3, 1e-6, 0.99)


# ----------------------------------------------------------------------------- SimCLR
def test_simclr_local_anchors_against_gathered_keys_equal_the_full_loss():
    from selfsup.kernels import nt_xent_ref
    from selfsup.ssl.simclr import local_nt_xent

    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    full = nt_xent_ref(z1, z2, 0.2)
    dz1, dz2 = torch.autograd.grad(full, (z1, z2))
    world, n = 3, 2
    k1, k2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    losses = [local_nt_xent(k1[r * n:(r + 1) * n].double(), k2[r * n:(r + 1) * n].double(),
                            k1, k2, r * n, 0.2) for r in range(world)]
    mean = torch.stack(losses).mean()
    torch.testing.assert_close(mean.double(), full, rtol=1e-6, atol=1e-7)
    g1, g2 = torch.autograd.grad(mean, (z1, z2))
    torch.testing.assert_close(g1, dz1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g2, dz2, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the queue
def _queue_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    from selfsup.engine.distributed import wrap

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=2)
    try:
        torch.manual_seed(100 + rank)  # as the trainer: seed + rank
        cfg = config("mocov2", *SMALL)
        method = method_class("mocov2")(cfg)
        wrap(method, cfg, torch.device("cpu"))
        torch.save({"queue": method.queue.queue.clone(),
                    "key": method.key_backbone.conv1.weight.clone()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.dist
def test_moco_queue_is_identical_on_two_ranks_after_setup(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    mp.spawn(_queue_rank, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["key"], r1["key"])


# ----------------------------------------------------------------------------- records
def _quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RECORDED = json.loads((ROOT / "bench" / "results" / "quality.json").read_text())
OLD_RECIPES = {"mocov1": "mocov1", "mocov2": "mocov2", "mocov3": "mocov2", "simsiam": "mocov2",
               "byol": "byol", "simclr": "mocov2", "dino": "dino", "mae": "mae",
               "barlowtwins": "byol", "vicreg": "byol", "swav": "swav"}  # issue 28: their own
# rows first recorded after issue 25, on today's presets (tests/test_quality.py checks that
# each ran today's recipe; there is no older behaviour to pin)
NEW_ROWS = {"ibot", "dinov2"}


PINNED = [r for r in RECORDED if r["method"] in OLD_RECIPES and r.get("preset") != "small"]


def test_every_recorded_row_is_pinned_or_new():
    # issue 26: a row re-measured on the small preset runs today's preset, nothing to pin
    short = {r["method"] for r in RECORDED if r.get("preset") == "small"}
    assert {r["method"] for r in RECORDED} <= set(OLD_RECIPES) | NEW_ROWS | short


@pytest.mark.parametrize("row", PINNED, ids=[r["method"] for r in PINNED])
def test_recorded_rows_pin_the_behaviour_they_ran(row):
    """The rows were measured before issue 25's presets: their commands must still run the
    old recipe, optimizer groups, init and clipping (numbers are never re-recorded)."""
    argv = _quality().as_recorded(row["command"].split()[2:])  # before --preset: imagenet
    cfg = resolve_cli(argv)
    assert cfg.preset == "imagenet"
    cls = method_class(cfg.method)
    assert recipe_name(cfg, cls) == OLD_RECIPES[cfg.method]
    assert {v.interp for v in train_recipe(cfg).views} == {"linear"}
    assert not cfg.decay_all and not cfg.zero_init_residual and cfg.mlp_bias is not False
    assert cfg.clip_mode == "global" and not cfg.drop_path
    assert cfg.vit_init in (None, "xavier") and cfg.lr_schedule == "cosine"
    assert cfg.jitter_strength is None and cfg.local_crop_scale is None
    assert cfg.norm_last_layer is not False
    pin = _quality().PIN.get(row["method"], [])
    assert pin[-2:] == ["--preset", "imagenet"]  # issue 26: what the row ran, said explicitly
    assert " ".join(pin[:-2]) in row["command"]  # the same flags as quality.py's PIN


# ----------------------------------------------------------------------------- docs
def test_docs_recipes_is_generated_from_the_presets():
    from selfsup import recipes_doc

    assert (ROOT / "docs" / "recipes.md").read_text() == recipes_doc.render(), \
        "docs/recipes.md is stale: run python -m selfsup.recipes_doc"


def test_docs_recipes_shows_each_method_and_marks_differences(monkeypatch):
    from selfsup import recipes_doc

    text = recipes_doc.render()
    for method, arch, *_ in recipes_doc.METHODS:
        assert f"`--method {method} --arch {arch}`" in text
    assert "**differs** |" not in text
    # a preset that drifts from the official value shows up
    cls = method_class("byol")
    old = cls.preset
    monkeypatch.setattr(cls, "preset", classmethod(lambda c, arch: {**old(arch), "wd": 1e-4}))
    assert "| weight decay | 0.0001 **differs** |" in recipes_doc.render()


def test_aug_names_a_training_recipe():
    with pytest.raises(ValueError, match="--aug must be one of"):
        recipe_name(config("byol", "--aug", "imagenet"), method_class("byol"))
    assert recipe_name(config("mocov3", "--aug", "mocov2"), method_class("mocov3")) == "mocov2"
