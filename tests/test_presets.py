"""Issue 26: the small-image presets, chosen from the training images (engine/presets.py).

Precedence: defaults < Method.preset(arch) < Method.small_preset(arch) (images <= 64 px, or
--preset small) < the command line; train.py, bench/quality.py's recorded rows and these tests
resolve through config.resolve_cli / resolve_method."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from selfsup.engine import presets
from selfsup.engine.config import Config, build_parser, resolve, resolve_cli
from selfsup.ssl import METHODS
from selfsup.ssl.common import is_vit

FIELDS = {f.name for f in dataclasses.fields(Config)}
VIT_ONLY = {"mae", "ibot", "dinov2"}


def folder(root, size: tuple[int, int], ext: str, n: int = 3, classes=("a", "b")):
    """An image tree root/<class>/<i>.<ext> of `size` (w, h) images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.{ext}")
    return root


# ----------------------------------------------------------------------------- the choice
def test_builtin_28px_datasets_choose_small_without_reading_a_file(monkeypatch):
    monkeypatch.setattr(presets, "_longer_side", lambda path: pytest.fail("read a file"))
    for data in ("fashion-mnist", "mnist", "fashion-mnist-sample"):
        cfg = resolve_cli(["--method", "byol", "--data", data])
        assert cfg.preset == "small"
        assert cfg.extra["preset_why"] == "images 28 px <= 64; --preset imagenet to override"
    assert resolve_cli(["--method", "byol"]).preset == "small"  # --data's default: fashion-mnist


def test_a_folder_of_large_jpegs_chooses_imagenet(tmp_path):
    root = folder(tmp_path / "big", (200, 150), "jpg")
    cfg = resolve_cli(["--method", "simclr", "--data", str(root)])
    assert cfg.preset == "imagenet"
    assert cfg.extra["preset_why"] == "images 200 px > 64; --preset small to override"
    assert cfg.temperature == 0.1 and cfg.blur and cfg.img_size is None  # the paper's


def test_a_folder_of_32px_pngs_chooses_small(tmp_path):
    root = folder(tmp_path / "cifar", (32, 32), "png")
    cfg = resolve_cli(["--method", "simclr", "--data", str(root)])
    assert cfg.preset == "small"
    assert "images 32 px <= 64" in cfg.extra["preset_why"]
    # SimCLR's CIFAR-10 augmentations at T 0.1 for short runs, and the images' own 32 px
    # (not the folders' 224 default)
    assert (cfg.temperature, cfg.jitter_strength, cfg.blur, cfg.img_size) == (0.1, 0.5, False, 32)


def test_the_img_size_flag_does_not_decide(tmp_path):
    root = folder(tmp_path / "cifar", (32, 32), "png")
    cfg = resolve_cli(["--method", "byol", "--data", str(root), "--img-size", "224"])
    assert cfg.preset == "small" and cfg.img_size == 224  # the flag still sets the size
    assert resolve_cli(["--method", "byol", "--img-size", "96"]).preset == "small"


