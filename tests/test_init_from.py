"""--init-from: backbone weights from our export, a timm-named or a DINOv2-layout file, into
student and teacher (heads fresh), strict key checks, the head warm-up freeze, no download."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from selfsup import export as export_cli
from selfsup.engine import checkpoint as ckpt
from selfsup.engine.init_from import apply_init_from, backbones, to_our_names
from selfsup.engine.trainer import method_class, train
from selfsup.kernels.testing import fresh_seed
from selfsup.models import build_backbone
from selfsup.models.vit import resize_pos_embed
from test_trainer import config


@pytest.fixture(autouse=True)
def portable_and_offline(monkeypatch):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("SELFSUP_ATTN", "sdpa")

    def no_network(*a, **k):
        raise AssertionError("--init-from tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)


def build(method: str, tmp_path: Path, *extra: str):
    cfg = config(method, tmp_path, *extra)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=100, world_size=1)  # as train() sets
    return cfg, method_class(cfg)(cfg)


def assert_backbones_equal(method, sd: dict[str, torch.Tensor], skip=()) -> None:
    nets = backbones(method)
    assert len(nets) == 2, nets.keys()  # student and teacher
    for name, net in nets.items():
        own = net.state_dict()
        assert set(own) == set(sd), name
        for k, v in sd.items():
            if k not in skip:
                assert torch.equal(own[k], v), (name, k)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step DINO run and its `selfsup.export` file (safetensors)."""
    tmp = tmp_path_factory.mktemp("src")
    mp = pytest.MonkeyPatch()
    mp.setenv("SELFSUP_KERNELS", "torch")
    mp.setenv("SELFSUP_ATTN", "sdpa")
    try:
        cfg = config("dino", tmp, "--steps", "2")
        train(cfg)
    finally:
        mp.undo()
    out = tmp / "vit.safetensors"
    assert export_cli.main(["--checkpoint", cfg.out, "--out", str(out)]) == 0
    return Path(cfg.out), out


def test_round_trip_export_into_student_and_teacher(exported, tmp_path):
    run, file = exported
    sd = export_cli.load_exported(file)
    cfg, method = build("dino", tmp_path, "--init-from", str(file))
    fresh_head = {k: v.clone() for k, v in method.head.state_dict().items()}
    info = apply_init_from(method, cfg)
    assert info["backbones"] == ["backbone", "t_backbone"]
    assert_backbones_equal(method, sd)
    # heads stay fresh: as built, and unlike the source run's trained heads
    trained = ckpt.load(run)["model"]
    for k, v in method.head.state_dict().items():
        assert torch.equal(v, fresh_head[k])
    diffs = [not torch.equal(v, trained[f"head.{k}"]) for k, v in method.head.state_dict().items()
             if f"head.{k}" in trained]
    assert diffs and any(diffs)


def test_trainer_hook_with_warmup_keeps_backbone_frozen(exported, tmp_path):
    _, file = exported
    sd = export_cli.load_exported(file)
    cfg = config("dino", tmp_path, "--steps", "2", "--init-from", str(file),
                 "--init-warmup-steps", "2")
    train(cfg)
    state = ckpt.load(cfg.out)["model"]
    for k, v in sd.items():  # student backbone: untouched for the 2 frozen steps
        assert torch.equal(state[f"backbone.{k}"], v), k
        torch.testing.assert_close(state[f"t_backbone.{k}"], v)  # EMA of equal weights
    cfg2, fresh = build("dino", tmp_path / "b")
    moved = [not torch.equal(state[f"head.{k}"], v) for k, v in fresh.head.state_dict().items()
             if v.is_floating_point()]
    assert any(moved)  # the heads did train


def test_warmup_groups_freeze_only_the_backbone(exported, tmp_path):
    _, file = exported
    cfg, method = build("dino", tmp_path, "--init-from", str(file), "--init-warmup-steps", "7")
    apply_init_from(method, cfg)
    groups = method.param_groups(cfg)
    bb = {id(p) for p in method.backbone.parameters()}
    seen = set()
    for g in groups:
        ids = {id(p) for p in g["params"]}
        seen |= ids
        if ids & bb:
            assert ids <= bb and g["freeze_steps"] >= 7
        elif g.get("name") != "last_layer":
            assert g.get("freeze_steps", 0) == 0
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert seen == trainable  # every parameter still in exactly the groups it was


