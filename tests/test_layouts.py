"""Folder layouts (issue 24): ImageNet trees, train folders with a sibling held-out split,
--test-data naming the split itself, labeled sets from elsewhere, unlabeled folders, and the
same rules in the trainer's k-NN monitor and in selfsup.eval. Every tree is made of real PNG
and JPEG files written here."""

import os
import time

import numpy as np
import pytest
from PIL import Image

from selfsup import eval as eval_cli
from selfsup.data import DatasetError, ImageFolder, build_loader, load_dataset, score_sets
from selfsup.data import scan as scan_mod
from selfsup.data.datasets import IMG_EXTENSIONS, load_fashion_mnist_sample
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.trainer import method_class, train

SAMPLE = load_fashion_mnist_sample("test")
CLASSES = ("bag", "coat", "shoe")


@pytest.fixture(autouse=True)
def portable_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_images(folder, n, start=0, exts=(".png", ".jpg")):
    """n real Fashion-MNIST images as colour PNG / JPEG files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.fromarray(SAMPLE.images[(start + i) % len(SAMPLE)]).convert("RGB")
        path = folder / f"img{start + i:03d}{exts[i % len(exts)]}"
        img.save(path, quality=95)
        out.append(path)
    return out


def class_tree(root, n=4, classes=CLASSES, start=0):
    for k, c in enumerate(classes):
        write_images(root / c, n, start + 10 * k)
    return root


@pytest.fixture
def imagenet(tmp_path):
    """root/train/<class> and root/val/<class>, ImageNet's layout."""
    root = tmp_path / "imagenet"
    class_tree(root / "train", 4)
    class_tree(root / "val", 2, start=100)
    return root



# ----------------------------------------------------------------------------- resolution
def test_root_with_train_and_val(imagenet):
    train, val = load_dataset(imagenet, "train"), load_dataset(imagenet, "test")
    assert train.root == str(imagenet / "train") and val.root == str(imagenet / "val")
    assert train.labeled and train.classes == list(CLASSES) and len(train) == 12
    sets = score_sets(str(imagenet))
    assert len(sets.memory) == 12 and len(sets.queries) == 6
    assert sets.queries.labels.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_train_folder_finds_its_sibling_split(tmp_path, held_out):
    """The README's `--data /path/to/imagenet/train`: the held-out split is beside it."""
    class_tree(tmp_path / "d" / "train", 3)
    class_tree(tmp_path / "d" / held_out, 1, start=50)
    sets = score_sets(str(tmp_path / "d" / "train"))
    assert sets.memory.root == str(tmp_path / "d" / "train")
    assert sets.queries.root == str(tmp_path / "d" / held_out) and len(sets.queries) == 3


def test_test_data_names_the_split_folder_itself(imagenet, tmp_path):
    direct = score_sets(str(imagenet / "train"), test_data=str(imagenet / "val"))
    holder = score_sets(str(imagenet / "train"), test_data=str(imagenet))  # holds val/
    assert direct.queries.root == holder.queries.root == str(imagenet / "val")
    # a held-out folder from elsewhere, for a train folder with no split of its own
    class_tree(tmp_path / "mine", 3)
    class_tree(tmp_path / "elsewhere" / "heldout", 1, start=70)
    sets = score_sets(str(tmp_path / "mine"), test_data=str(tmp_path / "elsewhere" / "heldout"))
    assert len(sets.queries) == 3 and sets.queries.labels.tolist() == [0, 1, 2]


def test_a_labeled_tree_without_held_out_split_says_how(tmp_path):
    class_tree(tmp_path / "mine", 2)
    why = score_sets(str(tmp_path / "mine"))
    assert isinstance(why, str) and "no held-out split" in why and "--test-data" in why
    with pytest.raises(DatasetError, match="no held-out split.*mine/val"):
        load_dataset(tmp_path / "mine", "test")


