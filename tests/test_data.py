"""build_loader: recipes, determinism, DALI vs portable, corrupt files, sharding, arguments.

Tiny batches and sizes throughout; every DALI test also runs the portable path, and DALI tests
skip where DALI is not installed.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (
    CorruptImageError,
    DatasetError,
    build_loader,
    get_recipe,
    load_fashion_mnist_sample,
    recipes,
    transforms,
)
from selfsup.data import dali as dali_mod
from selfsup.data import loader as loader_mod

HAVE_DALI = dali_mod.available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
BACKENDS = ["portable", pytest.param("dali-cpu", marks=needs_dali)]
FMNIST = load_fashion_mnist_sample("train")
SPREAD = np.arange(48) * 41  # the sample is sorted by class: spread the picks over classes
SMALL = (FMNIST.images[SPREAD], FMNIST.labels[SPREAD])  # 48 real 28-px images


def first(loader, epoch=0):
    loader.set_epoch(epoch)
    return next(iter(loader))


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


def value_range(r):
    lo = [(0 - m) / s for m, s in zip(r.mean, r.std, strict=True)]
    hi = [(1 - m) / s for m, s in zip(r.mean, r.std, strict=True)]
    return torch.tensor(lo).view(1, -1, 1, 1), torch.tensor(hi).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real Fashion-MNIST images as PNG and JPEG files in class folders, tinted RGB."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / f"class{SMALL[1][i]}"
        d.mkdir(exist_ok=True)
        rgb = np.clip(SMALL[0][i][..., None] * rng.uniform(0.5, 1, 3), 0, 255)
        im = Image.fromarray(rgb.astype(np.uint8)).resize((40 + i % 5, 36))
        im.save(d / f"{i:02d}.{'png' if i % 2 else 'jpg'}", quality=92)
    return root


@pytest.fixture
def corrupt_folder(folder, tmp_path):
    """The folder plus a garbage .jpg and a truncated (header intact) JPEG."""
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(folder, root)
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (cls / "garbage.jpg").write_bytes(b"this is not an image" * 8)
    good = next(p for p in root.rglob("??.jpg")).read_bytes()
    sos = good.index(b"\xff\xda")  # start of scan: keep the header, cut the image data
    (cls / "truncated.jpg").write_bytes(good[: sos + (len(good) - sos) // 2])
    return root, {str(cls / "garbage.jpg"), str(cls / "truncated.jpg")}


# ----------------------------------------------------------------------------- recipes
def test_recipe_parameters_follow_the_papers():
    m2 = get_recipe("mocov2", 224)
    v = m2.views[0]
    assert len(m2.views) == 2 and v.scale == (0.2, 1.0) and v.jitter == (0.4, 0.4, 0.4, 0.1)
    assert (v.jitter_p, v.gray_p, v.blur_p, v.blur_sigma, v.flip_p) == (0.8, 0.2, 0.5,
                                                                       (0.1, 2.0), 0.5)
    assert v.blur_window == 23  # ~10% of 224, odd
    m1 = get_recipe("mocov1", 224).views[0]
    assert m1.jitter == (0.4,) * 4 and m1.jitter_p == 1 and m1.blur_p == 0
    b1, b2 = get_recipe("byol", 224).views
    assert (b1.blur_p, b1.solarize_p, b2.blur_p, b2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    d = get_recipe("dino", 224)
    assert d.view_sizes == [224, 224] + [96] * 8
    assert d.views[0].scale == (0.4, 1.0) and d.views[2].scale == (0.05, 0.4)
    assert get_recipe("dino", 32, n_local=10).view_sizes == [32, 32] + [16] * 10
    assert get_recipe("dino", 16).view_sizes[2] == 8
    assert get_recipe("dino", 32, local_size=24, n_local=None).view_sizes[2:] == [24] * 8
    mae = get_recipe("mae", 32).views
    assert len(mae) == 1 and mae[0].scale == (0.2, 1.0) and not mae[0].has_color
    ev = get_recipe("eval", 32)
    assert ev.deterministic and ev.view_sizes == [32]
    assert get_recipe("eval", 32, 1).mean == (0.449,) and len(get_recipe("eval", 32).std) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_blur_drops_only_the_blur(backend):
    # blur=False (SimCLR's CIFAR recipe) zeroes every view's blur probability and nothing
    # else; the drawn sigmas are then all 0 while the other columns of the draw are unchanged.
    on, off = get_recipe("byol", 28), get_recipe("byol", 28, blur=False)
    assert [v.blur_p for v in on.views] == [1.0, 0.1] and off.extra == {"blur": False}
    for a, b in zip(on.views, off.views, strict=True):
        assert b.blur_p == 0 and a == dataclasses.replace(b, blur_p=a.blur_p)
    hw = np.tile([28.0, 28.0], (64, 1))
    pa = recipes.draw_params(on.views[0], recipes.batch_rng(0, 0, 0, 0), hw)
    pb = recipes.draw_params(off.views[0], recipes.batch_rng(0, 0, 0, 0), hw)
    assert pa[:, recipes.SIGMA].min() > 0 and not pb[:, recipes.SIGMA].any()
    keep = [c for c in range(recipes.N_PARAMS) if c != recipes.SIGMA]
    assert np.array_equal(pa[:, keep], pb[:, keep])
    assert all(v.blur_p == 0 for v in get_recipe("dino", 32, blur=False).views)
    with pytest.raises(ValueError, match="blur must be True or False"):
        get_recipe("mocov2", 32, blur="no")
    # through the loader: the blurred and unblurred view 1 differ, the crops are the same
    kw = dict(img_size=16, device=backend, seed=3, num_threads=1)
    va, _ = first(build_loader(SMALL, "byol", 8, **kw))
    vb, _ = first(build_loader(SMALL, "byol", 8, blur=False, **kw))
    assert not torch.allclose(va[0], vb[0], atol=1e-3)


def test_recipe_errors_name_the_argument():
    with pytest.raises(ValueError, match="recipe must be one of"):
        get_recipe("simclr-v9", 32)
    with pytest.raises(ValueError, match="n_local"):  # one view: no multi-crop
        get_recipe("mae", 32, n_local=4)
    with pytest.raises(ValueError, match="n_local must be an int >= 0"):
        get_recipe("mocov2", 32, n_local=-1)
    with pytest.raises(ValueError, match="mean/std"):
        get_recipe("eval", 32, 1, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="scale"):
        get_recipe("mae", 32, scale=(0.5, 2.0))


def test_draw_params_is_a_pure_function_of_the_batch_key():
    v = get_recipe("byol", 32).views[1]
    hw = np.tile([28.0, 28.0], (64, 1))
    a = recipes.draw_params(v, recipes.batch_rng(1, 2, 0, 3), hw)
    b = recipes.draw_params(v, recipes.batch_rng(1, 2, 0, 3), hw)
    c = recipes.draw_params(v, recipes.batch_rng(1, 2, 1, 3), hw)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    box = a[:, recipes.ROI]
    area = np.abs(box[:, 2] - box[:, 0]) * np.abs(box[:, 3] - box[:, 1])
    assert box.min() >= 0 and box.max() <= 1 and 0.08 - 1e-6 <= area.min() and area.max() <= 1
    flipped = a[:, recipes.FLIP] > 0
    assert 0 < flipped.sum() < 64 and np.all((box[:, 1] > box[:, 3]) == flipped)
    assert set(np.unique(a[:, recipes.SOLARIZE])) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- every recipe
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,sizes", [("mocov1", [16, 16]), ("mocov2", [16, 16]),
                                        ("byol", [16, 16]), ("dino", [16, 16, 8, 8]),
                                        ("mae", [16]), ("eval", [16])])
def test_each_recipe_yields_normalized_views_and_labels(backend, name, sizes):
    kw = {"n_local": 2} if name == "dino" else {}
    loader = build_loader(SMALL, name, 8, device=backend, img_size=16, num_threads=1, **kw)
    assert loader.backend == backend and loader.view_sizes == sizes
    assert len(loader) == 6 and loader.num_samples == 48
    views, labels = first(loader)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert torch.equal(labels, torch.from_numpy(SMALL[1][loader.order(0)[:8]]))
    lo, hi = value_range(loader.recipe)
    assert len(views) == len(sizes)
    for v, s in zip(views, sizes, strict=True):
        assert v.dtype == torch.float32 and v.shape == (8, 3, s, s) and v.is_contiguous()
        assert torch.all(v >= lo - 1e-5) and torch.all(v <= hi + 1e-5)
        assert v.std() > 0.3  # real images, not a constant
    if len(views) > 1:  # two views of the same images differ
        assert not torch.allclose(views[0], views[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grey_and_colour_channel_handling(backend, folder):
    grey = build_loader(SMALL, "mocov2", 4, device=backend, img_size=16, in_chans=1)
    (v1, _), _ = first(grey)
    assert v1.shape == (4, 1, 16, 16) and grey.recipe.mean == (0.449,)
    rgb = build_loader(folder, "mocov2", 4, device=backend, img_size=16, in_chans=1)
    assert first(rgb)[0][0].shape == (4, 1, 16, 16)
    # grey replicated to 3 channels: identical pixels, each normalized with its own mean/std
    ev = build_loader(SMALL, "eval", 4, device=backend, img_size=16)
    x = first(ev)[0][0]
    m, s = torch.tensor(ev.recipe.mean).view(1, 3, 1, 1), torch.tensor(ev.recipe.std)
    pix = x * s.view(1, 3, 1, 1) + m
    torch.testing.assert_close(pix[:, 0], pix[:, 2], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_other_seed_or_epoch_differs(backend):
    def make(seed):
        return build_loader(SMALL, "byol", 8, device=backend, img_size=16, seed=seed,
                            num_threads=1)

    a, b, c = make(5), make(5), make(6)
    ea, eb = batches(a, 1), batches(b, 1)
    for (va, la), (vb, lb) in zip(ea, eb, strict=True):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))
    assert not torch.equal(first(c, 1)[0][0], ea[0][0][0])
    assert not torch.equal(first(a, 2)[0][0], ea[0][0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_i_after_resume_equals_the_uninterrupted_one(backend):
    """The trainer's resume: a fresh loader, set_epoch(e), iterate past `skip` batches."""
    kw = dict(device=backend, img_size=16, seed=3, num_threads=1, n_local=1)
    straight = build_loader(SMALL, "dino", 8, **kw)
    batches(straight, 0)  # draws from epoch 0 first: must not matter
    want = batches(straight, 1)
    resumed = build_loader(SMALL, "dino", 8, **kw)
    resumed.set_epoch(1)
    for i, (views, labels) in enumerate(resumed):
        if i < 3:
            continue
        assert torch.equal(labels, want[i][1])
        assert all(torch.equal(x, y) for x, y in zip(views, want[i][0], strict=True))
    torch.manual_seed(123)  # global RNG state plays no part
    assert torch.equal(batches(resumed, 1)[4][0][2], want[4][0][2])


