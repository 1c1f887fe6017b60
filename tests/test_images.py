"""Real-world image files (issue 24): transparency composited on white, EXIF orientation,
grey/colour mixing, 16-bit and CMYK files, a pixel limit with one summary line, truncated and
corrupt files skipped and named once per epoch; the DALI and portable loaders give the same
pixels. Every file is written here with Pillow."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from selfsup.data import BACKGROUND, build_loader, decode_image, load_fashion_mnist_sample
from selfsup.data import dali as dali_mod
from selfsup.data import images as images_mod
from selfsup.data.errors import CorruptImageError, ImageTooLargeError

HAVE_DALI = dali_mod.available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali not installed")
BACKENDS = ["portable", pytest.param("dali-cpu", marks=needs_dali)]
S = 16  # every test image is S x S (or rotated to it): the eval view below is the identity
FM = load_fashion_mnist_sample("test").images


def rng_image(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def alpha_ramp(seed):
    """An alpha band with fully transparent, fully opaque and partial pixels."""
    a = rng_image(seed, (S, S))
    a[0], a[1] = 0, 255
    return a


def composite(rgb, alpha):
    """The reference: colour over white, in float64 (Pillow rounds in integers: <= 1 level)."""
    a = alpha.astype(np.float64)[..., None] / 255
    bg = np.array(BACKGROUND, np.float64)
    return np.round(rgb * a + bg * (1 - a))


def save(im, path, **kw):
    im.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: (path, expected uint8 RGB or None)}: one file per case, S x S."""
    root = tmp_path_factory.mktemp("real") / "cls"
    root.mkdir()
    out = {}
    rgb, alpha = rng_image(1, (S, S, 3)), alpha_ramp(2)
    out["rgba"] = (save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), root / "rgba.png"),
                   composite(rgb, alpha))
    grey = FM[3][:S, :S]
    out["la"] = (save(Image.fromarray(np.dstack([grey, alpha]), "LA"), root / "la.png"),
                 composite(np.repeat(grey[..., None], 3, 2), alpha))
    # palette with one transparent index, and palette with per-entry alpha (tRNS bytes)
    pal = rng_image(3, (256, 3))
    idx = (np.arange(S * S).reshape(S, S) % 7).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(pal.flatten().tolist())
    a_idx = np.where(idx == 2, 0, 255).astype(np.uint8)
    out["p_index"] = (save(p, root / "p_index.png", transparency=2), composite(pal[idx], a_idx))
    entry_alpha = bytes([0, 64, 128, 192, 255, 30, 220])
    out["p_alpha"] = (save(p, root / "p_alpha.png", transparency=entry_alpha),
                      composite(pal[idx], np.frombuffer(entry_alpha, np.uint8)[idx]))
    out["p_opaque"] = (save(p, root / "p_opaque.png"), pal[idx].astype(np.float64))
    key = tuple(int(v) for v in rgb[4, 4])
    trns = np.where((rgb == key).all(-1), 0, 255).astype(np.uint8)
    out["rgb_trns"] = (save(Image.fromarray(rgb), root / "rgb_trns.png", transparency=key),
                       composite(rgb, trns))
    # EXIF orientation 6 (rotate 90 degrees clockwise to display), in a JPEG and a PNG eXIf
    wide = np.ascontiguousarray(rng_image(4, (S, S + 8, 3))[:, :S])  # S x S, not symmetric
    exif = Image.Exif()
    exif[images_mod.ORIENTATION] = 6
    for ext in ("jpg", "png"):
        path = save(Image.fromarray(wide), root / f"rot6.{ext}", exif=exif.tobytes(),
                    **({"quality": 95} if ext == "jpg" else {}))
        stored = np.asarray(Image.open(path).convert("RGB"))  # the pixels as stored
        out[f"rot6_{ext}"] = (path, np.rot90(stored, k=-1).astype(np.float64))
    g16 = (np.arange(S * S).reshape(S, S) * 257).astype(np.uint16)
    out["grey16"] = (save(Image.fromarray(g16), root / "grey16.png"),
                     np.repeat(np.round(g16 / 257.0)[..., None], 3, 2))
    cmyk = Image.fromarray(rng_image(5, (S, S, 4)), "CMYK")
    out["cmyk"] = (save(cmyk, root / "cmyk.jpg", quality=95), None)  # Pillow's conversion
    out["grey_jpg"] = (save(Image.fromarray(FM[7][:S, :S]), root / "grey.jpg", quality=95), None)
    out["rgb_png"] = (save(Image.fromarray(rgb), root / "rgb.png"), rgb.astype(np.float64))
    return out