def test_held_out_classes_follow_the_memory_by_name(tmp_path):
    class_tree(tmp_path / "d" / "train", 2)
    class_tree(tmp_path / "d" / "val", 1, classes=("coat", "shoe"), start=60)  # no "bag"
    sets = score_sets(str(tmp_path / "d"))
    assert sets.memory.classes == list(CLASSES)
    assert sets.queries.labels.tolist() == [1, 2]  # coat, shoe: not 0, 1


def test_flat_and_nested_unlabeled_folders(tmp_path):
    flat = tmp_path / "flat"
    write_images(flat, 6)
    f = ImageFolder(str(flat))
    assert not f.labeled and len(f) == 6 and "flat folder" in f.why_unlabeled
    nested = tmp_path / "nested"
    write_images(nested / "2024" / "jan", 3)
    write_images(nested / "2024" / "feb", 2, start=5)
    write_images(nested / "2025", 2, start=9)
    labeled = ImageFolder(str(nested))  # folders are taken for classes unless told
    assert labeled.labeled and labeled.classes == ["2024", "2025"]
    un = load_dataset(nested, "train", unlabeled=True)
    assert not un.labeled and len(un) == 7 and set(un.labels.tolist()) == {0}
    assert "--unlabeled" in un.why_unlabeled
    mixed = tmp_path / "mixed"
    write_images(mixed, 2)
    write_images(mixed / "sub", 2, start=3)
    assert not ImageFolder(str(mixed)).labeled  # images beside folders: not classes
    why = score_sets(str(flat))
    assert isinstance(why, str) and "no labels" in why and "--knn-data" in why


def test_unlabeled_training_with_a_labeled_set_from_elsewhere(imagenet, tmp_path):
    flat = tmp_path / "photos"
    write_images(flat, 5)
    sets = score_sets(str(flat), knn_data=str(imagenet))  # knn-data with its own val/
    assert sets.memory.root == str(imagenet / "train")
    assert sets.queries.root == str(imagenet / "val")
    one = score_sets(str(flat), knn_data=str(imagenet / "val"))  # no split: 20% held out
    assert len(one.memory) + len(one.queries) == 6 and len(one.queries) == 1
    assert not {p for p, _ in one.memory.samples} & {p for p, _ in one.queries.samples}
    via_test = score_sets(str(flat), test_data=str(imagenet / "val"))
    assert len(via_test.memory) == 5 and len(via_test.queries) == 1
    with pytest.raises(DatasetError, match="no labels"):
        score_sets(str(flat), knn_data=str(flat))


# ----------------------------------------------------------------------------- trainer
def tiny_run(tmp_path, data, *extra):
    argv = ["--method", "simsiam", "--arch", "resnet_tiny", "--data", str(data),
            "--img-size", "16", "--batch-size", "4", "--steps", "2", "--device", "cpu",
            "--data-device", "portable", "--workers", "1", "--proj-hidden", "16",
            "--proj-dim", "16", "--pred-hidden", "8", "--out", str(tmp_path / "run"), *extra]
    return resolve(vars(build_parser().parse_args(argv)), method_class("simsiam").preset)


def test_flat_folder_trains_with_default_flags_and_says_once_knn_is_off(tmp_path, capsys):
    flat = tmp_path / "photos"
    write_images(flat, 10)
    summary = train(tiny_run(tmp_path, flat))
    out = capsys.readouterr().out
    assert summary["steps"] == 2 and "knn_trained" not in summary
    assert out.count("k-NN monitor off") == 1, out
    assert "--knn-data" in out and "--test-data" in out  # how to turn it on


def test_imagenet_train_folder_trains_with_its_sibling_val(imagenet, tmp_path, capsys):
    summary = train(tiny_run(tmp_path, imagenet / "train"))
    assert 0 <= summary["knn_trained"] <= 1 and "k-NN monitor off" not in capsys.readouterr().out


def test_unlabeled_nested_tree_with_knn_data(imagenet, tmp_path):
    nested = tmp_path / "nested"
    write_images(nested / "a" / "b", 5)
    write_images(nested / "c", 5, start=20)
    cfg = tiny_run(tmp_path, nested, "--unlabeled", "--knn-data", str(imagenet))
    summary = train(cfg)
    assert 0 <= summary["knn_trained"] <= 1


