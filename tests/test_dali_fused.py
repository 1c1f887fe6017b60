"""The fused DALI CPU view operator (selfsup/data/csrc/view_op.cc) against a float64 reference,
against DALI's stock graph, and its errors and fallback.

The reference below is written from the operator's specification (dense resampling matrices,
numpy), not from its code: triangle-filter crop+resize with clamped borders, DALI's colour
twist, a reflect-101 Gaussian, solarize, rounded half-to-even to uint8 after each stage, then
normalized.
"""

import os

import numpy as np
import pytest
import torch

from selfsup.data import (
    build_loader,
    dali_plugin,
    get_recipe,
    load_fashion_mnist_sample,
    transforms,
)
from selfsup.data import dali as dali_mod
from selfsup.data.recipes import N_PARAMS, draw_params

pytestmark = pytest.mark.skipif(not dali_mod.available(), reason="nvidia-dali not installed")


@pytest.fixture(scope="module")
def plugin():
    if not dali_plugin.load():
        pytest.skip("the fused operator cannot be built here (no C++ compiler?)")


# ----------------------------------------------------------------------------- reference
def resample_matrix(n_in: int, n_out: int, lo: float, hi: float, antialias: bool):
    """(n_out, n_in) float64: output i averages source pixel centres j + 0.5 with a triangle
    of radius max(1, |step|) around c_i = n_in * lo + (i + 0.5) * step, borders clamped."""
    step = (hi - lo) * n_in / n_out
    r = abs(step) if antialias and abs(step) > 1 else 1.0
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = n_in * lo + (i + 0.5) * step
        j = np.arange(int(np.floor(c - r - 0.5)) - 1, int(np.ceil(c + r)) + 2)
        w = np.maximum(0.0, 1 - np.abs(j + 0.5 - c) / r)
        np.add.at(m[i], np.clip(j, 0, n_in - 1), w / w.sum())
    return m


def to_u8(x):
    return np.clip(np.rint(x), 0, 255)  # rint: half to even


def reference_view(img, p, size, window, antialias, scale, shift, out_chans):
    """uint8 (H, W, C) and one parameter row -> float32 (out_chans, size, size)."""
    h, w, c = img.shape
    my = resample_matrix(h, size, p[0], p[2], antialias)
    mx = resample_matrix(w, size, p[1], p[3], antialias)
    x = to_u8(np.einsum("ih,jw,hwc->ijc", my, mx, img.astype(np.float64)))
    pt = torch.from_numpy(p[None].astype(np.float32))
    if c == 3:
        m, off = transforms.twist_matrices(pt)
        x = to_u8(np.einsum("ij,hwj->hwi", m[0].numpy(), x) + off[0].item())
    else:
        x = to_u8(x * float(p[5]) * float(p[6]) + 128.0 * (1 - float(p[6])) * float(p[5]))
    if window and p[9] > 0:
        g = dali_mod.blur_kernels(np.array([p[9]], np.float32), window)[0]
        r = window // 2
        pad = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")  # numpy "reflect" = 101
        rows = sum(g[k] * pad[:, k:k + size] for k in range(window))
        x = to_u8(sum(g[k] * rows[k:k + size] for k in range(window)))
    if p[10] > 0:
        x = np.where(x >= 128, 255 - x, x)
    out = np.stack([x[..., k % c] * np.float64(scale[k]) + np.float64(shift[k])
                    for k in range(out_chans)])
    return out.astype(np.float32)