def test_a_folder_is_sized_by_the_median_of_a_bounded_sample(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "mixed"
    folder(root / "train", (32, 24), "png", n=40, classes=("a",))
    folder(root / "train", (100, 80), "png", n=20, classes=("b",))
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
    folder(root / "val", (300, 300), "png", n=2, classes=("a",))  # held out: not read
    assert presets.image_px(str(root)) == 32  # the train split's median longer side
    seen = []
    real = presets._longer_side
    monkeypatch.setattr(presets, "_longer_side", lambda p: seen.append(p) or real(p))
    assert presets.image_px(str(root), sample=8) == 32
    assert 1 <= len(seen) <= 8 and all("val" not in str(p) for p in seen)
    # Pillow's lazy open: a header read, the pixels never decoded
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded pixels"))
    assert presets.image_px(str(root), sample=4) in (32, 100)


def test_unknown_image_size_keeps_the_imagenet_preset(tmp_path):
    (tmp_path / "empty").mkdir()
    for data in (str(tmp_path / "missing"), str(tmp_path / "empty")):
        assert presets.image_px(data) is None
        cfg = resolve_cli(["--method", "byol", "--data", data])
        assert cfg.preset == "imagenet" and "image size unknown" in cfg.extra["preset_why"]


# ----------------------------------------------------------------------------- precedence
def test_preset_imagenet_overrides_on_28px_data():
    cfg = resolve_cli(["--method", "simsiam", "--preset", "imagenet"])
    imagenet = METHODS["simsiam"].preset("resnet_tiny")
    assert cfg.preset == "imagenet" and cfg.extra["preset_why"] == "--preset imagenet"
    assert (cfg.blr, cfg.wd, cfg.proj_layers, cfg.batch_size, cfg.blur) == \
        (imagenet["blr"], imagenet["wd"], None, Config.batch_size, True)


def test_preset_small_on_large_images_reads_no_file(tmp_path, monkeypatch):
    root = folder(tmp_path / "big", (200, 150), "jpg")
    monkeypatch.setattr(presets, "image_px", lambda *a, **k: pytest.fail("sized the data"))
    cfg = resolve_cli(["--method", "mocov2", "--data", str(root), "--preset", "small"])
    assert cfg.preset == "small" and (cfg.queue_size, cfg.temperature, cfg.wd) == (4096, 0.1, 1e-4)


def test_defaults_then_imagenet_then_small_then_the_command_line():
    small = resolve_cli(["--method", "simsiam"])
    # small_preset on top of preset: wd from the CIFAR recipe, decay_all from the ImageNet one
    assert (small.wd, small.blr, small.decay_all, small.epochs) == (5e-4, 0.2, True, 100)
    cli = resolve_cli(["--method", "simsiam", "--wd", "1e-3", "--batch-size", "32",
                       "--blur", "--proj-layers", "2"])
    assert cli.preset == "small"
    assert (cli.wd, cli.batch_size, cli.blur, cli.proj_layers) == (1e-3, 32, True, 2)
    assert cli.pred_hidden == 512  # what the flags leave alone stays the small preset's


def test_old_style_resolve_is_the_imagenet_preset_unless_told_small():
    cls = METHODS["byol"]
    cfg = resolve({"method": "byol"}, cls.preset)
    assert cfg.preset == "imagenet" and cfg.blr == cls.preset(None)["blr"]
    # --preset small through the old call takes the small preset of the preset's class
    small = resolve({"method": "byol", "preset": "small"}, cls.preset)
    assert small.to_dict() == resolve_cli(["--method", "byol", "--preset", "small"]).to_dict() \
        | {"extra": small.extra}
    assert small.blr == cls.small_preset(None)["blr"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_small_preset_names_config_fields_and_builds(method):
    """Each small preset sets Config fields only, says something of its own, resolves for the
    method's default arch (resnet_tiny) and for vit_tiny where a ViT applies, and the method
    builds from the resolved config (at narrow heads)."""
    import torch

    cls = METHODS[method]
    archs = ["vit_tiny"] if method in VIT_ONLY else ["resnet_tiny", "vit_tiny"]
    for arch in archs:
        sp = cls.small_preset(arch)
        assert sp and set(sp) <= FIELDS, sorted(set(sp) - FIELDS)
        assert not {"steps", "epochs"} & set(sp)  # run lengths are the command line's
        cfg = resolve_cli(["--method", method, "--arch", arch, "--preset", "small",
                           "--proj-hidden", "32", "--pred-hidden", "32", "--out-dim", "64",
                           "--patch-out-dim", "64", "--queue-size", "64", "--proj-dim", "16"])
        for key, value in sp.items():
            if key not in cfg.extra["cli_keys"]:
                assert getattr(cfg, key) == value, key
        cfg.extra.update(steps_per_epoch=10, schedule_steps=100)
        torch.manual_seed(0)
        model = cls(cfg)
        assert is_vit(arch) == hasattr(model.encoder(), "patch_embed")


def test_simsiam_small_keeps_three_layers_and_proj_layers_2_gives_the_cifar_projector():
    import torch

    def linears(*flags):
        cfg = resolve_cli(["--method", "simsiam", "--proj-hidden", "32", "--proj-dim", "16",
                           "--pred-hidden", "8", *flags])
        cfg.extra.update(steps_per_epoch=10, schedule_steps=100)
        return sum(isinstance(m, torch.nn.Linear)
                   for m in METHODS["simsiam"](cfg).projector.modules())

    # the small preset keeps the ImageNet 3 layers (docs/quality.md: the 2-layer CIFAR one
    # gained less in short runs); the paper's CIFAR-10 projector is one flag away
    assert (linears(), linears("--proj-layers", "2")) == (3, 2)


# ----------------------------------------------------------------------------- bad input
def test_a_bad_preset_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--preset", "foo"])
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset must be one of imagenet, small, got 'foo'"):
        resolve({"preset": "foo"}, METHODS["byol"].preset)
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "cifar"])
    assert e.value.code == 2 and "argument --preset: invalid choice: 'cifar'" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- real runs
