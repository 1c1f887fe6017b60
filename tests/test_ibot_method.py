"""iBOT: block masks, the ViT mask token, the method (masked student, unmasked teacher, patch
loss on the masked tokens only), its flags, heads, resume and --init-from."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from test_trainer import config, read_log
from torch._dynamo.testing import CompileCounterWithBackend

from selfsup.engine import checkpoint as ckpt
from selfsup.engine.init_from import apply_init_from
from selfsup.engine.trainer import method_class, train
from selfsup.kernels import teacher_temp_schedule
from selfsup.kernels.testing import TOL64, fresh_seed
from selfsup.models import build_backbone
from selfsup.ssl.masking import BlockMasking, block_mask, draw_blocks, mask_rng

IBOT = ["--arch", "vit_tiny", "--img-size", "32", "--batch-size", "8"]  # 8 x 8 patch grid


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")


def build(tmp_path: Path, *extra: str):
    cfg = config("ibot", tmp_path, *IBOT, *extra)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100, world_size=1)  # as train() sets
    return cfg, method_class(cfg)(cfg)


def views(b: int = 4, size: int = 32, local: int = 16, n_local: int = 2) -> list[torch.Tensor]:
    return ([torch.randn(b, 3, size, size) for _ in range(2)]
            + [torch.randn(b, 3, local, local) for _ in range(n_local)])


# ----------------------------------------------------------------------------- masking
def test_block_masks_hit_the_exact_count_in_the_ratio_range():
    seed = fresh_seed()
    gen = BlockMasking((14, 14), (0.1, 0.5), probability=1.0)
    masks = gen(200, mask_rng(seed))
    assert masks.shape == (200, 196) and masks.dtype == torch.bool and masks.device.type == "cpu"
    counts = masks.sum(1)
    assert counts.min() >= round(0.1 * 196) and counts.max() <= round(0.5 * 196)
    assert counts.float().std() > 10  # the ratio is drawn per image, not one for all
    for n in (0, 1, 3, 4, 37, 196):  # exact, including below one block and the whole grid
        assert sum(block_mask(14, 14, n, mask_rng(seed, n))) == n


def test_blocks_are_rectangles_of_at_least_four_patches_in_the_aspect_range():
    seed = fresh_seed()
    for i in range(50):
        h, w = (14, 14) if i % 2 else (7, 11)
        mask, rects = draw_blocks(h, w, round(0.4 * h * w), mask_rng(seed, i))
        assert rects
        union = [False] * (h * w)
        for top, left, bh, bw in rects:
            assert bh * bw >= 4 and top + bh <= h and left + bw <= w
            assert 0.3 / 2 <= bh / bw <= 2 / 0.3  # log-uniform in [0.3, 1/0.3], +- rounding
            for r in range(top, top + bh):
                for c in range(left, left + bw):
                    union[r * w + c] = True
        assert mask == union  # the block phase masks exactly the rectangles' union
        assert sum(mask) <= round(0.4 * h * w)


def test_one_block_is_connected():
    """A target of 4..7 patches on an empty grid is one rectangle (a second would need 4 more
    patches): a single 4-connected set."""
    seed = fresh_seed()
    for i in range(30):
        mask, rects = draw_blocks(8, 8, 4 + i % 4, mask_rng(seed, i))
        on = {(j // 8, j % 8) for j, m in enumerate(mask) if m}
        assert len(rects) == 1 and on
        seen, todo = set(), [next(iter(on))]
        while todo:
            r, c = todo.pop()
            if (r, c) in seen or (r, c) not in on:
                continue
            seen.add((r, c))
            todo += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
        assert seen == on


def test_masks_are_a_function_of_the_key():
    seed = fresh_seed()
    gen = BlockMasking((8, 8), (0.1, 0.5), probability=0.5)
    a, b = gen(32, mask_rng(seed, 0, 5, 0)), gen(32, mask_rng(seed, 0, 5, 0))
    assert torch.equal(a, b)
    for other in ((seed, 1, 5, 0), (seed, 0, 6, 0), (seed, 0, 5, 1), (seed + 1, 0, 5, 0)):
        assert not torch.equal(a, gen(32, mask_rng(*other))), other


def test_masking_probability():
    seed = fresh_seed()
    for p in (0.0, 0.3, 1.0):
        masked = BlockMasking((8, 8), probability=p)(4000, mask_rng(seed)).any(1).float()
        assert abs(masked.mean().item() - p) < 0.04  # > 5 sigma at p = 0.3
    strat = BlockMasking((8, 8), (0.1, 0.5), probability=0.5, stratified=True)
    m = strat(10, mask_rng(seed))
    assert m.any(1).sum() == 5  # DINOv2: exactly int(n p) images
    ratios = sorted(m.sum(1)[m.any(1)].tolist())
    # one ratio per bin of linspace(0.1, 0.5, 6): bins of 0.08 x 64 patches
    for i, n in enumerate(ratios):
        assert 64 * (0.1 + 0.08 * i) - 1 <= n <= 64 * (0.1 + 0.08 * (i + 1)) + 1


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=(0.5, 0.1)), "ratio"), (dict(ratio=(0.1, 1.5)), "ratio"),
    (dict(probability=1.5), "probability"), (dict(min_block=0), "min_block"),
    (dict(grid=(0, 4)), "grid")])
def test_bad_masking_arguments_are_named(kw, match):
    kw = {"grid": (8, 8), **kw}
    with pytest.raises(ValueError, match=match):
        BlockMasking(**kw)


# ----------------------------------------------------------------------------- mask token
def test_mask_token_replaces_the_masked_patch_embeddings_before_pos():
    fresh_seed()
    vit = build_backbone("vit_tiny", img_size=16, patch_size=4, pos_embed="learned",
                         registers=2, mask_token=True)
    assert vit.mask_token.shape == (1, 1, vit.embed_dim) and not vit.mask_token.any()
    with torch.no_grad():
        vit.mask_token.normal_()
    x = torch.randn(3, 3, 16, 16)
    mask = torch.rand(3, 16) < 0.4
    mask[0] = False  # one image unmasked
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    vit.forward_features(x, mask=mask)
    pos = vit.pos_embed[:, 1:]
    patches = seen["x"][:, 1 + 2:]  # after cls and the 2 registers
    emb = vit.patch_embed(x)
    torch.testing.assert_close(patches[mask], (vit.mask_token[0] + pos[0])
                               .expand(3, -1, -1)[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(patches[~mask], (emb + pos)[~mask], rtol=0, atol=1e-6)


def test_without_a_mask_the_model_is_unchanged_bit_for_bit():
    seed = fresh_seed()
    torch.manual_seed(seed)
    plain = build_backbone("vit_tiny", img_size=16, patch_size=4, pos_embed="learned")
    torch.manual_seed(seed)
    masked = build_backbone("vit_tiny", img_size=16, patch_size=4, pos_embed="learned",
                            mask_token=True)
    assert "mask_token" not in plain.state_dict() and "mask_token" in masked.state_dict()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(plain.forward_features(x), masked.forward_features(x))
    none = torch.zeros(2, 16, dtype=torch.bool)  # an all-False mask changes nothing either
    assert torch.equal(plain.forward_features(x), masked.forward_features(x, mask=none))


def test_bad_masks_are_refused():
    vit = build_backbone("vit_tiny", img_size=16, patch_size=4, mask_token=True)
    plain = build_backbone("vit_tiny", img_size=16, patch_size=4)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="mask_token=True"):
        plain.forward_features(x, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        vit.forward_features(x, mask=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        vit.forward_features(x, mask=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="not both"):
        vit.forward_features(x, torch.zeros(2, 4, dtype=torch.long),
                             mask=torch.zeros(2, 16, dtype=torch.bool))


# ----------------------------------------------------------------------------- the method
def test_teacher_never_sees_a_mask_and_locals_are_unmasked(tmp_path, monkeypatch):
    fresh_seed()
    _, m = build(tmp_path, "--mask-probability", "1")
    calls = {"student": [], "teacher": []}
    for name, net in (("student", m.backbone), ("teacher", m.t_backbone)):
        real = net.forward_features

        def spy(x, *a, _real=real, _name=name, **kw):
            calls[_name].append((tuple(x.shape), kw.get("mask")))
            return _real(x, *a, **kw)

        monkeypatch.setattr(net, "forward_features", spy)
    out = m(views())
    (t_shape, t_mask), = calls["teacher"]
    assert t_shape == (8, 3, 32, 32) and t_mask is None
    g_shape, g_mask = calls["student"][0]
    assert g_shape == (8, 3, 32, 32) and g_mask.shape == (8, 64) and g_mask.all(1).sum() == 0
    assert g_mask.any(1).all()  # probability 1: every global crop masked
    assert [mk for _, mk in calls["student"][1:]] == [None]  # the 2 locals, one batch
    assert out["masked_fraction"] == pytest.approx(g_mask.float().mean().item())


def test_patch_loss_reads_only_the_masked_tokens(tmp_path, monkeypatch):
    fresh_seed()
    _, m = build(tmp_path, "--mask-probability", "1")
    v = views()
    mask = m.draw_masks(8, (8, 8))
    monkeypatch.setattr(m, "draw_masks", lambda n, grid: mask)

    def run(where: torch.Tensor | None) -> float:
        """patch_loss with the student's patch tokens at `where` (8, 64) perturbed."""
        mm = copy.deepcopy(m)  # the centers move after each loss: start from the same ones
        real = mm.backbone.forward_features
        torch.manual_seed(0)  # the same stochastic-depth draws every time

        def perturbed(x, *a, **kw):
            out = real(x, *a, **kw)
            if where is not None and kw.get("mask") is not None:
                noise = torch.zeros_like(out)
                noise[:, 1:][where] = 5.0
                out = out + noise
            return out

        mm.backbone.forward_features = perturbed
        return mm(v)["patch_loss"].item()

    base = run(None)
    assert run(~mask) == base  # unmasked student tokens: no effect at all
    assert abs(run(mask) - base) > 1e-3


