"""Section "train": 20 optimizer steps of every method on ViT-S/16 and ResNet-50, bf16.

Each run goes through train.py's own flags (selfsup.engine.config.build_parser + resolve)
and selfsup.engine.trainer.train, in this process. Data: the committed Fashion-MNIST sample
(--data fashion-mnist-sample --data-device portable, 224 px). The portable loader augments on
the CPU, slower than an H100 trains, so by default the first two augmented batches are kept
(pinned) and replayed: img/s then measures the training step, not the CPU augmentation; the
loader's own img/s per recipe is measured separately ("loader" rows). img/s is taken from
log.jsonl's timestamps between step 5 and step 20 (the first steps' cuDNN autotuning,
allocator growth and compilation excluded); peak memory is torch.cuda.max_memory_allocated
over the whole run. `--compile` runs happen only where train.py has that flag.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .common import Case, Context

REPLAY_BATCHES = 2
COMPILE_ORDER = ("dino", "mae", "mocov3", "simclr", "byol", "mocov2", "simsiam", "mocov1")
PREFETCH_DEPTH = 2  # batches the portable loader prepares ahead (data/loader.py's _prefetch)


def archs(ctx: Context) -> dict[str, list[str]]:
    """Label -> the arch flags (the dry run's tiny stand-ins at 32 px)."""
    if ctx.dry_run:
        return {"vit_tiny/8 (dry run)": ["--arch", "vit_tiny", "--patch-size", "8",
                                         "--img-size", "32"],
                "resnet_tiny (dry run)": ["--arch", "resnet_tiny", "--img-size", "32"]}
    return {"ViT-S/16": ["--arch", "vit_small", "--img-size", "224"],
            "ResNet-50": ["--arch", "resnet50", "--img-size", "224"]}


def compile_flag() -> str | None:
    """None when train.py accepts --compile (issue 23.1), else why it is not available."""
    from selfsup.engine.config import build_parser

    try:
        ns, extra = build_parser().parse_known_args(["--compile"])
    except SystemExit:
        return "train.py's --compile takes a value; this script passes it bare"
    if extra or "compile" not in vars(ns):
        return "not available: train.py has no --compile flag (issue 23.1)"
    return None


def _argv(ctx: Context, method: str, arch_flags: list[str], out: str, compiled: bool):
    steps, batch, log_every = (2, 8, 1) if ctx.dry_run else (20, 64, 5)
    argv = ["--method", method, *arch_flags, "--data", "fashion-mnist-sample",
            "--data-device", "portable", "--precision", "bf16", "--steps", str(steps),
            "--batch-size", str(batch), "--knn-every", "-1", "--log-every", str(log_every),
            "--ckpt-every", "1000000", "--out", out,
            "--device", "cuda" if ctx.cuda else "cpu"]
    if ctx.dry_run:
        # The CPU run only proves the code path: fp32 (bf16 matmuls are ~100x slower on CPUs
        # without AVX512-BF16), small heads and queues, one loader thread.
        argv += ["--workers", "1", "--precision", "fp32", "--proj-hidden", "64",
                 "--proj-dim", "32", "--pred-hidden", "64"]
        if method in ("dino", "ibot", "dinov2"):
            argv += ["--out-dim", "256"]
        if method.startswith("mocov") and method != "mocov3":
            argv += ["--queue-size", "256"]
    if compiled:
        argv.append("--compile")
    return argv, batch, log_every


class ReplayLoader:
    """The real loader's first batches, pinned and replayed: the step alone is measured.

    Everything but iteration (len, view_sizes, num_samples, ...) is the real loader's.
    """

    def __init__(self, real, n: int, pin: bool) -> None:
        self._real = real
        batches = []
        for views, labels in real:
            if pin:
                views = [v.pin_memory() for v in views]
            batches.append((views, labels))
            if len(batches) == n:
                break
        self._batches = batches

    def __len__(self) -> int:
        return len(self._real)

    def __iter__(self):
        for i in range(len(self._real)):
            yield self._batches[i % len(self._batches)]

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getattr__(self, name):  # only reached for what this class does not define
        return getattr(self._real, name)


@contextlib.contextmanager
def replayed_batches(enabled: bool, pin: bool):
    """Wrap the trainer's loader factory in ReplayLoader while training (if it has one)."""
    from selfsup.engine import trainer

    original = getattr(trainer, "make_train_loader", None)
    if not enabled or original is None:
        yield "portable loader" if enabled is False else (
            "portable loader (the trainer has no make_train_loader to wrap)")
        return
    trainer.make_train_loader = lambda *a, **k: ReplayLoader(original(*a, **k),
                                                             REPLAY_BATCHES, pin)
    try:
        yield f"{REPLAY_BATCHES} augmented batches replayed"
    finally:
        trainer.make_train_loader = original


@contextlib.contextmanager
def light_compile(enabled: bool):
    """The dry run's compiled row: the trainer's compile_modules with backend aot_eager.

    Dynamo's trace and AOTAutograd's joint graph run as on the GPU, but inductor's CPU C++
    codegen (a minute or more on a busy 2-core machine) is left out, so the dry run fits
    its budget; tests/test_compile_train.py covers the inductor path on CPU."""
    from selfsup.engine import trainer

    original = getattr(trainer, "compile_modules", None)
    if not enabled or original is None:
        yield None
        return
    trainer.compile_modules = functools.partial(original, backend="aot_eager")
    try:
        yield "dry run: torch.compile backend aot_eager (no inductor codegen)"
    finally:
        trainer.compile_modules = original


def _throughput(log: Path, batch: int, warm: int) -> tuple[float | None, int, float | None]:
    """(img/s over the logged steps after `warm`, steps timed, last logged loss)."""
    rows = []
    if log.is_file():
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("kind") == "train" and "time" in r and "step" in r:
                    rows.append(r)
    loss = rows[-1].get("loss") if rows else None
    timed = [r for r in rows if r["step"] >= warm]
    if len(timed) < 2 or timed[-1]["time"] <= timed[0]["time"]:
        return None, 0, loss
    steps = timed[-1]["step"] - timed[0]["step"]
    return batch * steps / (timed[-1]["time"] - timed[0]["time"]), steps, loss


def train_run(ctx: Context, method: str, arch_label: str, compiled: bool, replay: bool) -> dict:
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class, train

    row = {"method": method, "arch": arch_label, "mode": "compile" if compiled else "eager"}
    if compiled:
        why = compile_flag()
        if why is not None:
            return row | {"status": "not available", "note": why}
    tmp = tempfile.mkdtemp(prefix=f"gpucheck-{method}-")
    argv, batch, log_every = _argv(ctx, method, archs(ctx)[arch_label], tmp, compiled)
    row["flags"] = " ".join(argv[:-2] if "--out" in argv[-2:] else argv).replace(tmp, "<tmp>")
    try:
        cfg = resolve(vars(build_parser().parse_args(argv)), method_class(method).preset)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        t0 = time.perf_counter()
        with replayed_batches(replay, pin=ctx.cuda) as data_note, \
                light_compile(ctx.dry_run and compiled) as compile_note:
            if compile_note:
                row["note"] = compile_note
            try:
                summary = train(cfg)
            except ValueError as e:
                # MAE / iBOT / DINOv2 on a ResNet are refused by design (their losses read
                # patch tokens); any other ValueError is a failure
                known = "ViT" in str(e) and "vit" not in argv[3]
                return row | {"status": "n/a" if known else "error", "note": str(e)[:300],
                              **({} if known else {"error": f"ValueError: {e}"[:500]})}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        img_s, timed, loss = _throughput(Path(tmp) / "log.jsonl", batch, log_every)
        row.update(status="ok", img_s=img_s, steps_timed=timed, final_loss=loss,
                   steps=summary.get("steps"), data=data_note,
                   peak_gib=(torch.cuda.max_memory_allocated(ctx.device) / 2**30
                             if ctx.cuda else None))
        if img_s is None:
            row["note"] = "too few timed log rows; img/s not measured"
        if loss is not None and not (loss == loss and abs(loss) != float("inf")):
            row["status"] = "error"
            row["error"] = f"non-finite loss {loss}"
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
        if compiled:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        if ctx.cuda:
            torch.cuda.empty_cache()


def loader_rate(ctx: Context, method: str) -> dict:
    """The portable loader's own img/s for this method's recipe (what feeds a real run)."""
    from selfsup.data import build_loader
    from selfsup.engine.config import build_parser, resolve
    from selfsup.engine.trainer import method_class

    arch_flags = next(iter(archs(ctx).values()))
    argv, batch, _ = _argv(ctx, method, arch_flags, "unused", False)
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(method).preset)
    cls = method_class(method)
    kw = cls.recipe_kwargs(cfg) if hasattr(cls, "recipe_kwargs") else {}
    loader = build_loader(cfg.data, cls.recipe, cfg.batch_size, device=cfg.data_device,
                          img_size=cfg.img_size, num_threads=cfg.workers, seed=cfg.seed,
                          drop_last=True, in_chans=cfg.in_chans, blur=cfg.blur, **kw)
    n = 2 if ctx.dry_run else 6
    it = iter(loader)
    views, _ = next(it)  # thread pool start-up excluded
    for _ in range(PREFETCH_DEPTH):  # drain what the prefetch thread made meanwhile
        next(it)
    t0 = time.perf_counter()
    got = 0
    for _ in range(n):
        try:
            next(it)
        except StopIteration:
            break
        got += 1
    dt = time.perf_counter() - t0
    return {"status": "ok", "recipe": cls.recipe, "img_s": batch * got / dt if got else None,
            "batches": got, "views": [list(v.shape[1:]) for v in views],
            "threads": cfg.workers or "all cores"}