RUN = ["--data", "fashion-mnist-sample", "--steps", "2", "--device", "cpu", "--workers", "1",
       "--knn-every", "0", "--knn-train-size", "64", "--knn-test-size", "32", "--batch-size", "8",
       "--img-size", "16", "--log-every", "1"]


@pytest.mark.parametrize("method, flags", [
    ("simsiam", ["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "16"]),
    ("dino", ["--arch", "vit_tiny", "--out-dim", "64", "--proj-hidden", "32", "--proj-dim", "16"]),
])
def test_train_py_runs_the_small_preset_prints_and_records_it(method, flags, tmp_path, capsys):
    import train

    out = tmp_path / method
    assert train.main(["--method", method, *RUN, *flags, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "preset: small (images 28 px <= 64; --preset imagenet to override)"
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "small"
    expect = METHODS[method].small_preset(saved["arch"])
    for key in ("blur", "n_local", "local_crop_scale", "wd", "blr"):
        if key in expect and key not in saved["extra"]["cli_keys"]:
            value = saved[key]
            assert (tuple(value) if isinstance(value, list) else value) == expect[key], key
    assert Config.from_dict(saved).preset == "small"  # a resume reads the choice back


def test_the_start_line_names_an_explicit_or_missing_preset():
    assert presets.describe(resolve_cli(["--method", "mae", "--arch", "vit_tiny", "--preset",
                                         "imagenet"])) == "preset: imagenet (--preset imagenet)"
    assert presets.describe(Config()).startswith("preset: none")


def test_docs_presets_lists_every_small_preset_flag():
    """docs/presets.md's table names, per method, each flag its small preset sets beyond the
    shared SMALL_IMAGES (and beyond the preset it builds on: ibot on dino, dinov2 on ibot)."""
    from pathlib import Path

    from selfsup.ssl.common import SMALL_IMAGES

    text = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3:
            for name in cells[0].split(", "):
                rows[name] = cells[1]
    base = {"ibot": "dino", "dinov2": "ibot"}
    for method, cls in METHODS.items():
        arch = "vit_tiny" if method in VIT_ONLY else "resnet_tiny"
        inherited = METHODS[base[method]].small_preset(arch) if method in base else {}
        for key, value in cls.small_preset(arch).items():
            if value is None or SMALL_IMAGES.get(key) == value or inherited.get(key) == value:
                continue
            flag = key.replace("_", "-")
            assert f"--{flag}" in rows[method] or (value is False and f"--no-{flag}"
                                                   in rows[method]), (method, key)


# ----------------------------------------------------------------------------- warm-up caps
FMNIST_TRAIN = 60000  # Fashion-MNIST's train split: what the recorded rows trained on


def scheduled(argv: list[str], steps_per_epoch: int, schedule_steps: int) -> tuple[Config, list]:
    """The config train.py resolves from argv, with the trainer's schedule, after the cap."""
    cfg = resolve_cli(argv)
    cfg.extra.update(steps_per_epoch=steps_per_epoch, schedule_steps=schedule_steps)
    return cfg, presets.cap_warmups(cfg)


def test_a_short_small_run_caps_the_preset_warmup_and_says_so():
    # the case: 5000 steps of batch 128 on Fashion-MNIST, 468 steps per epoch
    cfg, lines = scheduled(["--method", "byol", "--steps", "5000"], FMNIST_TRAIN // 128, 5000)
    assert cfg.preset == "small" and METHODS["byol"].preset(None)["warmup_epochs"] == 10
    assert cfg.warmup_epochs == pytest.approx(500 / 468)  # 10% of the schedule's steps
    assert round(cfg.warmup_epochs * 468) == 500  # the lr warm-up the trainer derives
    assert lines == ["warm-up: 10 epochs of the preset capped to 1.07 (10% of 10.7 epochs); "
                     "give --warmup-epochs to override"]
    assert cfg.extra["warmup_caps"] == {"warmup_epochs": [10, pytest.approx(500 / 468)]}


def test_the_small_presets_own_warmup_and_the_distillation_warmups_are_capped():
    cfg, _ = scheduled(["--method", "mae", "--arch", "vit_tiny"], 100, 1000)
    assert METHODS["mae"].small_preset("vit_tiny")["warmup_epochs"] == 10
    assert cfg.warmup_epochs == pytest.approx(1.0)
    # DINO: the teacher temperature's 30 epochs and the lr's 10 capped to 2; the last layer's
    # 1-epoch freeze is under 10% of 20 epochs and stays
    cfg, lines = scheduled(["--method", "dino", "--arch", "vit_tiny"], 100, 2000)
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, cfg.freeze_last_layer_epochs) \
        == (pytest.approx(2.0), pytest.approx(2.0), 1)
    assert [line.split(":")[0] for line in lines] == ["warm-up", "teacher-temperature warm-up"]
    assert "give --warmup-teacher-temp-epochs to override" in lines[1]
    # SwAV's small preset: the queue from epoch 50 and the prototypes frozen for 2 epochs
    cfg, lines = scheduled(["--method", "swav"], 100, 1000)
    assert (cfg.queue_start_epochs, cfg.freeze_last_layer_epochs) == (1.0, 1.0)
    assert {"queue_start_epochs", "freeze_last_layer_epochs"} <= set(cfg.extra["warmup_caps"])


def test_a_long_small_run_keeps_the_preset_warmups():
    # 300 epochs: BYOL's 10 are 3% of it
    cfg, lines = scheduled(["--method", "byol", "--epochs", "300"], 468, 300 * 468)
    assert (cfg.warmup_epochs, lines) == (10, [])
    assert "warmup_caps" not in cfg.extra
    cfg, lines = scheduled(["--method", "dino", "--arch", "vit_tiny", "--epochs", "300"], 50,
                           300 * 50)
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, lines) == (10, 30, [])


def test_a_flag_given_is_never_capped():
    argv = ["--method", "dino", "--arch", "vit_tiny", "--steps", "100", "--warmup-epochs", "5",
            "--warmup-teacher-temp-epochs", "3", "--freeze-last-layer-epochs", "2"]
    cfg, lines = scheduled(argv, 100, 100)
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, cfg.freeze_last_layer_epochs,
            lines) == (5, 3, 2, [])


def test_the_imagenet_preset_and_a_config_without_one_are_never_capped():
    # the papers' warm-ups at their own length exceed 10% (MoCo v3 ViT 40 of 300 epochs)
    cfg, lines = scheduled(["--method", "mocov3", "--arch", "vit_tiny", "--preset", "imagenet"],
                           100, 300 * 100)
    assert (cfg.warmup_epochs, lines) == (40, [])
    cfg, lines = scheduled(["--method", "byol", "--preset", "imagenet", "--steps", "50"], 468, 50)
    assert (cfg.warmup_epochs, lines) == (10, [])
    bare = Config(warmup_epochs=10, extra={"steps_per_epoch": 10, "schedule_steps": 10})
    assert presets.cap_warmups(bare) == [] and bare.warmup_epochs == 10


def recorded_rows() -> list[dict]:
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" /
                       "quality.json").read_text())