def test_the_patch_loss_pairs_each_crop_with_its_own_teacher_patches(tmp_path, monkeypatch):
    """loss == ibot_patch_loss_ref on the full (2B, N, K) student / teacher logits of the same
    crops, where the student saw its mask and the teacher did not."""
    from selfsup.kernels import ibot_patch_loss_ref

    fresh_seed()
    _, m = build(tmp_path, "--mask-probability", "1")
    v = views()
    mask = m.draw_masks(8, (8, 8))
    monkeypatch.setattr(m, "draw_masks", lambda n, grid: mask)
    m.eval()  # no stochastic depth: the recomputation below sees the same student
    center = m.patch_criterion.center.clone()
    out = m(v)
    with torch.no_grad():
        s_tok = m.backbone.forward_features(torch.cat(v[:2]), mask=mask)[:, 1:]
        t_tok = m.t_backbone.forward_features(torch.cat(v[:2]))[:, 1:]
        want = ibot_patch_loss_ref(m.head(s_tok), m.t_head(t_tok), mask, center,
                                   student_temp=0.1, teacher_temp=out["teacher_patch_temp"])
    torch.testing.assert_close(out["patch_loss"], want.float(), rtol=1e-5, atol=1e-6)


def test_shared_and_separate_heads(tmp_path):
    _, shared = build(tmp_path / "a")
    _, sep = build(tmp_path / "b", "--separate-patch-head", "--patch-out-dim", "96")
    n_head = sum(p.numel() for p in shared.head.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert not hasattr(shared, "patch_head")
    assert sep.patch_head.last_layer.out_features == 96 and sep.head.last_layer.out_features == 128
    n_patch = sum(p.numel() for p in sep.patch_head.parameters())
    assert count(sep) - count(shared) == n_patch != n_head  # one more head, 96 wide
    assert sep.patch_criterion.out_dim == 96 and shared.patch_criterion.out_dim == 128
    # both last layers frozen in epoch 1, the patch head EMA'd into its teacher
    groups = sep.param_groups(None)
    frozen = {id(p) for g in groups if g.get("freeze_steps") for p in g["params"]}
    assert {id(p) for p in sep.patch_head.last_layer.parameters() if p.requires_grad} <= frozen
    with torch.no_grad():
        sep.patch_head.last_layer.weight_v.add_(1.0)
    before = sep.t_patch_head.last_layer.weight_v.clone()
    sep.on_step_end(0, 100)
    assert not torch.equal(before, sep.t_patch_head.last_layer.weight_v)
    with pytest.raises(ValueError, match="--separate-patch-head"):
        build(tmp_path / "c", "--patch-out-dim", "96")


def test_flags_reach_the_method(tmp_path):
    cfg, m = build(tmp_path, "--mask-ratio-range", "0.2", "0.3", "--mask-probability", "0.25",
                   "--patch-loss-weight", "0.5", "--teacher-patch-temp", "0.06",
                   "--warmup-teacher-patch-temp", "0.03")
    assert m.mask_ratio == (0.2, 0.3) and m.mask_probability == 0.25
    assert m.masking((8, 8)).ratio == (0.2, 0.3) and m.patch_weight == 0.5
    assert [float(t) for t in m.teacher_temps_now()] == pytest.approx([0.04, 0.03])
    m.step.fill_(10 ** 6)  # past the schedule: its last values
    assert [float(t) for t in m.teacher_temps_now()] == pytest.approx([0.07, 0.06])
    m.step.zero_()
    assert m.patch_criterion.student_temp == cfg.temperature == 0.1
    out = m(views())
    w = out["loss"] - out["cls_loss"]
    torch.testing.assert_close(w, 0.5 * out["patch_loss"], rtol=1e-5, atol=1e-6)
    preset = method_class("ibot").preset("vit_small")
    assert (preset["out_dim"], preset["patch_out_dim"], preset["n_local"]) == (8192, 8192, 10)
    assert preset["norm_last_layer"] is False and preset["mask_ratio_range"] == (0.1, 0.5)
    for bad, match in ((("--mask-ratio-range", "0.6", "0.2"), "mask-ratio-range"),
                       (("--mask-probability", "2"), "mask-probability"),
                       (("--patch-loss-weight", "-1"), "patch-loss-weight")):
        with pytest.raises(ValueError, match=match):
            build(tmp_path / "bad", *bad)
    for bad in (("--centering", "sinkhorn"), ("--koleo-weight", "0.1")):  # dinov2's flags
        with pytest.raises(ValueError, match=f"{bad[0]} .*dinov2"):
            build(tmp_path / "dv2", *bad)
    with pytest.raises(ValueError, match="ViT"):
        cfg = config("ibot", tmp_path / "r", "--arch", "resnet_tiny")
        cfg.extra.update(steps_per_epoch=10, schedule_steps=100)
        method_class(cfg)(cfg)


def test_no_masked_image_gives_a_zero_patch_loss_with_gradients(tmp_path):
    _, m = build(tmp_path, "--mask-probability", "0")
    out = m(views())
    assert out["patch_loss"] == 0 and out["masked_fraction"] == 0
    assert out["uniform_loss"] == pytest.approx(math.log(128))  # the cls loss's ln K only
    out["loss"].backward()
    assert m.head.mlp[0].weight.grad is not None


def test_masks_depend_on_seed_step_and_micro_batch_only(tmp_path):
    """A resumed method (step from its state_dict) draws the uninterrupted run's masks;
    accumulated micro-batches of one step draw different ones."""
    _, a = build(tmp_path / "a")
    for s in range(3):
        a.on_step_end(s, 100)
    first, second = a.draw_masks(64, (8, 8)), a.draw_masks(64, (8, 8))
    assert not torch.equal(first, second)
    _, b = build(tmp_path / "b")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.draw_masks(64, (8, 8)), first)
    assert torch.equal(b.draw_masks(64, (8, 8)), second)
    b.on_step_end(3, 100)
    assert not torch.equal(b.draw_masks(64, (8, 8)), first)


