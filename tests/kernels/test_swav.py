"""SwAV: sinkhorn_knopp and swav_loss against the paper's algorithm and pair loop (the refs).

Both are plain torch (no Triton kernel: the (B, K = 3000) scores are tiny next to the encoder,
see selfsup/kernels/swav.py), so float64 comparisons are tight; the 2-rank distributed
Sinkhorn is in tests/test_new_methods.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.kernels.swav import sinkhorn_knopp, sinkhorn_knopp_ref, swav_loss, swav_loss_ref
from selfsup.kernels.testing import TOL64, assert_lowp_close


def cosines(b: int, k: int, d: int = 16, dtype=torch.float64) -> torch.Tensor:
    """Prototype scores as SwAV has them: cosines of unit embeddings and unit prototypes."""
    z = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype)


# ----------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("b,k", [(1, 5), (7, 13), (33, 300), (64, 3000)])
@pytest.mark.parametrize("eps,iters", [(0.05, 3), (0.04, 1), (0.1, 10)])
def test_sinkhorn_float64_matches_the_paper(seed, b, k, eps, iters):
    s = cosines(b, k)
    q = sinkhorn_knopp(s, eps, iters)
    torch.testing.assert_close(q, sinkhorn_knopp_ref(s, eps, iters), **TOL64)
    assert q.dtype == torch.float64 and q.shape == (b, k)
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64), **TOL64)


def test_sinkhorn_equipartitions_the_prototypes(seed):
    # enough iterations: every prototype gets B / K of the batch's mass
    b, k = 40, 8
    q = sinkhorn_knopp(cosines(b, k) * 3, 0.5, 200)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    # 3 iterations at eps 0.05 are not yet balanced: the prototype mass still varies
    q3 = sinkhorn_knopp(cosines(b, k), 0.05, 3)
    assert q3.sum(0).std() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sinkhorn_low_precision_scores_give_fp32_codes(seed, dtype):
    s64 = cosines(48, 301)
    s = s64.to(dtype)
    q = sinkhorn_knopp(s, 0.05, 3)
    assert q.dtype == torch.float32
    ref = sinkhorn_knopp_ref(s.double(), 0.05, 3)  # the same rounded inputs, in float64
    torch.testing.assert_close(q.double(), ref, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("rep", range(4))
def test_sinkhorn_small_eps_stays_finite_in_fp32(seed, rep):
    # exp(cos / 0.005) overflows fp32 past cos = 0.44 (the global max shift keeps it finite),
    # and a prototype far from every sample underflows to a zero row in fp32 (the float64
    # working precision keeps its mass); both happen with most draws of 3-D cosines
    s = cosines(16, 50, d=3, dtype=torch.float32)
    assert not torch.isfinite(torch.exp(s / 0.005)).all()
    q = sinkhorn_knopp(s, 0.005, 3)
    assert torch.isfinite(q).all() and q.dtype == torch.float32
    torch.testing.assert_close(q.double(), sinkhorn_knopp_ref(s.double(), 0.005, 3),
                               rtol=1e-5, atol=1e-7)


def test_sinkhorn_is_not_differentiable_and_leaves_scores_alone(seed):
    s = cosines(9, 17).requires_grad_()
    before = s.detach().clone()
    q = sinkhorn_knopp(s)
    assert not q.requires_grad
    assert torch.equal(s.detach(), before)


# ----------------------------------------------------------------------------- the loss
def loss_and_grad(fn, scores, codes, n_views, temperature, upstream):
    loss = fn(scores, codes, n_views, temperature)
    (g,) = torch.autograd.grad(loss, scores, torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), g


@pytest.mark.parametrize("v,a,b,k", [(2, 2, 3, 7), (8, 2, 5, 300), (3, 1, 1, 13), (4, 3, 6, 31)])
@pytest.mark.parametrize("temperature", [0.04, 0.1, 1.0])
def test_loss_float64_matches_the_pair_loop(seed, v, a, b, k, temperature):
    scores = cosines(v * b, k).requires_grad_()
    codes = torch.stack([sinkhorn_knopp(cosines(b, k)) for _ in range(a)])
    upstream = -2.3
    l0, g0 = loss_and_grad(swav_loss_ref, scores, codes, v, temperature, upstream)
    l1, g1 = loss_and_grad(swav_loss, scores, codes, v, temperature, upstream)
    torch.testing.assert_close(l1, l0, **TOL64)
    torch.testing.assert_close(g1, g0, **TOL64)


def test_loss_noncontiguous_scores(seed):
    v, b, k = 4, 5, 19
    big = cosines(k, v * b).T.requires_grad_()  # a transposed view: not contiguous
    assert not big.is_contiguous()
    codes = torch.stack([sinkhorn_knopp(cosines(b, k)) for _ in range(2)])
    torch.testing.assert_close(swav_loss(big, codes, v), swav_loss_ref(big, codes, v), **TOL64)


def test_loss_of_a_perfect_prediction_is_the_codes_entropy(seed):
    # scores / T = log q up to a constant -> softmax(scores / T) = q -> loss = H(q)
    b, k, t = 6, 11, 0.1
    q = torch.softmax(torch.randn(b, k, dtype=torch.float64), dim=1)
    scores = torch.cat([t * q.log(), t * q.log()])
    entropy = -(q * q.log()).sum(1).mean()
    torch.testing.assert_close(swav_loss(scores, torch.stack([q, q]), 2, t), entropy, **TOL64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_low_precision_within_twice_torchs_error(seed, dtype):
    v, b, k, t = 4, 16, 300, 0.1
    s64 = cosines(v * b, k)
    codes = torch.stack([sinkhorn_knopp(s64[i * b:(i + 1) * b]) for i in range(2)])
    s = s64.to(dtype).requires_grad_()
    ref_s = s.detach().double().requires_grad_()
    up = 65536.0  # GradScaler's initial scale
    l64, g64 = loss_and_grad(swav_loss_ref, ref_s, codes, v, t, up)
    l, g = loss_and_grad(swav_loss, s, codes.to(dtype), v, t, up)
    assert l.dtype == torch.float32 and g.dtype == dtype and torch.isfinite(g).all()
    # torch's best in this dtype: the pair loop run on the rounded inputs in that dtype, at
    # upstream 1 (at 65536 its fp16 gradient overflows to inf / nan; ours stays finite)
    s_low = s.detach().clone().requires_grad_()
    lt, gt = loss_and_grad(_ref_in_dtype, s_low, codes.to(dtype), v, t, 1.0)
    assert_lowp_close("swav loss", l, l64, lt, dtype)
    assert_lowp_close("swav grad", g.float() / up, g64 / up, gt, dtype)


def _ref_in_dtype(scores, codes, n_views, temperature):
    b = scores.shape[0] // n_views
    total = 0.0
    for a in range(codes.shape[0]):
        sub = sum(-(codes[a] * torch.log_softmax(scores[i * b:(i + 1) * b] / temperature, 1))
                  .sum(1).mean() for i in range(n_views) if i != a)
        total = total + sub / (n_views - 1)
    return total / codes.shape[0]


def test_the_swapped_prediction_needs_other_views(seed):
    # changing view a's own scores does not change what view a's codes are compared against
    b, k = 4, 9
    scores = cosines(3 * b, k)
    codes = sinkhorn_knopp(scores[:b])[None]
    moved = scores.clone()
    moved[:b] += torch.randn(b, k, dtype=torch.float64)
    torch.testing.assert_close(swav_loss(moved, codes, 3), swav_loss(scores, codes, 3), **TOL64)
    moved[b:2 * b] += 1.0 * torch.randn(b, k, dtype=torch.float64)
    assert not math.isclose(swav_loss(moved, codes, 3).item(), swav_loss(scores, codes, 3).item())


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    s = torch.randn(6, 5)
    with pytest.raises(ValueError, match="scores must be a 2-D"):
        sinkhorn_knopp(torch.randn(5))
    with pytest.raises(ValueError, match="floating point"):
        sinkhorn_knopp(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sinkhorn_knopp(s, 0.0)
    with pytest.raises(ValueError, match="n_iters must be an int >= 1"):
        sinkhorn_knopp(s, 0.05, 0)
    codes = torch.softmax(torch.randn(2, 3, 5), -1)
    with pytest.raises(ValueError, match="n_views >= 2"):
        swav_loss(s, codes, 1)
    with pytest.raises(ValueError, match=r"n_views \* B"):
        swav_loss(torch.randn(7, 5), codes, 2)
    with pytest.raises(ValueError, match="codes must be"):
        swav_loss(s, torch.softmax(torch.randn(2, 4, 5), -1), 2)
    with pytest.raises(ValueError, match="codes must be"):
        swav_loss(s, torch.softmax(torch.randn(3, 3, 5), -1), 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        swav_loss(s, codes, 2, temperature=-1)