@needs_dali
def test_dali_output_does_not_depend_on_thread_count():
    one = build_loader(SMALL, "mocov2", 8, device="dali-cpu", img_size=16, num_threads=1)
    two = build_loader(SMALL, "mocov2", 8, device="dali-cpu", img_size=16, num_threads=2)
    assert all(torch.equal(x, y) for x, y in zip(first(one, 2)[0], first(two, 2)[0], strict=True))


# ----------------------------------------------------------------------------- DALI vs portable
@needs_dali
@pytest.mark.parametrize("name,size", [("mocov2", 32), ("byol", 32), ("dino", 32), ("eval", 32),
                                       ("byol", 64)])  # 64: blur/solarize under conditionals
def test_dali_and_portable_agree(name, size):
    """Same parameters on both backends: pixels agree up to DALI's uint8 rounding between ops
    (and, for DINO's local crops, its antialiasing when a crop is shrunk)."""
    kw = dict(img_size=size, seed=11, num_threads=1)
    if name == "dino":
        kw["n_local"] = 2
    p = first(build_loader(FMNIST, name, 64, device="portable", **kw))
    d = first(build_loader(FMNIST, name, 64, device="dali-cpu", **kw))
    assert torch.equal(p[1], d[1])
    for v, (a, b) in enumerate(zip(p[0], d[0], strict=True)):
        diff = (a - b).abs()
        assert diff.mean() < 0.01, (name, v, diff.mean())
        tol = 0.05 if v < 2 else 0.8  # 0.05 = ~3 grey levels after normalization
        assert diff.flatten().quantile(0.999) < tol, (name, v)
        # batch statistics per channel
        torch.testing.assert_close(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=5e-3, rtol=0)
        torch.testing.assert_close(a.std((0, 2, 3)), b.std((0, 2, 3)), atol=1e-2, rtol=0)