def run_op(images, params, threads=2, **kw):
    """fn.selfsup_view over one batch: list of uint8 HWC arrays, (B, 11) float32."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=threads, device_id=None)
    def pipe():
        x, p = fn.external_source(source=lambda: (images, list(params)), num_outputs=2,
                                  batch=True, layout=["HWC", None])
        return fn.selfsup_view(x, p, **kw)

    pp = pipe()
    pp.build()
    return pp.run()[0].as_array()


def random_params(rng, n, *, colour=True):
    p = np.zeros((n, N_PARAMS), np.float32)
    y0, x0 = rng.uniform(0, 0.5, n), rng.uniform(0, 0.5, n)
    y1, x1 = y0 + rng.uniform(0.2, 0.5, n), x0 + rng.uniform(0.2, 0.5, n)
    flip = rng.random(n) < 0.5
    p[:, 0], p[:, 2] = y0, y1
    p[:, 1], p[:, 3] = np.where(flip, x1, x0), np.where(flip, x0, x1)
    p[:, 4] = flip
    p[:, 5:9] = [1, 1, 1, 0]
    if colour:
        p[:, 5] = rng.uniform(0.6, 1.4, n)
        p[:, 6] = rng.uniform(0.6, 1.4, n)
        p[:, 7] = np.where(rng.random(n) < 0.2, 0, rng.uniform(0.6, 1.4, n))
        p[:, 8] = rng.uniform(-36, 36, n)
    p[:, 9] = np.where(rng.random(n) < 0.6, rng.uniform(0.1, 2.0, n), 0)
    p[:, 10] = rng.random(n) < 0.3
    return p


def levels(a, b, scale):
    """|a - b| in uint8 levels, per output channel's scale."""
    s = torch.tensor(scale, dtype=torch.float64).view(1, -1, 1, 1)
    return (torch.from_numpy(a).double() - torch.from_numpy(b).double()).abs() / s


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("chans,out_chans", [(3, 3), (1, 3), (1, 1)])
@pytest.mark.parametrize("size,antialias", [(17, False), (23, True), (9, True)])
def test_fused_view_matches_the_float64_reference(plugin, chans, out_chans, size, antialias):
    rng = np.random.default_rng(size * 10 + chans)
    n = 12
    images = [rng.integers(0, 256, (int(rng.integers(7, 61)), int(rng.integers(7, 61)), chans),
                           dtype=np.uint8) for _ in range(n)]
    params = random_params(rng, n, colour=True)
    params[0, :4] = [0, 0, 1, 1]  # the whole image
    params[1, 5:11] = [1, 1, 1, 0, 0, 0]  # identity parameters: resize only
    window = 5 if size < 20 else 7
    mean, std = (0.485, 0.456, 0.406)[:out_chans], (0.229, 0.224, 0.225)[:out_chans]
    scale = [float(np.float32(1 / (255 * s))) for s in std]
    shift = [float(np.float32(-m / s)) for m, s in zip(mean, std, strict=True)]
    got = run_op(images, params, size=size, blur_window=window, out_chans=out_chans,
                 antialias=antialias, scale=scale, shift=shift)
    assert got.shape == (n, out_chans, size, size) and got.dtype == np.float32
    want = np.stack([reference_view(im, p, size, window, antialias, scale, shift, out_chans)
                     for im, p in zip(images, params, strict=True)])
    d = levels(got, want, scale)
    # float32 sums vs float64: a value on a rounding boundary may land one level over, and
    # the colour twist (gain up to 1.4 * 1.4) may carry that to two
    assert d.max() <= 2.0 + 1e-3, d.max()
    assert (d > 1e-3).double().mean() < 0.02
    # the normalization itself is exact: identical levels give identical floats
    assert d.min() == 0


def test_fused_view_without_blur_window_never_blurs(plugin):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (20, 20, 1), dtype=np.uint8) for _ in range(4)]
    params = random_params(rng, 4, colour=False)
    params[:, 9] = 1.5  # a sigma, but the view has no blur window
    params[:, 10] = 0
    got = run_op(images, params, size=20, blur_window=0, out_chans=1, antialias=False,
                 scale=[1.0], shift=[0.0])
    want = np.stack([reference_view(im, p, 20, 0, False, [1.0], [0.0], 1)
                     for im, p in zip(images, params, strict=True)])
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("recipe,size", [("mocov2", 32), ("mocov1", 28), ("byol", 28),
                                         ("dino", 32), ("mae", 16), ("eval", 16)])
def test_fused_matches_the_stock_graph_on_fashion_mnist(plugin, monkeypatch, recipe, size):
    """Grey images: the same resize, twist, blur and rounding as DALI's stock operators, but
    sums in another order: a value on a rounding boundary can land one level away (measured
    over whole quality runs, bench/fused_parity.py: ~2e-5 of the values)."""
    ds = load_fashion_mnist_sample("train")
    data = (ds.images[::37][:96], ds.labels[::37][:96])
    kw = {"n_local": 2} if recipe == "dino" else {}
    if recipe in ("dino", "mae"):  # bicubic recipes take the stock graph: compare linear
        kw["interp"] = "linear"

    def views(fused: bool):
        monkeypatch.setenv("SELFSUP_DALI_PLUGIN", "1" if fused else "0")
        loader = build_loader(data, recipe, 48, device="dali-cpu", img_size=size, seed=5,
                              num_threads=2, **kw)
        loader.set_epoch(1)
        return [v for views, _ in loader for v in views]

    fused, stock = views(True), views(False)
    assert len(fused) == len(stock) > 0
    level = max(1 / (255 * s) for s in get_recipe(recipe, size).std) + 1e-5  # one level
    off = 0
    for a, b in zip(fused, stock, strict=True):
        assert (a - b).abs().max() <= level
        off += int((a != b).sum())
    assert off <= 1e-3 * sum(a.numel() for a in fused), off