# ----------------------------------------------------------------------------- end to end
def test_trains_two_steps_and_logs_both_losses(tmp_path):
    cfg = config("ibot", tmp_path, *IBOT, "--steps", "2", "--separate-patch-head",
                 "--patch-out-dim", "64", "--registers", "1")
    assert train(cfg)["steps"] == 2
    rows = read_log(Path(cfg.out))
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "cls_loss", "patch_loss", "teacher_entropy", "teacher_patch_entropy",
                  "masked_fraction", "masked_images", "grad_norm"):
            assert math.isfinite(r[k]), (k, r)
        assert r["loss"] == pytest.approx(r["cls_loss"] + r["patch_loss"], rel=1e-5)
        assert 0 <= r["masked_fraction"] <= 0.5
    assert 0 < rows[-1]["teacher_patch_entropy"] <= math.log(64) + 1e-4


def test_resume_gives_identical_weights(tmp_path):
    common = ("--epochs", "1")
    straight = config("ibot", tmp_path / "a", *IBOT, "--steps", "4", *common)
    train(straight)
    train(config("ibot", tmp_path / "b", *IBOT, "--steps", "2", *common))
    summary = train(config("ibot", tmp_path / "b", *IBOT, "--steps", "4", "--resume", "auto",
                           *common))
    assert summary["steps"] == 4
    a, b = ckpt.load(straight.out)["model"], ckpt.load(tmp_path / "b" / "ibot")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_from_loads_dinov2_mask_token_and_keeps_ours_without_one(tmp_path):
    from selfsup.models.export import export_state_dict

    fresh_seed()
    _, src = build(tmp_path / "src")
    with torch.no_grad():
        src.backbone.mask_token.normal_()
    ours = export_state_dict(src.backbone)  # timm names: no mask_token
    assert "mask_token" not in ours
    path = tmp_path / "ours.pth"
    torch.save(ours, path)
    cfg, m = build(tmp_path / "a", "--init-from", str(path))
    apply_init_from(m, cfg)
    assert not m.backbone.mask_token.any()  # kept fresh
    assert torch.equal(m.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)
    dinov2 = dict(ours, mask_token=src.backbone.mask_token.detach().reshape(1, -1))  # (1, D)
    torch.save(dinov2, path)
    cfg, m = build(tmp_path / "b", "--init-from", str(path))
    apply_init_from(m, cfg)
    for net in (m.backbone, m.t_backbone):
        assert torch.equal(net.mask_token, src.backbone.mask_token)
    cfg = config("dino", tmp_path / "d", *IBOT, "--init-from", str(path))
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100, world_size=1)
    dino = method_class(cfg)(cfg)
    apply_init_from(dino, cfg)  # a model without a mask token: the file's is dropped
    assert "mask_token" not in dino.backbone.state_dict()
    assert torch.equal(dino.backbone.blocks[0].attn.qkv.weight,
                       src.backbone.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------- compile
# The teacher temperatures are read on the device from the `step` buffer (as DINO's), so a
# compiled forward does not recompile per step; eager results must not change for it.
def float_temperatures(m, warm):
    """The code path before the device schedules: Python floats of the schedules (built
    here from the defaults, 0.04 -> 0.07 over `warm` of the 100 steps) at the host step."""
    schedule = teacher_temp_schedule(100, warm, 0.04, 0.07)

    def temps():
        t = float(schedule[min(m._current_step(), 99)])
        return t, t
    return temps


def assert_eager_steps_unchanged(new, warm, loss_keys=("loss", "cls_loss", "patch_loss"),
                                 steps=2):
    """`new` and a copy fed float temperatures give bit-identical losses, statistics,
    gradients and centers over `steps` steps whose temperatures differ."""
    old = copy.deepcopy(new)
    old.teacher_temps_now = float_temperatures(old, warm)
    temps = []
    for step in range(steps):
        batch = views()
        got, want = new(batch), old(batch)
        for out in (got, want):
            out["loss"].backward()
        for key in (*loss_keys, "teacher_entropy", "kl", "teacher_patch_entropy"):
            assert torch.equal(got[key], want[key]), (step, key)
        for key in ("teacher_temp", "teacher_patch_temp"):
            assert isinstance(got[key], torch.Tensor) and float(got[key]) == want[key], key
        assert float(got["momentum"]) == pytest.approx(old.momentum, rel=1e-7)
        for (name, p), q in zip(new.named_parameters(), old.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None) and (
                p.grad is None or torch.equal(p.grad, q.grad)), (step, name)
        for a, b in ((new.criterion, old.criterion), (new.patch_criterion, old.patch_criterion)):
            assert torch.equal(a.center, b.center), step
        temps.append(want["teacher_temp"])
        for m in (new, old):
            m.zero_grad()
            m.on_step_end(step, 100)
    assert len(set(temps)) == steps  # the warm-up moved between the steps


def test_eager_steps_are_bit_identical_to_float_temperatures(seed, tmp_path):
    # no stochastic depth (its draws would differ); warm-up over all 100 steps: 0.04, 0.0403
    _, m = build(tmp_path, "--out-dim", "64", "--drop-path", "0")
    assert_eager_steps_unchanged(m, warm=100)


def assert_compiled_steps_match_eager(method, compiled, steps=3):
    """3 steps of the method eager and of a deep copy with `compiled(copy, counter)` in place:
    the same loss, gradients, statistics and centers, and one graph for all the steps (the
    temperatures and the number of masked tokens M change every step)."""
    from test_dino_sinkhorn import _loss_and_grads

    for net in (method.backbone, method.t_backbone):  # tracing costs per block: 2 of 12
        net.blocks = net.blocks[:2]
    torch._dynamo.reset()
    twin = copy.deepcopy(method)
    counter = CompileCounterWithBackend("aot_eager")
    fwd = compiled(twin, counter)
    temps, counts = [], []
    for step in range(steps):
        # a local crop of the global size: a smaller one interpolates the position embedding
        # (bicubic), which compile decomposes into ops ~5e-9 off in float64 (torch's, not
        # ours), past TOL64 on cancelling gradient entries
        batch = [v.double() for v in views(b=2, size=16, local=16, n_local=1)]
        want_out, want = _loss_and_grads(method, method, batch)
        got_out, got = _loss_and_grads(fwd, twin, batch)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **TOL64)
        for key in ("teacher_temp", "teacher_patch_temp", "momentum", "teacher_entropy", "kl",
                    "teacher_patch_entropy", "masked_fraction", "uniform_loss"):
            torch.testing.assert_close(torch.as_tensor(got_out[key]),
                                       torch.as_tensor(want_out[key]), **TOL64, msg=key)
        for crit in ("criterion", "patch_criterion"):
            torch.testing.assert_close(getattr(twin, crit).center, getattr(method, crit).center,
                                       **TOL64, msg=crit)
        temps.append(float(got_out["teacher_temp"]))
        counts.append(got_out["masked_fraction"])
        for m in (method, twin):
            m.on_step_end(step, 10)
    assert len(set(temps)) > 1 and len(set(counts)) > 1  # both moved: nothing baked in
    assert counter.frame_count == 1, counter.frame_count  # no recompile after the first step
    torch._dynamo.reset()


def compile_masked_forward(m, counter):
    """What DINO compiles (students, teachers, heads, schedules, both losses and centers)
    as one graph; the host mask draw stays eager (`IBOT.step_masks`)."""
    m.masked_forward = torch.compile(m.masked_forward, backend=counter, fullgraph=True)
    return m


def compile_forward(m, counter):
    """The whole forward: one graph break by design, at the host mask draw."""
    return torch.compile(m.forward, backend=counter)


COMPILE_FLAGS = ("--img-size", "16", "--out-dim", "40", "--n-local", "1", "--drop-path", "0",
                 "--warmup-teacher-temp-epochs", "0.2", "--mask-probability", "1")


@pytest.mark.parametrize("compiled", [compile_masked_forward, compile_forward],
                         ids=["masked_forward-fullgraph", "forward"])
def test_compiled_ibot_matches_eager_without_recompiling(seed, compiled, tmp_path):
    # every image masked: M >= 2 at each step (dynamo gives M = 0 and M = 1 graphs of their own)
    _, m = build(tmp_path, *COMPILE_FLAGS)
    assert_compiled_steps_match_eager(m.double(), compiled)