def cases(ctx: Context, replay: bool = True) -> list[Case]:
    from selfsup.ssl import METHODS

    labels = list(archs(ctx))
    eager_t, compile_t = (90.0, 150.0) if ctx.dry_run else (150.0, 300.0)
    out = [Case(f"eager/{m}/{a}", lambda m=m, a=a: train_run(ctx, m, a, False, replay),
                timeout=eager_t, min_s=4.0, meta={"method": m, "arch": a, "mode": "eager"})
           for a in labels for m in METHODS]
    recipes = {}
    for m in METHODS:
        recipes.setdefault(METHODS[m].recipe, m)
    out += [Case(f"loader/{r}", lambda m=m: loader_rate(ctx, m), timeout=120.0, min_s=3.0,
                 meta={"recipe": r, "method": m}) for r, m in recipes.items()]
    # Compiles take tens of seconds each, so a short budget reaches only the first few:
    # the ViT-heavy methods first, alternating archs.
    order = [m for m in COMPILE_ORDER if m in METHODS] + [m for m in METHODS
                                                         if m not in COMPILE_ORDER]
    # CPU inductor compiles take 10-30 s: the dry run proves the path once, on a small graph
    dry_pick = ("simsiam" if "simsiam" in METHODS else order[0], labels[-1])
    for m in order:
        for a in labels:
            meta = {"method": m, "arch": a, "mode": "compile"}
            if ctx.dry_run and (m, a) != dry_pick and compile_flag() is None:
                out.append(Case(f"compile/{m}/{a}", lambda meta=meta: meta | {
                    "status": "dry-run skip", "note": "the dry run compiles one run only"},
                    meta=meta))
                continue
            out.append(Case(f"compile/{m}/{a}", lambda m=m, a=a: train_run(ctx, m, a, True, replay),
                            timeout=compile_t, min_s=15.0, meta=meta))
    return out