IMAGENET_ROWS = [r for r in recorded_rows() if r.get("preset") != "small"]
SHORT_ROWS = [r for r in recorded_rows() if r.get("preset") == "small"]


@pytest.mark.parametrize("row", SHORT_ROWS, ids=lambda r: r["method"])
def test_short_rows_run_every_warmup_within_the_cap(row):
    """Issue 26's rows are bare small-preset commands: the cap is what keeps their preset
    warm-ups to a tenth of the run."""
    argv = row["command"].split()[2:]
    spe = FMNIST_TRAIN // row["batch"]
    cfg, lines = scheduled(argv, spe, row["steps"])
    assert cfg.preset == "small"
    cap = presets.WARMUP_CAP * row["steps"] / spe
    for name in presets.CAPPED:
        value = getattr(cfg, name)
        assert value is None or value <= cap * (1 + 1e-9), name
    assert len(lines) == len(cfg.extra.get("warmup_caps", {}))


@pytest.mark.parametrize("row", IMAGENET_ROWS, ids=lambda r: r["method"])
def test_recorded_rows_run_their_warmups_uncapped(row):
    """Each recorded row resolves (as tests/test_quality.py reads it) to what it ran: the cap
    leaves it alone, and no row relies on a preset warm-up beyond the cap anyway (they give
    --warmup-epochs; SwAV's preset freeze of 1 epoch is 8.5% of its 11.8), so the rule's
    ImageNet exception is for the papers' own runs, not for these rows."""
    argv = row["command"].split()[2:]
    argv = argv if "--preset" in argv else [*argv, "--preset", "imagenet"]
    spe = FMNIST_TRAIN // row["batch"]
    before = resolve_cli(argv).to_dict()
    cfg, lines = scheduled(argv, spe, row["steps"])
    assert lines == [] and {**cfg.to_dict(), "extra": {}} == {**before, "extra": {}}
    cap = presets.WARMUP_CAP * row["steps"] / spe
    for name in presets.CAPPED:
        value = getattr(cfg, name)
        assert name in cfg.extra["cli_keys"] or value is None or value <= cap, name


