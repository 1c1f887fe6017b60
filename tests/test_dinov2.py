"""DINOv2: training runs, the KoLeo term and its weight, the Sinkhorn / center switch for both
losses against the references, registers and LayerScale in the model, the presets, and
--init-from with a round trip through selfsup.export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_dino_sinkhorn import sinkhorn_loss_ref, teacher_logits
from test_ibot_method import (
    COMPILE_FLAGS,
    assert_compiled_steps_match_eager,
    assert_eager_steps_unchanged,
    compile_masked_forward,
)
from test_trainer import config, read_log

from selfsup import export as export_cli
from selfsup.engine.init_from import apply_init_from
from selfsup.engine.trainer import method_class, train
from selfsup.kernels import ibot_patch_loss_ref, koleo_loss_ref
from selfsup.kernels.swav import sinkhorn_knopp_ref
from selfsup.kernels.testing import TOL64

VIT = ["--arch", "vit_tiny", "--img-size", "32", "--batch-size", "8", "--drop-path", "0"]


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def build(tmp_path: Path, *extra: str, arch_flags=VIT):
    cfg = config("dinov2", tmp_path, *arch_flags, *extra)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100, world_size=1)  # as train() sets
    return cfg, method_class(cfg)(cfg)


def views(b: int = 4, size: int = 32, local: int = 16, n_local: int = 2) -> list[torch.Tensor]:
    return ([torch.randn(b, 3, size, size) for _ in range(2)]
            + [torch.randn(b, 3, local, local) for _ in range(n_local)])


# ----------------------------------------------------------------------------- end to end
def test_trains_two_steps_with_every_term_logged(tmp_path):
    cfg = config("dinov2", tmp_path, "--steps", "2")  # vit_tiny, 16 px, B 32 (test_trainer)
    assert train(cfg)["steps"] == 2
    rows = read_log(Path(cfg.out))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "cls_loss", "patch_loss", "koleo", "teacher_entropy",
                  "teacher_patch_entropy", "masked_fraction", "grad_norm"):
            assert math.isfinite(r[k]), (k, r)
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["patch_loss"] + r["koleo"],
                                          rel=1e-5)
        assert 0 < r["koleo"]  # -log of nearest-neighbour distances < 2 on the unit sphere
        assert 0 < r["teacher_entropy"] <= math.log(128) + 1e-4  # --out-dim 128
        # half the images masked, each at 0.1-0.5 of its patches
        assert 0.05 * 0.5 <= r["masked_fraction"] <= 0.25 + 1e-6


def test_koleo_weight_scales_the_term_and_reaches_only_the_backbone(tmp_path):
    torch.manual_seed(0)
    x = views(size=16, local=8)
    out, grads = {}, {}
    ref = None
    for w in ("0", "0.1", "0.3"):
        _, m = build(tmp_path / w, "--koleo-weight", w)
        if ref is None:
            ref = m.state_dict()
        m.load_state_dict(ref)  # same weights; the masks depend on (seed, rank, step) only
        o = m(x)
        o["loss"].backward()
        out[w] = {k: v.detach() if torch.is_tensor(v) else v for k, v in o.items()}
        grads[w] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert "koleo" not in out["0"]
    for w in ("0.1", "0.3"):
        o = out[w]
        # the term is w * sum over the 2 global crops of KoLeo of the student's cls tokens
        assert float(o["loss"]) == pytest.approx(
            float(o["cls_loss"] + o["patch_loss"] + o["koleo"]), rel=1e-6)
        assert float(o["cls_loss"]) == pytest.approx(float(out["0"]["cls_loss"]), rel=1e-6)
    assert float(out["0.3"]["koleo"]) == pytest.approx(3 * float(out["0.1"]["koleo"]), rel=1e-5)
    moved = [n for n in grads["0"] if not torch.allclose(grads["0.1"][n], grads["0"][n],
                                                           rtol=1e-5, atol=1e-9)]
    assert moved and all(n.startswith("backbone.") for n in moved), moved


def test_koleo_is_summed_over_the_two_global_crops(tmp_path):
    _, m = build(tmp_path)
    cls = torch.randn(10, 24, dtype=torch.float64)
    got = m.extra_losses({"cls_tokens": cls}, {}, None)["koleo"]
    want = 0.1 * (koleo_loss_ref(cls[:5]) + koleo_loss_ref(cls[5:]))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- centering
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_sinkhorn_losses_match_the_references(seed, backend, tmp_path, path):
    backend(path)
    _, m = build(tmp_path, "--out-dim", "19", "--n-local", "1")
    m = m.double()
    assert m.centering == "sinkhorn"  # DINOv2's default
    tau = torch.tensor(0.05, dtype=torch.float64)
    b, k = 3, 19
    s = torch.randn(3 * b, k, dtype=torch.float64, requires_grad=True)
    t = teacher_logits(2 * b, k, 0.6)
    loss = m.cls_loss(s, t, tau)
    torch.testing.assert_close(loss, sinkhorn_loss_ref(s, t, 0.1, 0.05), **TOL64)
    p = sinkhorn_knopp_ref(t, 0.05, 3)
    ent = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(m.criterion.last_stats["teacher_entropy"], ent, **TOL64)
    # the patch loss: Sinkhorn over the masked tokens, then iBOT's per-image weighting
    masks = torch.zeros(2 * b, 5, dtype=torch.bool)
    masks[0, :3] = masks[2, 1] = masks[3, 2:] = True  # images 1, 4, 5 unmasked
    n = int(masks.sum())
    sp = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    tp = teacher_logits(n, k, 0.6)
    got = m.patch_loss(sp, tp, masks, tau)
    pp = sinkhorn_knopp_ref(tp, 0.05, 3)
    want = ibot_patch_loss_ref(sp, pp, masks, None, student_temp=0.1)
    torch.testing.assert_close(got, want, **TOL64)
    (g,) = torch.autograd.grad(got * 1.7, sp)
    (g_ref,) = torch.autograd.grad(want * 1.7, sp)
    torch.testing.assert_close(g, g_ref, **TOL64)
    ent = -(pp * pp.log()).sum(-1).mean()
    torch.testing.assert_close(m.patch_criterion.last_stats["teacher_entropy"], ent, **TOL64)
    # no EMA center in this mode
    assert not m.criterion.center.any() and not m.patch_criterion.center.any()


def test_center_switch_gives_ibots_centered_teachers(tmp_path):
    torch.manual_seed(0)
    x = views()
    _, sink = build(tmp_path / "s")
    _, cent = build(tmp_path / "c", "--centering", "center")
    cent.load_state_dict(sink.state_dict())
    assert (sink.centering, cent.centering) == ("sinkhorn", "center")
    a, b = sink(x), cent(x)
    assert not torch.allclose(a["cls_loss"], b["cls_loss"])
    assert not torch.allclose(a["patch_loss"], b["patch_loss"])
    assert not sink.criterion.center.any() and not sink.patch_criterion.center.any()
    assert cent.criterion.center.any() and cent.patch_criterion.center.any()  # EMA moved


def test_a_batch_without_masks_gives_a_zero_patch_loss_under_sinkhorn(tmp_path):
    # every rank still runs the patch Sinkhorn (its all-reduces) on 0 rows
    _, m = build(tmp_path, "--mask-probability", "0")
    out = m(views())
    assert float(out["patch_loss"]) == 0.0 and float(out["masked_fraction"]) == 0.0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_bad_flags_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="--koleo-weight"):
        build(tmp_path, "--koleo-weight", "-1")
    cfg, _ = build(tmp_path)
    cfg.centering = "nope"
    with pytest.raises(ValueError, match="--centering"):
        method_class(cfg)(cfg)
    with pytest.raises(ValueError, match="ViT"):
        build(tmp_path, arch_flags=["--arch", "resnet_tiny"])


# ----------------------------------------------------------------------------- compile
# IBOT's device temperatures reach the Sinkhorn teachers (sinkhorn_center) as a 0-d tensor
@pytest.mark.parametrize("centering", ["sinkhorn", "center"])
def test_eager_steps_are_bit_identical_to_float_temperatures(seed, tmp_path, centering):
    _, m = build(tmp_path, "--out-dim", "64", "--centering", centering)  # warm-up: 100 steps
    assert_eager_steps_unchanged(m, warm=100, loss_keys=("loss", "cls_loss", "patch_loss",
                                                         "koleo"))


@pytest.mark.parametrize("centering", ["sinkhorn", "center"])
def test_compiled_dinov2_matches_eager_without_recompiling(seed, tmp_path, centering):
    _, m = build(tmp_path, *COMPILE_FLAGS, "--centering", centering)
    assert_compiled_steps_match_eager(m.double(), compile_masked_forward)


# ----------------------------------------------------------------------------- model
def test_registers_and_layer_scale_reach_student_and_teacher(tmp_path):
    _, m = build(tmp_path, "--registers", "2", "--layer-scale", "1e-4")
    for net in (m.backbone, m.t_backbone):
        assert net.num_registers == 2 and net.reg_token.shape == (1, 2, 192)
        for blk in (net.blocks[0], net.blocks[-1]):
            for ls in (blk.ls1, blk.ls2):
                assert torch.all(ls.gamma == 1e-4)
    out = m(views())
    assert torch.isfinite(out["loss"])
    _, m = build(tmp_path / "d")  # the preset: LayerScale 1e-5, no registers
    assert m.backbone.num_registers == 0
    assert torch.all(m.backbone.blocks[0].ls1.gamma == 1e-5)


def test_the_patch_embedding_learns_at_a_fifth_of_the_lr(tmp_path):
    cfg, m = build(tmp_path)
    groups = m.param_groups(cfg)
    embed = {id(p) for p in m.backbone.patch_embed.parameters()}
    seen = []
    for g in groups:
        ids = {id(p) for p in g["params"]}
        if ids & embed:
            assert ids <= embed and g["lr_scale"] == pytest.approx(0.2)
        else:
            assert g.get("lr_scale", 1.0) == 1.0
        seen += list(ids)
    assert len(seen) == len(set(seen))  # each parameter in one group
    assert set(seen) == {id(p) for p in m.parameters() if p.requires_grad}
    frozen = [g for g in groups if g.get("name") == "last_layer"]
    assert frozen and all(g["freeze_steps"] == cfg.freeze_last_layer_epochs * 10 for g in frozen)


def test_presets_follow_the_dinov2_configs():
    from selfsup.engine.config import resolve

    cls = method_class("dinov2")
    s = resolve({"method": "dinov2", "arch": "vit_s14"}, cls.preset)
    assert (s.out_dim, s.patch_out_dim, s.separate_patch_head, s.proj_dim) == (65536, 65536,
                                                                             False, 256)
    assert (s.centering, s.koleo_weight, s.layer_scale, s.ema_momentum) == ("sinkhorn", 0.1,
                                                                            1e-5, 0.992)
    assert (s.mask_probability, s.mask_ratio_range, s.drop_path) == (0.5, (0.1, 0.5), 0.3)
    assert s.norm_last_layer is False and s.crop_scale == (0.32, 1.0)
    s.batch_size = 1024  # lr = 0.004 * sqrt(batch / 1024)
    assert s.peak_lr() == pytest.approx(0.004)
    s.batch_size = 256
    assert s.peak_lr() == pytest.approx(0.002)
    for arch in ("vit_l14", "vit_giant14"):
        big = resolve({"method": "dinov2", "arch": arch}, cls.preset)
        assert (big.out_dim, big.patch_out_dim, big.separate_patch_head, big.proj_dim) == (
            131072, 131072, True, 384)
        assert (big.drop_path, big.ema_momentum, big.epochs, big.wd_end) == (0.4, 0.994, 500,
                                                                            0.2)
        big.batch_size = 1024
        assert big.peak_lr() == pytest.approx(2e-4)
    b = resolve({"method": "dinov2", "arch": "vit_b14"}, cls.preset)
    assert b.out_dim == 65536 and not b.separate_patch_head


@pytest.mark.parametrize("arch,img,patch,local", [("vit_s14", 224, None, 98),
                                                  ("vit_small", 224, None, 96),
                                                  ("vit_tiny", 32, None, 16),
                                                  ("vit_tiny", 224, 14, 98)])
def test_local_crops_are_a_whole_number_of_patches(arch, img, patch, local):
    from selfsup.engine.config import resolve

    cli = {"method": "dinov2", "arch": arch, "img_size": img}
    if patch:
        cli["patch_size"] = patch
    cfg = resolve(cli, method_class("dinov2").preset)
    kw = method_class("dinov2").recipe_kwargs(cfg)
    assert kw["local_size"] == local and kw["n_local"] == 8


def test_masks_are_dinov2s_stratified_draw(tmp_path):
    _, m = build(tmp_path)
    gen = m.masking((8, 8))
    masks = gen(16, __import__("random").Random(3))
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 8  # exactly half the images: int(16 * 0.5)
    assert counts.max() <= 32 and counts[counts > 0].min() >= round(0.1 * 64)


# ----------------------------------------------------------------------------- init-from
def test_init_from_round_trip_through_export(tmp_path):
    src = config("dinov2", tmp_path / "src", "--steps", "2", "--registers", "1")
    train(src)
    file = tmp_path / "vit.safetensors"
    assert export_cli.main(["--checkpoint", src.out, "--out", str(file)]) == 0
    sd = export_cli.load_exported(file)
    assert "reg_token" in sd and "mask_token" not in sd
    cfg = config("dinov2", tmp_path / "dst", "--registers", "1", "--init-from", str(file))
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100, world_size=1)
    m = method_class(cfg)(cfg)
    fresh_head = {k: v.clone() for k, v in m.head.state_dict().items()}
    fresh_mask = m.backbone.mask_token.detach().clone()
    info = apply_init_from(m, cfg)
    assert info["backbones"] == ["backbone", "t_backbone"]
    for net in (m.backbone, m.t_backbone):
        own = net.state_dict()
        assert set(own) - set(sd) == {"mask_token"}  # the one key export leaves out
        for k, v in sd.items():
            assert torch.equal(own[k], v), k
        assert torch.equal(net.mask_token, fresh_mask)
    for k, v in m.head.state_dict().items():  # heads fresh
        assert torch.equal(v, fresh_head[k])
    # and the continued run trains
    cfg = config("dinov2", tmp_path / "run", "--registers", "1", "--init-from", str(file),
                 "--steps", "1", "--init-warmup-steps", "1")
    assert train(cfg)["steps"] == 1
    assert math.isfinite(read_log(Path(cfg.out))[-1]["loss"])

