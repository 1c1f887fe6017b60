"""Do the recorded quality rows still see the same pixels with the fused DALI CPU operator?

bench/results/quality.json was measured with DALI's stock CPU operators. For each row this
rebuilds the run's own loaders from its recorded command (train.py's parser and presets, the
trainer's make_train_loader / make_knn_loaders), streams every batch the run consumed (its
steps, epoch by epoch, and both k-NN loaders) through the fused operator and through the stock
graph, and counts the batches and values that differ. Training is deterministic at one thread,
so a row whose streams are identical reproduces its accuracy exactly with either.

    python bench/fused_parity.py [method ...]      # prints one line per loader and row
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config_of(command: str):
    from selfsup.engine.config import Config, build_parser, resolve
    from selfsup.engine.trainer import method_class

    argv = shlex.split(command)[2:]  # drop "python train.py"
    args = vars(build_parser().parse_args(argv))
    return resolve(args, method_class(args.get("method", Config.method)).preset)


def stream(make, steps: int | None, fused: bool):
    """Every view batch a run would draw: `steps` batches (epochs roll over), or one epoch."""
    os.environ["SELFSUP_DALI_PLUGIN"] = "1" if fused else "0"
    loader = make()
    n, epoch = 0, 0
    while steps is None or n < steps:
        loader.set_epoch(epoch)
        for views, _ in loader:
            if steps is not None and n >= steps:
                break
            yield views
            n += 1
        if steps is None:
            return
        epoch += 1


def compare(make, steps):
    batches = diff_batches = diff_values = total = 0
    for a, b in zip(stream(make, steps, True), stream(make, steps, False), strict=True):
        batches += 1
        d = [int((x != y).sum()) for x, y in zip(a, b, strict=True)]
        total += sum(x.numel() for x in a)
        diff_values += sum(d)
        diff_batches += sum(d) > 0
    return batches, diff_batches, diff_values, total


def main(methods: list[str]) -> int:
    from selfsup.engine.trainer import make_knn_loaders, make_train_loader, method_class

    rows = json.loads((ROOT / "bench/results/quality.json").read_text())
    for row in rows:
        if methods and row["method"] not in methods:
            continue
        cfg = config_of(row["command"])
        cfg.data_device = "dali-cpu"
        cls = method_class(cfg)
        kw = cls.recipe_kwargs(cfg) if hasattr(cls, "recipe_kwargs") else {}
        checks = [("train", lambda c=cfg, m=cls, k=kw: make_train_loader(c, m.recipe, k),
                   row["steps"]),
                  ("knn-memory", lambda c=cfg: make_knn_loaders(c)[0], None),
                  ("knn-test", lambda c=cfg: make_knn_loaders(c)[1], None)]
        for name, make, steps in checks:
            b, db, dv, tot = compare(make, steps)
            print(f"{row['method']:8s} {name:10s} batches {b:6d}  differing batches {db:4d}  "
                  f"differing values {dv} of {tot} ({dv / max(tot, 1):.2e})", flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