@needs_dali
def test_dali_and_portable_agree_on_jpeg_folders(folder):
    p = first(build_loader(folder, "mocov2", 12, device="portable", img_size=24, seed=2))
    d = first(build_loader(folder, "mocov2", 12, device="dali-cpu", img_size=24, seed=2))
    assert torch.equal(p[1], d[1])
    for a, b in zip(p[0], d[0], strict=True):  # Pillow's vs DALI's antialiased linear resize
        assert (a - b).abs().mean() < 0.05
        torch.testing.assert_close(a.mean((0, 2, 3)), b.mean((0, 2, 3)), atol=0.02, rtol=0)


# ----------------------------------------------------------------------------- portable ops
def test_portable_ops_semantics():
    x = torch.rand(3, 3, 9, 9, dtype=torch.float64) * 255
    p = torch.from_numpy(np.tile(recipes.IDENTITY, (3, 1)))
    full = transforms.crop_resize(x.float(), p, 9)
    torch.testing.assert_close(full, x.float(), atol=1e-3, rtol=0)  # whole box, same size
    p[0, 1], p[0, 3] = 1.0, 0.0  # mirrored box
    torch.testing.assert_close(transforms.crop_resize(x, p, 9)[0], x[0].flip(-1))
    # colour twist: identity up to DALI's 3-digit YIQ matrices (not exact inverses: <1 level),
    # and saturation 0 = ITU-R 601 luma on every channel
    q = torch.from_numpy(np.tile(recipes.IDENTITY, (3, 1)))
    torch.testing.assert_close(transforms.color_twist(x.clone(), q), x, atol=1.0, rtol=0)
    q[:, recipes.SAT] = 0
    g = transforms.color_twist(x.clone(), q)
    luma = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)).sum(1)
    torch.testing.assert_close(g[:, 1], luma, atol=0.3, rtol=0)
    # blur: sigma 0 leaves a sample untouched, keeps the mean of a constant image
    s = torch.tensor([0.0, 1.5, 0.3], dtype=x.dtype)
    b = transforms.gaussian_blur(x, s, 5)
    assert torch.equal(b[0], x[0]) and not torch.allclose(b[1], x[1])
    const = torch.full((1, 1, 6, 6), 77.0)
    torch.testing.assert_close(transforms.gaussian_blur(const, torch.tensor([2.0]), 5), const)
    sol = transforms.solarize(torch.tensor([[0.0, 127, 128, 255]]).view(1, 1, 1, 4),
                              torch.tensor([1.0]))
    assert sol.flatten().tolist() == [0, 127, 127, 0]


