"""torch's TF32 switches: no kernel file reads the legacy flag, none decides precision at import.

torch >= 2.9 raises ("mix of the legacy and new APIs") when `torch.backends.cuda.matmul.
allow_tf32` is read after a user set the new `fp32_precision`. So `import selfsup.kernels` and
every fp32 op of every family (forward + backward, Triton under the interpreter) must work after
either switch, and the InfoNCE precision must follow the setting of the moment. Each setting
runs in a fresh interpreter: the switch has to be thrown before the import.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import torch

    setting = sys.argv[1]
    if setting == "new":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = True

    import selfsup.kernels as K
    from selfsup.kernels import info_nce, mae

    def check(name, out, *leaves):
        grads = torch.autograd.grad(out.float().sum(), leaves)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads), name
        print("ok", name)

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()

    q, k, queue = leaf(5, 24), leaf(5, 24), torch.nn.functional.normalize(torch.randn(70, 24))
    check("info_nce_queue", K.info_nce_queue(q, k, queue, 0.2), q, k)
    check("info_nce_batch", K.info_nce_batch(q, k, 0.2), q, k)
    check("nt_xent", K.nt_xent(q, k, 0.1), q, k)
    s, t, c = leaf(3 * 4, 40), torch.randn(2 * 4, 40), torch.randn(1, 40)
    check("dino_loss", K.dino_loss(s, t, c), s)
    ids_keep, ids_restore, mask = mae.random_masking(2, 16, 0.75)
    x, pos = leaf(2, 16, 8), leaf(1, 16, 8)
    check("gather_tokens", K.gather_tokens(x, ids_keep, pos), x, pos)
    xv, tok, pos1 = leaf(2, 1 + 4, 8), leaf(1, 1, 8), leaf(1, 1 + 16, 8)
    check("scatter_tokens", K.scatter_tokens(xv, ids_restore, tok, pos1), xv, tok, pos1)
    pred, imgs = leaf(2, 16, 4 * 4 * 3), torch.randn(2, 3, 16, 16)
    check("masked_patch_loss", K.masked_patch_loss(pred, imgs, mask, 4), pred)
    # the precision is the setting's, read now; flipping it back is seen at the next call
    print("prec", info_nce._dot_precision(torch.float32))
    if setting == "new":
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    elif setting == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = False
    print("prec", info_nce._dot_precision(torch.float32))
""")


@pytest.mark.parametrize("setting,first,after", [("new", "tf32", "tf32x3"),
                                                  ("legacy", "tf32", "tf32x3"),
                                                  ("default", "tf32x3", "tf32x3")])
def test_kernels_import_and_run_under_each_tf32_switch(setting, first, after):
    env = dict(os.environ, TRITON_INTERPRET="1", SELFSUP_KERNELS="triton",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT, setting], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ops = ["info_nce_queue", "info_nce_batch", "nt_xent", "dino_loss", "gather_tokens",
           "scatter_tokens", "masked_patch_loss"]
    assert [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ok ")] == ops
    assert [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("prec ")] == [
        first, after]


def test_the_legacy_read_after_the_new_api_does_raise():
    # the failure mode this file guards against is real on this torch (else the test above
    # could not fail)
    r = subprocess.run([sys.executable, "-c",
                        "import torch\n"
                        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
                        "torch.backends.cuda.matmul.allow_tf32\n"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "legacy and new APIs" in r.stderr