def test_fused_is_close_to_the_stock_graph_on_colour_jpegs(plugin, monkeypatch, tmp_path):
    """RGB: DALI's color_twist and its two-pass blur round differently; within 2 levels."""
    from PIL import Image

    ds = load_fashion_mnist_sample("train")
    rng = np.random.default_rng(0)
    for i in range(16):
        rgb = np.clip(ds.images[i * 50][..., None] * rng.uniform(0.4, 1, 3) +
                      rng.uniform(0, 60, 3), 0, 255).astype(np.uint8)
        d = tmp_path / f"c{i % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rgb).resize((int(rng.integers(90, 140)), int(rng.integers(90, 140))),
                                    Image.BICUBIC).save(d / f"{i}.jpg", quality=92)

    def views(fused: bool):
        monkeypatch.setenv("SELFSUP_DALI_PLUGIN", "1" if fused else "0")
        loader = build_loader(str(tmp_path), "dino", 8, device="dali-cpu", img_size=64,
                              n_local=2, seed=1, num_threads=2)
        return [v for views, _ in loader for v in views]

    scale = [1 / (255 * s) for s in get_recipe("dino", 64).std]
    for a, b in zip(views(True), views(False), strict=True):
        d = levels(a.numpy(), b.numpy(), scale)
        assert d.max() <= 3.0 + 1e-3, d.max()
        assert d.mean() < 0.25, d.mean()


def test_fused_op_errors_name_the_problem(plugin):
    rng = np.random.default_rng(0)
    params = random_params(rng, 2)
    kw = dict(size=8, blur_window=3, out_chans=1, antialias=True, scale=[1.0], shift=[0.0])
    floats = [rng.random((10, 10, 1)).astype(np.float32) for _ in range(2)]
    with pytest.raises(RuntimeError, match="images must be uint8"):
        run_op(floats, params, **kw)
    imgs = [rng.integers(0, 256, (10, 10, 1), dtype=np.uint8) for _ in range(2)]
    with pytest.raises(RuntimeError, match="11 values"):
        run_op(imgs, params[:, :10], **kw)
    with pytest.raises(RuntimeError, match="blur_window must be 0 or odd"):
        run_op(imgs, params, **{**kw, "blur_window": 4})
    four = [rng.integers(0, 256, (10, 10, 4), dtype=np.uint8) for _ in range(2)]
    with pytest.raises(RuntimeError, match="C = 1 or 3"):
        run_op(four, params, **kw)


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(dali_plugin.PluginError, match="does not run|failed"):
        dali_plugin.build()
    with pytest.warns(UserWarning, match="fused DALI CPU view operator is unavailable"):
        assert dali_plugin._load(dali_plugin.build) is False
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache


def test_the_build_is_cached_by_content(plugin, monkeypatch, tmp_path):
    path = dali_plugin.build()
    assert path.exists() and path.suffix == ".so"
    assert dali_plugin.build() == path  # the same key: no rebuild
    monkeypatch.setenv("SELFSUP_DALI_PLUGIN", "0")
    assert not dali_plugin.enabled()


def test_stock_graph_is_used_when_disabled(monkeypatch):
    monkeypatch.setenv("SELFSUP_DALI_PLUGIN", "0")
    ds = load_fashion_mnist_sample("train")
    loader = build_loader((ds.images[:16], ds.labels[:16]), "mocov2", 8, device="dali-cpu",
                          img_size=16, num_threads=1)
    views, _ = next(iter(loader))
    assert views[0].dtype == torch.float32 and views[0].shape == (8, 3, 16, 16)
    r = get_recipe("mocov2", 16)
    p = draw_params(r.views[0], np.random.default_rng(0), np.tile([28.0, 28.0], (4, 1)))
    names = dali_mod._arg_names(r.views[0], 1, gpu=False)
    assert "roi_start" in names  # the stock graph's per-argument inputs
    assert len(dali_mod._arg_arrays(r.views[0], p, names)) == len(names)


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs 2 cores")
def test_fused_output_does_not_depend_on_threads(plugin):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (int(rng.integers(20, 50)), 33, 3), dtype=np.uint8)
              for _ in range(24)]
    params = random_params(rng, 24)
    kw = dict(size=21, blur_window=3, out_chans=3, antialias=True, scale=[1.0] * 3,
              shift=[0.0] * 3)
    assert np.array_equal(run_op(images, params, threads=1, **kw),
                          run_op(images, params, threads=2, **kw))


def test_cuda_headers_need_cccl(monkeypatch, tmp_path):
    """DALI's headers include cuda_fp16.h, which needs CCCL's <nv/target>: a header dir
    without it (e.g. Triton's bundled copy) is passed over."""
    partial, full = tmp_path / "partial" / "include", tmp_path / "full" / "include"
    for d in (partial, full):
        d.mkdir(parents=True)
        (d / "cuda_runtime_api.h").write_text("")
    (full / "cccl" / "nv").mkdir(parents=True)
    (full / "cccl" / "nv" / "target").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(partial.parent))
    try:
        assert str(partial) not in dali_plugin._cuda_includes()
    except dali_plugin.PluginError:
        pass  # no complete CUDA headers elsewhere on this machine: also not `partial`
    monkeypatch.setenv("CUDA_HOME", str(full.parent))
    assert dali_plugin._cuda_includes() == [str(full), str(full / "cccl")]