# ----------------------------------------------------------------------------- bad data
@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_are_skipped_named_and_counted(backend, corrupt_folder):
    root, bad = corrupt_folder
    loader = build_loader(root, "mocov2", 5, device=backend, img_size=16, drop_last=False)
    assert loader.num_samples == 26 and len(loader) == 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = batches(loader)
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 1, msgs  # ONE line per epoch, naming every skipped file
    assert "epoch 0: skipped 2 image(s)" in msgs[0] and "2 corrupt or truncated" in msgs[0]
    assert all(path in msgs[0] for path in bad), msgs
    assert loader.skipped == 2 and set(loader.bad_files) == bad
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        batches(loader, epoch=1)  # named again the next epoch (once)
    assert sum("epoch 1: skipped 2 image(s)" in str(w.message) for w in again) == 1
    assert [len(lb) for _, lb in out] == [5, 5, 5, 5, 5, 1]  # substituted: sizes unchanged
    assert all(torch.isfinite(v).all() for views, _ in out for v in views)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file_raises_with_on_corrupt_error(backend, corrupt_folder):
    root, bad = corrupt_folder
    loader = build_loader(root, "eval", 4, device=backend, img_size=16, on_corrupt="error",
                          drop_last=False)
    with pytest.raises(CorruptImageError) as e:
        batches(loader)
    assert e.value.path in bad and e.value.path in str(e.value)


@needs_dali
def test_dali_decoder_failure_is_recovered(corrupt_folder, monkeypatch):
    """A file that passes the cheap check but fails DALI's decoder: the runner finds it with
    Pillow, substitutes it and rebuilds the pipeline at that batch."""
    root, bad = corrupt_folder
    probe = loader_mod.Loader._probe

    def header_only(self, path):  # no trailer check: the truncated JPEG reaches DALI
        if path.endswith("garbage.jpg"):
            return probe(self, path)
        with Image.open(path) as im:
            return np.fromfile(path, np.uint8), (im.height, im.width)

    monkeypatch.setattr(loader_mod.Loader, "_probe", header_only)
    loader = build_loader(root, "eval", 4, device="dali-cpu", img_size=16, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = batches(loader)
    assert any("truncated.jpg" in str(w.message) for w in caught)
    assert loader._runner.builds >= 2 and set(loader.bad_files) == bad
    clean = build_loader(root, "eval", 4, device="portable", img_size=16, drop_last=False)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        want = batches(clean)
    for (v, lb), (w, lw) in zip(out, want, strict=True):  # same substitutes as the portable path
        assert torch.equal(lb, lw) and (v[0] - w[0]).abs().mean() < 0.05


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        build_loader((np.zeros((0, 28, 28), np.uint8), np.zeros(0)), "mocov2", 4)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        build_loader(tmp_path, "mocov2", 4)


def test_all_corrupt_is_a_clear_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="no decodable image.*x.jpg"):
        batches(build_loader(tmp_path, "eval", 1, device="portable"))