# ----------------------------------------------------------------------------- selfsup.eval
@pytest.fixture
def flat_run(tmp_path):
    flat = tmp_path / "photos"
    write_images(flat, 10)
    cfg = tiny_run(tmp_path, flat, "--knn-every", "-1")
    train(cfg)
    return tmp_path / "run"


def test_eval_follows_the_same_rules(flat_run, imagenet, capsys):
    base = ["knn", "--checkpoint", str(flat_run), "--device", "cpu", "--data-device",
            "portable"]
    assert eval_cli.main(base) == 2  # the run's data has no labels: say what to give
    err = capsys.readouterr().err
    assert "no labels" in err and "--knn-data" in err
    for extra in (["--data", str(imagenet / "train")],          # sibling val/
                  ["--knn-data", str(imagenet)],
                  ["--test-data", str(imagenet / "val")]):       # 20% of it held out
        assert eval_cli.main(base + extra) == 0, extra
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("knn_top1 ")


def test_loader_of_an_unlabeled_path(tmp_path):
    nested = tmp_path / "n"
    write_images(nested / "x", 4)
    write_images(nested / "y", 4, start=4)
    loader = build_loader(str(nested), "eval", 4, device="portable", img_size=16,
                          unlabeled=True)
    assert not loader.dataset.labeled and len(loader) == 2
    _, labels = next(iter(loader))
    assert np.all(labels.numpy() == 0)


# ----------------------------------------------------------------------------- scan cache

EXT = IMG_EXTENSIONS  # what ImageFolder scans with


def age(root, seconds=3600):
    """Set every directory's mtime into the past, as a tree at rest looks (a fresh tree is
    'racy': changed within the mtime slack, so its scan is not cached)."""
    t = time.time() - seconds
    for d, _, _ in os.walk(root):
        os.utime(d, (t, t))


def no_walk(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("walked the tree: the index was not used")

    monkeypatch.setattr(scan_mod, "walk", fail)


def test_scan_is_cached_and_invalidated_by_changes(imagenet, monkeypatch):
    root = imagenet / "train"
    age(root)
    first = scan_mod.scan_images(root, EXT)
    index = root / scan_mod.INDEX_NAME
    assert index.is_file() and len(first) == 12
    assert not [p for p in root.iterdir() if p.name.startswith(".selfsup-scan-")]  # atomic
    with monkeypatch.context() as m:
        no_walk(m)
        assert scan_mod.scan_images(root, EXT) == first
        assert [p for p, _ in ImageFolder(str(root)).samples] == [str(root / f) for f in first]
    # a new file in a class folder changes that folder's mtime
    write_images(root / "coat", 1, start=200)
    assert len(scan_mod.scan_images(root, EXT)) == 13
    age(root)
    scan_mod.scan_images(root, EXT)  # re-indexed
    (root / "bag" / "img000.png").unlink()
    assert len(scan_mod.scan_images(root, EXT)) == 12
    age(root)
    scan_mod.scan_images(root, EXT)
    (root / "new").mkdir()  # the root is checked by its listing, not its mtime
    write_images(root / "new", 2, start=300)
    age(root / "new")
    got = scan_mod.scan_images(root, EXT)
    assert len(got) == 14 and any(f.startswith("new/") for f in got)
    assert len(scan_mod.scan_images(root, (".png",))) < 14  # other extensions: rescanned


def test_scan_cache_is_not_written_for_a_tree_changed_just_now(tmp_path):
    root = class_tree(tmp_path / "fresh", 2)
    scan_mod.scan_images(root, EXT)
    assert not (root / scan_mod.INDEX_NAME).exists()


def test_scan_cache_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    root = class_tree(tmp_path / "ro", 2)
    (root / scan_mod.INDEX_NAME).mkdir()  # the in-tree index cannot be written
    age(root)
    files = scan_mod.scan_images(root, EXT)
    home = list((tmp_path / "cache" / "selfsup" / "scan").glob("*.idx"))
    assert len(home) == 1
    with monkeypatch.context() as m:
        no_walk(m)
        assert scan_mod.scan_images(root, EXT) == files
    monkeypatch.setenv(scan_mod.CACHE_ENV, "off")
    assert scan_mod.index_locations(root) == []
    other = class_tree(tmp_path / "off", 1)
    age(other)
    scan_mod.scan_images(other, EXT)
    assert not (other / scan_mod.INDEX_NAME).exists()


def test_scan_matches_a_plain_walk_and_skips_hidden(tmp_path):
    root = class_tree(tmp_path / "t", 2)
    write_images(root / "coat" / "deeper", 2, start=40)
    (root / ".hidden").mkdir()
    write_images(root / ".hidden", 1)
    (root / "coat" / "notes.txt").write_text("not an image")
    (root / "coat" / "UPPER.PNG").write_bytes((root / "coat" / "img010.png").read_bytes())
    files, dirs = scan_mod.walk(root, EXT)
    plain = sorted((os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root)
                    for f in fs if not d.rsplit("/", 1)[-1].startswith(".")
                    and f.lower().endswith(EXT)), key=lambda p: p.split("/"))
    assert files == plain and "coat/UPPER.PNG" in files
    assert {d for d, _ in dirs} == {"", "bag", "coat", "coat/deeper", "shoe"}