@pytest.mark.parametrize("name", ["rgba", "la", "p_index", "p_alpha", "p_opaque", "rgb_trns",
                                  "rot6_jpg", "rot6_png", "grey16", "rgb_png"])
def test_decode_policy_against_an_independent_reference(files, name):
    path, want = files[name]
    got = decode_image(path, "RGB")
    assert got.shape == (S, S, 3) and got.dtype == np.uint8
    assert np.abs(got - want).max() <= 1, name  # Pillow composites in integer arithmetic
    if name in ("rgba", "la"):  # fully transparent rows are the background, opaque ones exact
        assert (got[0] == BACKGROUND).all()


def test_dropping_alpha_would_have_been_a_mis_decode(files):
    """Guard for the test itself: the transparent pixels do not store white."""
    path, _ = files["rgba"]
    naive = np.asarray(Image.open(path).convert("RGB"))
    assert (naive[0] != 255).any() and (decode_image(path)[0] == 255).all()


def eval_pixels(folder, backend, in_chans=3):
    """Every image of the folder through the eval view at its own size (crop = the whole
    image, resize S -> S: the identity), back to uint8 levels, keyed by file name."""
    loader = build_loader(folder, "eval", 64, device=backend, img_size=S, center_crop=1.0,
                          drop_last=False, in_chans=in_chans, num_threads=1)
    r = loader.recipe
    (x,), _ = next(iter(loader))
    mean = torch.tensor(r.mean).view(1, -1, 1, 1)
    std = torch.tensor(r.std).view(1, -1, 1, 1)
    levels = torch.round((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()
    names = [p.rsplit("/", 1)[-1] for p, _ in loader.dataset.samples]
    return dict(zip(names, levels, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_give_the_policy_pixels(files, backend):
    folder = files["rgba"][0].parent.parent
    got = eval_pixels(folder, backend)
    for name, (path, _) in files.items():
        want = decode_image(path, "RGB")
        diff = np.abs(got[path.name] - want).max()
        # JPEG: DALI's and Pillow's libjpeg builds may differ by a level or two on plain
        # files; every file that needs the policy goes through it and is exact
        assert diff <= (2 if name in ("grey_jpg",) else 0), (name, diff)


@needs_dali
@pytest.mark.parametrize("in_chans", [3, 1])
def test_dali_and_portable_give_the_same_composited_pixels(files, in_chans):
    folder = files["rgba"][0].parent.parent
    a, b = eval_pixels(folder, "portable", in_chans), eval_pixels(folder, "dali-cpu", in_chans)
    for name, (path, _) in files.items():
        diff = np.abs(a[path.name] - b[path.name]).max()
        if name == "grey_jpg":  # two libjpeg builds
            assert diff <= 2, (name, diff)
        elif name == "rgb_png" and in_chans == 1:  # DALI's own luma rounding on plain files
            assert diff <= 1, (name, diff)
        else:  # everything the policy decodes: the same pixels
            assert diff == 0, (name, diff)


def test_probe_sends_only_policy_files_as_pnm(files):
    for name, (path, _) in files.items():
        data, (h, w) = images_mod.probe(str(path), "RGB")
        plain = name in ("grey_jpg", "rgb_png")
        assert (bytes(data[:2]) in (b"P5", b"P6")) != plain, name
        assert (h, w) == (S, S)


# ----------------------------------------------------------------------------- pixel limit
@pytest.fixture
def big_folder(tmp_path):
    """Two small images and two whose headers claim more pixels than Pillow's own bomb
    threshold (mode "1": a 90-megapixel PNG is a few kB and is never decoded here)."""
    root = tmp_path / "big" / "cls"
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(FM[i]).save(root / f"small{i}.png")
    for i in range(2):
        Image.new("1", (10000, 9000 + i)).save(root / f"huge{i}.png")
    return root.parent


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_limit_skips_with_one_summary_line(big_folder, backend, monkeypatch):
    monkeypatch.setenv(images_mod.MAX_PIXELS_ENV, "1000000")
    loader = build_loader(big_folder, "eval", 4, device=backend, img_size=S, drop_last=False)
    assert loader.max_pixels == 1_000_000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(loader)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert "2 over the pixel limit of 1,000,000" in msgs[0] and "--max-pixels" in msgs[0]
    assert "huge0.png (10000 x 9000)" in msgs[0] and "huge1.png (10000 x 9001)" in msgs[0]
    assert [len(y) for _, y in out] == [4]  # substituted by readable images
    assert all(isinstance(loader.bad[p], ImageTooLargeError) for p in loader.bad_files)


def test_pixel_limit_argument_env_and_errors(big_folder, monkeypatch):
    huge = str(big_folder / "cls" / "huge0.png")
    with pytest.raises(ImageTooLargeError, match="90,000,000 pixels is over the limit"):
        images_mod.open_image(huge, max_pixels=1000)
    monkeypatch.setenv(images_mod.MAX_PIXELS_ENV, "5e7")
    assert images_mod.resolve_max_pixels() == 50_000_000
    assert images_mod.resolve_max_pixels(0) == 0  # 0: no limit
    monkeypatch.setenv(images_mod.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="SELFSUP_MAX_PIXELS"):
        images_mod.resolve_max_pixels()
    with pytest.raises(ValueError, match="max_pixels"):
        build_loader(big_folder, "eval", 2, device="portable", max_pixels=-1)
    monkeypatch.delenv(images_mod.MAX_PIXELS_ENV)
    assert images_mod.resolve_max_pixels() == images_mod.DEFAULT_MAX_PIXELS


# ----------------------------------------------------------------------------- broken files
@pytest.fixture
def broken_folder(tmp_path):
    root = tmp_path / "broken" / "cls"
    root.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(FM[i]).convert("RGB").save(root / f"ok{i}.png")
    png = io.BytesIO()
    Image.fromarray(rng_image(9, (64, 64, 3))).save(png, "PNG")
    (root / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    jpg = io.BytesIO()
    Image.fromarray(rng_image(8, (64, 64, 3))).save(jpg, "JPEG")
    raw = jpg.getvalue()
    (root / "cut.jpg").write_bytes(raw[: raw.index(b"\xff\xda") + (len(raw) // 3)])
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root.parent, {str(root / n) for n in ("cut.png", "cut.jpg", "junk.png")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_and_corrupt_files_are_skipped_never_padded(broken_folder, backend):
    root, bad = broken_folder
    loader = build_loader(root, "mocov2", 3, device=backend, img_size=S, drop_last=False)
    for epoch in range(2):
        loader.set_epoch(epoch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = list(loader)
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and f"epoch {epoch}: skipped 3 image(s)" in msgs[0], msgs
        assert all(p in msgs[0] for p in bad)
        assert [len(y) for _, y in out] == [3, 3, 3]
    assert set(loader.bad_files) == bad
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # a truncated file would decode as grey
    for p in bad:
        with pytest.raises(CorruptImageError, match=p.rsplit("/", 1)[-1]):
            decode_image(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skips_are_named_when_the_epoch_is_cut_short(broken_folder, backend):
    """A run that ends at --steps mid-epoch still names what it skipped."""
    root, bad = broken_folder
    loader = build_loader(root, "eval", 9, device=backend, img_size=S, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(loader)
        next(it)  # the one batch holds every file
        it.close()
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and all(p in msgs[0] for p in bad), msgs