# ----------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_cover_and_step_together(drop_last):
    n, shards, bs = 50, 3, 4
    data = (np.repeat(FMNIST.images[:1], n, 0), np.arange(n))  # labels = dataset index
    seen, lengths = [], []
    for k in range(shards):
        loader = build_loader(data, "mae", bs, device="portable", img_size=8, shard_id=k,
                              num_shards=shards, drop_last=drop_last, seed=4)
        got = torch.cat([lb for _, lb in batches(loader, 2)]).tolist()
        lengths.append(len(loader))
        assert len(got) == (len(loader) * bs if drop_last else loader.num_samples)
        seen.append(got)
    assert len(set(lengths)) == 1
    flat = sum(seen, [])
    if drop_last:  # 48 of 50 images (a multiple of 3), each exactly once; 16 per shard -> 4
        assert lengths[0] == 4 and len(flat) == len(set(flat)) == 48
    else:  # 17 per shard (one repeat pads 50 to 51), last batch partial
        assert lengths[0] == 5 and set(flat) == set(range(n)) and len(flat) == 51


def test_drop_last_lengths_and_the_last_partial_batch():
    keep = build_loader(SMALL, "eval", 10, device="portable", img_size=8, drop_last=False)
    drop = build_loader(SMALL, "eval", 10, device="portable", img_size=8, drop_last=True)
    assert (len(keep), len(drop)) == (5, 4)
    assert [len(lb) for _, lb in batches(keep)] == [10, 10, 10, 10, 8]
    assert [len(lb) for _, lb in batches(drop)] == [10] * 4
    ev = torch.cat([lb for _, lb in batches(keep)])
    assert torch.equal(ev, torch.from_numpy(SMALL[1]))  # eval: dataset order, every image


# ----------------------------------------------------------------------------- arguments
def test_bad_arguments_are_value_errors():
    for kw, match in [({"device": "tpu"}, "device must be one of"),
                      ({"on_corrupt": "ignore"}, "on_corrupt"),
                      ({"shard_id": 2, "num_shards": 2}, "shard_id"),
                      ({"in_chans": 2}, "in_chans")]:
        with pytest.raises(ValueError, match=match):
            build_loader(SMALL, "mocov2", 4, **kw)
    with pytest.raises(ValueError, match="recipe must be one of"):
        build_loader(SMALL, "moco", 4, device="portable")
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(SMALL, "mocov2", 0)
    with pytest.raises(ValueError, match="data must be"):
        build_loader(42, "mocov2", 4)


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(dali_mod, "available", lambda: False)
    assert loader_mod.resolve_backend("auto") == "portable"
    with pytest.raises(RuntimeError, match="needs NVIDIA DALI"):
        build_loader(SMALL, "mocov2", 4, device="cpu")
    monkeypatch.setattr(dali_mod, "available", lambda: True)
    want = "dali-gpu" if torch.cuda.is_available() else "dali-cpu"
    assert loader_mod.resolve_backend("auto") == want
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            loader_mod.resolve_backend("gpu")


def test_default_sizes_and_eval_of_one_in_memory_image(folder):
    assert build_loader(SMALL, "eval", 4, device="portable").view_sizes == [32]
    assert build_loader(folder, "eval", 4, device="portable").view_sizes == [224]
    img = np.asarray(Image.open(next(folder.rglob("*.png"))).convert("RGB"))
    (x,), lb = first(build_loader((img[None], np.zeros(1, np.int64)), "eval", 1,
                                  img_size=16, drop_last=False, device="portable"))
    assert x.shape == (1, 3, 16, 16) and lb.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_of_large_images_is_resize_shorter_side_then_centre_crop(backend):
    """The ImageNet protocol (torchvision Resize(S*256/224) + CenterCrop(S)) on a photo-sized
    array, checked against Pillow doing those two steps."""
    img = np.asarray(Image.fromarray(SMALL[0][5]).convert("RGB").resize((300, 200)))
    # img_size 28: shorter side 200 -> 28*256/224 = 32 exactly, width 300 -> 48, crop 28
    loader = build_loader((img[None], np.zeros(1)), "eval", 1, device=backend, img_size=28,
                          drop_last=False)
    (x,), _ = first(loader)
    ref = Image.fromarray(img).resize((48, 32), Image.BILINEAR).crop((10, 2, 38, 30))
    ref = np.asarray(ref, np.float32) / 255
    m, s = np.array(loader.recipe.mean), np.array(loader.recipe.std)
    got = x[0].permute(1, 2, 0).numpy() * s + m
    assert np.abs(got - ref).mean() < 2e-3 and np.abs(got - ref).max() < 0.01  # ~1 level