def test_max_pixels_flag_reaches_the_loader(tmp_path):
    flat = tmp_path / "photos"
    write_images(flat, 8)
    Image.new("1", (3000, 2000)).save(flat / "poster.png")
    cfg = tiny_run(tmp_path, flat, "--max-pixels", "1000000")
    assert cfg.max_pixels == 1_000_000
    with pytest.warns(UserWarning, match=r"over the pixel limit of 1,000,000.*poster.png"):
        train(cfg)


def test_a_flat_held_out_split_turns_the_monitor_off_not_the_run(tmp_path):
    """ImageNet's raw val/ is 50,000 images in one folder: no labels to score with."""
    class_tree(tmp_path / "inet" / "train", 2)
    write_images(tmp_path / "inet" / "val", 4)
    why = score_sets(str(tmp_path / "inet" / "train"))
    assert isinstance(why, str) and "held-out split" in why and "no labels" in why
    with pytest.raises(DatasetError, match="--test-data .* has no labels"):
        score_sets(str(tmp_path / "inet" / "train"), test_data=str(tmp_path / "inet" / "val"))


# ----------------------------------------------------------------------------- finetune
def finetune_loaders(data, test_data):
    from types import SimpleNamespace

    from selfsup import finetune
    s = {"data": str(data), "test_data": test_data and str(test_data), "train_size": 0,
         "test_size": 0, "seed": 0, "data_device": "portable", "workers": 1, "batch_size": 4,
         "crop_scale": [0.2, 1.0]}
    return finetune.make_loaders(s, SimpleNamespace(data=None, img_size=16, in_chans=3))


def test_finetune_follows_the_same_layout_rules(imagenet, tmp_path):
    # --data root/train: the held-out split is the sibling root/val
    _, test_loader, n_classes = finetune_loaders(imagenet / "train", None)
    assert n_classes == 3 and len(test_loader.dataset) == 6
    # --test-data naming the split folder itself, one class missing: labels follow the train
    # set's class names (bag=0, coat=1, shoe=2), not the held-out folder's own order
    held = tmp_path / "heldout"
    class_tree(held, 2, classes=("coat", "shoe"), start=200)
    _, test_loader, _ = finetune_loaders(imagenet / "train", held)
    labels = sorted({y for _, y in test_loader.dataset.samples})
    assert labels == [1, 2]
    # an unlabeled held-out folder is refused, naming it
    flat = tmp_path / "flat"
    write_images(flat, 4, 300)
    with pytest.raises(DatasetError, match="no labels"):
        finetune_loaders(imagenet / "train", flat)