def test_train_py_prints_the_cap_and_records_it_in_config_json(tmp_path, capsys):
    import train

    out = tmp_path / "byol"
    flags = ["--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden", "16"]
    assert train.main(["--method", "byol", *RUN, *flags, "--steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.loads((out / "config.json").read_text())
    spe, schedule = saved["extra"]["steps_per_epoch"], saved["extra"]["schedule_steps"]
    cap = 0.1 * schedule / spe
    assert schedule == 3 and saved["warmup_epochs"] == pytest.approx(cap)  # the value run
    assert saved["extra"]["warmup_caps"] == {"warmup_epochs": [10, pytest.approx(cap)]}
    assert printed[1] == (f"warm-up: 10 epochs of the preset capped to {cap:.3g} (10% of "
                          f"{schedule / spe:.3g} epochs); give --warmup-epochs to override")
    # the lr schedule ran it: round(0.3) = no warm-up step, so step 0 is at the peak lr (the
    # preset's 10 epochs would have started at a third of it)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = next(r for r in logs if r["kind"] == "train" and r["step"] == 1)
    assert first["lr"] == pytest.approx(Config.from_dict(saved).peak_lr())


def test_small_images_train_at_their_own_size_and_the_cpu_resnet_keeps_its_stem(tmp_path):
    from selfsup.ssl.common import build_encoder

    cfg = resolve_cli(["--method", "byol", "--data", "fashion-mnist"])
    assert (cfg.img_size, cfg.arch, cfg.cifar_stem, cfg.channels_last) == \
        (28, "resnet_tiny", False, True)  # native 28 px, no upsampling to 32
    assert isinstance(build_encoder(cfg).maxpool, torch.nn.MaxPool2d)  # the ImageNet stem
    r18 = resolve_cli(["--method", "byol", "--data", "fashion-mnist", "--arch", "resnet18"])
    assert r18.cifar_stem is None and isinstance(build_encoder(r18).maxpool, torch.nn.Identity)
    given = resolve_cli(["--method", "byol", "--data", "fashion-mnist", "--cifar-stem"])
    assert given.cifar_stem is True  # the flag wins
    root = folder(tmp_path / "stl", (48, 40), "png")
    assert resolve_cli(["--method", "simclr", "--data", str(root)]).img_size == 48
    vit = resolve_cli(["--method", "mae", "--data", "fashion-mnist", "--arch", "vit_tiny"])
    assert (vit.img_size, vit.channels_last, vit.cifar_stem) == (28, False, None)
    # --preset small without knowing the images' size: the CIFAR size
    assert resolve_cli(["--method", "byol", "--data", str(tmp_path / "none"),
                        "--preset", "small"]).img_size == 32