def test_timm_named_file_with_head_prefix_and_other_grid(tmp_path):
    fresh_seed()
    src = build_backbone("vit_tiny", img_size=32, patch_size=4, pos_embed="learned")
    sd = {f"module.{k}": v.clone() for k, v in src.state_dict().items()}
    sd["module.head.weight"], sd["module.head.bias"] = torch.randn(10, 192), torch.randn(10)
    path = tmp_path / "timm.pth"
    torch.save(sd, path)
    cfg, method = build("dino", tmp_path, "--init-from", str(path))
    apply_init_from(method, cfg)
    want = dict(src.state_dict())
    want["pos_embed"] = resize_pos_embed(want["pos_embed"], (8, 8), (4, 4))  # 32 px -> 16 px
    assert_backbones_equal(method, want)


def dinov2_layout(vit) -> dict[str, torch.Tensor]:
    """Our weights renamed the way DINOv2 saves them: register_tokens, chunked blocks
    (blocks.C.N), a mask_token."""
    out = {}
    half = len(vit.blocks) // 2
    for k, v in vit.state_dict().items():
        if k == "reg_token":
            k = "register_tokens"
        elif k.startswith("blocks."):
            n = int(k.split(".")[1])
            k = f"blocks.{int(n >= half)}.{k[len('blocks.'):]}"
        out[k] = v.clone()
    out["mask_token"] = torch.zeros(1, vit.embed_dim)
    return out


def test_dinov2_layout_with_registers_and_layer_scale(tmp_path):
    fresh_seed()
    src = build_backbone("vit_tiny", img_size=16, patch_size=4, pos_embed="learned",
                         registers=2, layer_scale=1e-5)
    with torch.no_grad():
        for blk in src.blocks:  # trained-looking gammas, so a skipped load would show
            blk.ls1.gamma.uniform_(0.1, 1.0)
            blk.ls2.gamma.uniform_(0.1, 1.0)
    file = dinov2_layout(src)
    assert "blocks.1.11.mlp.fc2.weight" in file and "register_tokens" in file
    path = tmp_path / "dinov2.pth"
    torch.save(file, path)
    # mask_token stays in the mapping: load_backbone drops it for a model without one
    assert set(to_our_names(file)) == set(src.state_dict()) | {"mask_token"}
    cfg, method = build("dino", tmp_path, "--init-from", str(path), "--registers", "2",
                        "--layer-scale", "1e-5")
    apply_init_from(method, cfg)
    assert_backbones_equal(method, src.state_dict())
    # the same file into a model without registers: an error that says what to do
    cfg, method = build("dino", tmp_path / "b", "--init-from", str(path), "--layer-scale",
                        "1e-5")
    with pytest.raises(ValueError, match=r"unexpected in the file: reg_token.*--registers"):
        apply_init_from(method, cfg)


def test_missing_and_unexpected_keys_are_named(exported, tmp_path):
    _, file = exported
    sd = dict(export_cli.load_exported(file))
    del sd["blocks.3.mlp.fc1.weight"]
    sd["blocks.3.mlp.fc9.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    cfg, method = build("dino", tmp_path, "--init-from", str(path))
    with pytest.raises(ValueError) as e:
        apply_init_from(method, cfg)
    msg = str(e.value)
    assert "missing from the file: blocks.3.mlp.fc1.weight" in msg
    assert "unexpected in the file: blocks.3.mlp.fc9.weight" in msg


def test_shape_mismatch_and_bad_flags(exported, tmp_path):
    _, file = exported
    sd = dict(export_cli.load_exported(file))
    sd["norm.weight"] = torch.ones(7)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    cfg, method = build("dino", tmp_path, "--init-from", str(path))
    with pytest.raises(ValueError, match=r"norm.weight \(7,\) vs \(192,\)"):
        apply_init_from(method, cfg)
    cfg, method = build("dino", tmp_path, "--init-warmup-steps", "3")
    with pytest.raises(ValueError, match="--init-from"):
        apply_init_from(method, cfg)
    cfg, method = build("dino", tmp_path, "--init-from", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no such file"):
        apply_init_from(method, cfg)


def test_resnet_method_student_and_key_encoder(tmp_path):
    fresh_seed()
    src = build_backbone("resnet_tiny", cifar_stem=True)
    path = tmp_path / "resnet.safetensors"
    export_cli.save_weights(src.state_dict(), path)
    cfg, method = build("byol", tmp_path, "--init-from", str(path))
    apply_init_from(method, cfg)
    assert_backbones_equal(method, src.state_dict())