def test_normalize_is_exact():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = transforms.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), 3)
    want = torch.tensor([[[-1, 128 / 255 / 0.5 - 1, 1]], [[-1, (128 / 255 - 0.25) / 0.25, 3]],
                         [[0, 128 / 255, 1]]])
    torch.testing.assert_close(out[0], want.float())


@pytest.mark.parametrize("chans,out_chans", [(1, 3), (1, 1), (3, 3)])
def test_normalize_of_uint8_equals_the_float_path(chans, out_chans):
    # DALI's CPU batches (uint8) take a numpy pass; the portable path (float) takes torch's
    x = torch.randint(0, 256, (5, 7, 9, chans), dtype=torch.uint8).permute(0, 3, 1, 2)
    mean, std = (0.485, 0.456, 0.406)[:out_chans], (0.229, 0.224, 0.225)[:out_chans]
    got = transforms.normalize(x, mean, std, out_chans)
    want = transforms.normalize(x.float(), mean, std, out_chans)
    assert got.dtype == torch.float32 and got.shape == (5, out_chans, 7, 9)
    assert torch.equal(got, want)  # the same floats: float64 then one rounding, as torch's FMA


@needs_dali
@pytest.mark.parametrize("window", [3, 5, 9, 23])  # <= 5: one 2D kernel; wider: row + column
def test_dali_cpu_filter_blur_matches_gaussian_blur(window):
    """The CPU graph blurs with fn.filter and host-made kernels; it must give DALI's own
    gaussian_blur pixels (within 1 level: float rounding, and uint8 between the row and column
    passes), and leave the samples with sigma 0 untouched."""
    from nvidia.dali import fn, pipeline_def

    rng = np.random.default_rng(window)
    imgs = [rng.integers(0, 256, (31 + i, 26 + 2 * i, 3), dtype=np.uint8) for i in range(6)]
    sigma = np.array([0, 0.5, 0.7, 1.3, 2.0, 0], np.float32) * max(1, window / 9)
    view = recipes.View(size=10 * window, blur_p=1.0)  # a view whose kernel is `window` wide
    assert view.blur_window == window
    names = dali_mod._blur_names(view, gpu=False)
    assert names == (["blur_kernel"] if window <= 5 else ["blur_row", "blur_col"])
    p = np.tile(recipes.IDENTITY, (6, 1))
    p[:, recipes.SIGMA] = sigma
    arrays = dali_mod._arg_arrays(view, p, tuple(names))

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def graph():
        x, s, *k = fn.external_source(source=lambda: (imgs, np.maximum(sigma, 1e-3), *arrays),
                                      num_outputs=2 + len(arrays), batch=True,
                                      layout=["HWC"] + [None] * (1 + len(arrays)))
        return (dali_mod._filter_blur(x, dict(zip(names, k, strict=True))),
                fn.gaussian_blur(x, sigma=s, window_size=window))

    pipe = graph()
    pipe.build()
    got, want = pipe.run()
    for i in range(6):
        a, b = np.asarray(got[i]).astype(int), np.asarray(want[i]).astype(int)
        assert np.abs(a - b).max() <= 1, (window, i)  # float rounding, uint8 between passes
        assert np.abs(a - b).mean() < 0.3
        if sigma[i] == 0:
            assert np.array_equal(a, imgs[i])
        else:
            assert not np.array_equal(a, imgs[i])


def test_prefetch_propagates_errors_and_stops_when_abandoned():
    def make(i):
        if i == 3:
            raise KeyError("boom")
        return i

    with pytest.raises(KeyError, match="boom"):
        list(loader_mod._prefetch(make, 6))
    gen = loader_mod._prefetch(make, 6)
    assert next(gen) == 0
    gen.close()  # the worker hits the error with nobody reading: must not hang
