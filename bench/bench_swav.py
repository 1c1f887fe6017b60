"""SwAV loss + Sinkhorn: the paper's pair loop (ref) vs ours (torch), time and peak memory.

Rows: impl x shape x mode (fwd = codes + loss under no_grad; fwd+bwd = loss.backward()).
"ref" is the paper's algorithm as written (sinkhorn_knopp_ref in float64 on the two global
views, then the V (V-1) pair loop of log_softmax over each view, swav_loss_ref); "ours" is
selfsup.kernels.swav (float64 Sinkhorn with a max shift, fp32 codes; the loss as one
log_softmax over all V views and the identity
sum_{v != a} <q_a, logp_v> = <q_a, sum_v logp_v> - <q_a, logp_a>, so each view's
log-probabilities are computed once, not V - 1 times). The paper shape is the ImageNet
setting per GPU: B = 64, 2 + 6 crops, K = 3000 prototypes, plus the 3840-row queue
in the Sinkhorn input. There is no Triton row: the scores are (V B, K) = 1.5 M floats, ~6 MB,
which no fused kernel would make a measurable part of a ResNet-50 step.
"""

from __future__ import annotations

import pytest
import torch
from _harness import device, run

from selfsup.kernels.swav import sinkhorn_knopp, sinkhorn_knopp_ref, swav_loss, swav_loss_ref

# name: (B, n_views, K, queue rows)
SHAPES = {"small": (16, 4, 300, 0), "paper": (64, 8, 3000, 3840)}
PARAMS = [pytest.param(k, marks=() if k == "small" else pytest.mark.slow) for k in SHAPES]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", PARAMS)
@pytest.mark.parametrize("impl", ["ref", "torch"])
def test_swav_loss(benchmark, impl, shape, mode):
    b, v, k, q_len = SHAPES[shape]
    dev = device()
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(v * b, k, device=dev), dim=1)
    scores.requires_grad_(mode == "fwd+bwd")
    queue = torch.nn.functional.normalize(torch.randn(q_len, k, device=dev), dim=1)
    sk, loss_fn = ((sinkhorn_knopp_ref, swav_loss_ref) if impl == "ref"
                   else (sinkhorn_knopp, swav_loss))

    def loss():
        with torch.no_grad():
            codes = torch.stack([sk(torch.cat([queue, scores[a * b:(a + 1) * b]]))[-b:]
                                 for a in range(2)])
        return loss_fn(scores, codes, v, 0.1)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return loss()
        scores.grad = None
        out = loss()
        out.backward()
        return out

    run(benchmark, step, impl=impl, shape=f"{shape} B{b} V{v} K{k} Q{q_len}", mode=mode,
        dtype="float32")
