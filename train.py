"""Self-supervised pre-training for every method: `python train.py --method mae --arch vit_h`.

Flags come from selfsup.engine.config.Config (`python train.py --help`); precedence is
defaults < the method's paper preset (then its small-image preset, for images <= 64 px or with
--preset small; docs/presets.md) < the command line. Multi-GPU: `torchrun
--nproc_per_node N train.py ...`.

With no arguments it runs the demo (DEMO below): a few CPU minutes of self-supervised training
on the embedded Fashion-MNIST, ending with the k-NN accuracy of the trained encoder next to
the same encoder at random init.
"""

from __future__ import annotations

import sys

# The no-argument demo: bench/quality.py's MAE recipe (ViT-tiny, patch 4, 16-px Fashion-MNIST,
# batch 128 x 520 steps, a 0.5 mask, norm_pix off; about 6 CPU minutes, +5.2 k-NN points).
# MoCo v1, BYOL, SimSiam and SimCLR gain more (+5.5 to +5.8), but in bf16, slow on CPUs without it;
# this runs in fp32 everywhere. tests/test_quality.py checks it against quality.py's row.
# --interp linear: the row ran bilinear crops, before MAE's preset took the official bicubic;
# --preset imagenet: the row ran before --preset existed, on the ImageNet preset (issue 26).
DEMO = ["--method", "mae", "--arch", "vit_tiny", "--patch-size", "4", "--img-size", "16",
        "--steps", "520", "--batch-size", "128", "--optimizer", "adamw", "--lr", "1e-3",
        "--wd", "0.05", "--decoder-dim", "128", "--decoder-depth", "2", "--mask-ratio", "0.5",
        "--no-norm-pix", "--warmup-epochs", "0", "--knn-train-size", "5000",
        "--knn-test-size", "5000", "--knn-every", "0", "--interp", "linear", "--preset", "imagenet",
        "--out", "runs/demo"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from selfsup.data import DatasetError
    from selfsup.engine.checkpoint import CheckpointError
    from selfsup.engine.config import build_parser, resolve_method
    from selfsup.engine.trainer import NonFiniteLossError, train

    demo = not argv
    args = vars(build_parser().parse_args(DEMO if demo else argv))
    try:
        cfg = resolve_method(args)  # the preset chosen from --data (docs/presets.md)
        if demo:
            print("demo: python train.py " + " ".join(DEMO), flush=True)
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "interrupted" in summary:
        return 0
    if "knn_trained" in summary:
        before, after = summary.get("knn_random_init"), summary["knn_trained"]
        what = f"{cfg.knn_k}-NN top-1 on {cfg.test_data or cfg.data} (test split)"
        if before is not None:
            print(f"{what}: random init {before:.4f} -> trained {after:.4f} "
                  f"({100 * (after - before):+.1f} points)")
        else:
            print(f"{what}: trained {after:.4f}")
    print(f"run folder: {summary['run_dir']} ({summary['steps']} steps, "
          f"{summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
